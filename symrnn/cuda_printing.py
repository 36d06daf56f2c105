"""CUDA C++ printing: SymPy's C99 printer, subclassed for dtype-parametric kernels.

Kernels are C++ templates over ``scalar_t`` (float or double), so every number
is printed as ``scalar_t(...)`` (no silent promotion of float math to double)
and every nonlinearity as an overloaded helper ``op_<name>`` whose float and
double bodies are the op's own ``cuda`` spellings (:mod:`symrnn.ops`).

>>> import sympy
>>> from symrnn.ops import sigmoid
>>> y, a = sympy.symbols("y a")
>>> cuda_code(1 - y**2)
'scalar_t(1) - (y*y)'
>>> cuda_code(y / (1 + y)**2)
'y/((y + scalar_t(1))*(y + scalar_t(1)))'
>>> cuda_code(sigmoid(a) / 2, {"a": "a_t"})
'(scalar_t(1)/scalar_t(2))*op_sigmoid(a_t)'
"""

from __future__ import annotations

from collections.abc import Mapping

import sympy
from sympy.printing.c import C99CodePrinter
from sympy.printing.precedence import PRECEDENCE

from .errors import InternalError
from .ops import Op

__all__ = ["CudaPrinter", "cuda_code", "dim_code", "op_helpers", "SCALAR"]

#: the template parameter of every kernel: float or double
SCALAR = "scalar_t"


class CudaPrinter(C99CodePrinter):
    """Per-unit expressions as CUDA C++ over ``scalar_t``, symbols renamed through a table."""

    def __init__(self, names: Mapping[str, str] | None = None):
        super().__init__({"strict": False})
        self._names = dict(names or {})

    def _print_Symbol(self, expr):
        return self._names.get(expr.name, expr.name)

    def _print(self, expr, **kwargs):
        if isinstance(expr, Op):  # before C99's own tanh, exp, ... (same class names)
            return f"op_{type(expr).__name__}({self._print(expr.args[0])})"
        return super()._print(expr, **kwargs)

    def _print_Function(self, expr):
        raise InternalError(f"no CUDA spelling for {expr}")

    def _print_Integer(self, expr):
        return f"{SCALAR}({expr.p})"

    def _print_Rational(self, expr):
        return f"{SCALAR}({expr.p})/{SCALAR}({expr.q})"

    def _print_Float(self, expr):
        return f"{SCALAR}({float(expr)!r})"

    def _print_Pow(self, expr, rational=False):
        base, exp = expr.args
        if exp.is_Integer and 1 <= exp <= 4:  # y*y, not pow(y, 2); parenthesized: it may be a denominator
            b = self.parenthesize(base, PRECEDENCE["Mul"], strict=True)
            return b if exp == 1 else "(" + "*".join([b] * int(exp)) + ")"
        if exp.is_Integer and exp < 0:
            inv = sympy.Pow(base, -exp, evaluate=False) if exp != -1 else base
            return f"{SCALAR}(1)/{self.parenthesize(inv, PRECEDENCE['Pow'], strict=True)}"
        return f"pow({self._print(base)}, {self._print(exp)})"


def cuda_code(expr: sympy.Expr, names: Mapping[str, str] | None = None) -> str:
    """``expr`` as CUDA C++ over ``scalar_t``."""
    return CudaPrinter(names).doprint(expr)


class _DimPrinter(C99CodePrinter):
    """Sizes (n_in, n_hidden, n_out) as plain C integer expressions."""

    def __init__(self):
        super().__init__({"strict": False})


def dim_code(expr) -> str:
    """A size as C code, e.g. ``4*n_hidden``."""
    return _DimPrinter().doprint(sympy.sympify(expr, strict=True))


def op_helpers(ops: list[type[Op]]) -> list[tuple[str, str, str]]:
    """(name, float body, double body) of the ``op_<name>`` overloads, for ``ops``."""
    return [(f"op_{op.__name__}", op.cuda[0].format(x="x"), op.cuda[1].format(x="x")) for op in ops]
