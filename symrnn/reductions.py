r"""Reductions over the units of a vector: every rule of one reduction in one place.

``mean(e)``, ``sum(e)`` and ``logsumexp(e)`` reduce a vector expression over its units
and broadcast the result back, so ``e - mean(e)`` subtracts the mean from every unit
(layer normalization's centring) and ``z - logsumexp(z)`` is the log-softmax of ``z``.
Each reduction is a SymPy ``Function`` subclass carrying

* ``weight(a, r, n)``: d r / d a_j, the same for every unit of ``r`` (``r`` is the
  reduction's broadcast value, ``a`` its operand at unit j, ``n`` the number of units):
  1/n for the mean, 1 for the sum, the softmax exp(a_j - r) for logsumexp; so the
  adjoint is ``d_a += weight * sum_k d_r[k]`` and the tangent ``dr = sum_j weight_j da_j``;
  what backward must store follows from the weight's free symbols;
* ``numpy``: its NumPy spelling over the unit axis (the last), keeping it (``{x}`` the
  operand, ``{xp}`` the array library); logsumexp subtracts the maximum first, so it
  is finite for logits of any size (float32 logits ~1e3 included);
* ``latex``: how a reader writes it, ``\frac{1}{n}\sum_{j} a_j``.

A reduction is lowered to a node of its own (:class:`symrnn.ir.Reduction`), never
inside a pointwise expression; ``tests/test_rules.py`` checks that every stage has a
rule for it.

>>> import sympy
>>> a, r, n = sympy.symbols("a r n")
>>> logsumexp.weight(a, r, n)
exp(a - r)
>>> print(sympy.latex(mean(a)))
\frac{1}{n}\sum_{j} {a}_{j}
"""

from __future__ import annotations

import sympy

from .ops import Op, exp

__all__ = ["REDUCTIONS", "Reduce", "logsumexp", "mean", "sum_units"]

_KEEP = "axis=-1, keepdims=True"


class Reduce(sympy.Function):
    """Base class of the reductions over units (one vector argument)."""

    nargs = 1
    #: NumPy spelling over the last axis, keeping it; ``{x}`` the operand, ``{xp}`` the library
    numpy: str = ""
    #: LaTeX spelling; ``{x}`` is the operand with every value at unit ``{j}``
    latex: str = ""
    #: its name in equations and spec files
    spec_name: str = ""
    #: the reduction of a list of numbers, used only by the tests to check ``weight``
    formula = None

    @classmethod
    def weight(cls, a: sympy.Expr, r: sympy.Expr, n: sympy.Expr) -> sympy.Expr:
        """d r / d a_j for the operand's value ``a`` at unit j, the result ``r``, ``n`` units."""
        raise NotImplementedError

    def _latex(self, printer) -> str:
        return self.latex.format(x=printer._print(at_unit(self.args[0], "j")), j="j")

    def _sympystr(self, printer) -> str:
        return f"{self.spec_name}({printer._print(self.args[0])})"



class AtUnit(sympy.Function):
    """``AtUnit(v, j)``: the value ``v`` at unit ``j`` (printed ``v_j``), in documents only."""

    nargs = 2

    def _latex(self, printer) -> str:
        inner = printer._print(self.args[0])
        return f"{{{inner}}}_{{{self.args[1]}}}" if " " not in inner.strip() else rf"\left({inner}\right)_{{{self.args[1]}}}"


def at_unit(expr: sympy.Expr, index: str) -> sympy.Expr:
    """``expr`` with every value at unit ``index`` (``a`` -> ``a_j``): its symbols and the
    documents' quantities (functions other than ops and arithmetic), except inside an inner
    reduction (whose own index is bound there)."""
    j = sympy.Symbol(index, integer=True)
    if isinstance(expr, Reduce) or expr.is_Number:
        return expr
    if isinstance(expr, sympy.Symbol) or (isinstance(expr, sympy.Function) and not isinstance(expr, Op)):
        return AtUnit(expr, j)
    if not expr.args:
        return expr
    return expr.func(*[at_unit(a, index) for a in expr.args])


class mean(Reduce):
    spec_name = "mean"
    numpy = "{xp}.mean({x}, " + _KEEP + ")"
    latex = r"\frac{{1}}{{n}}\sum_{{{j}}} {x}"
    formula = staticmethod(lambda xs: sympy.Add(*xs) / len(xs))

    @classmethod
    def weight(cls, a, r, n):
        return 1 / n


class sum_units(Reduce):
    """``sum(e)`` in equations: the sum over units (named so as not to shadow Python's sum)."""

    spec_name = "sum"
    numpy = "{xp}.sum({x}, " + _KEEP + ")"
    latex = r"\sum_{{{j}}} {x}"
    formula = staticmethod(lambda xs: sympy.Add(*xs))

    @classmethod
    def weight(cls, a, r, n):
        return sympy.Integer(1)


class logsumexp(Reduce):
    spec_name = "logsumexp"
    # max + log(sum(exp(x - max))): every exponent is <= 0, so no overflow, and the
    # largest term is exactly 1, so no log(0)
    numpy = ("({xp}.log({xp}.sum({xp}.exp({x} - {xp}.max({x}, " + _KEEP + ")), " + _KEEP + ")) + {xp}.max({x}, "
             + _KEEP + "))")
    latex = r"\log\sum_{{{j}}} \exp\left({x}\right)"
    formula = staticmethod(lambda xs: sympy.log(sympy.Add(*[sympy.exp(x) for x in xs])))

    @classmethod
    def weight(cls, a, r, n):
        return exp(a - r)  # the softmax of the operand at unit j


#: every reduction, by the name used in equations (and in spec files)
REDUCTIONS: dict[str, type[Reduce]] = {"mean": mean, "sum": sum_units, "logsumexp": logsumexp}
