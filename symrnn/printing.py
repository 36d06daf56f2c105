"""Expression printers: SymPy's printers, subclassed; backends differ by tables.

``NumpyPrinter`` prints a per-unit expression as NumPy array code: values are
renamed through a table (``f`` -> ``f_seq`` outside the loop), each op is
spelled by its own ``numpy`` rule (:mod:`symrnn.ops`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import cache

import sympy
import sympy.printing.precedence
from sympy.printing.numpy import NumPyPrinter as _SympyNumPyPrinter

from .errors import InternalError
from .ops import Op
from .reductions import Reduce


class NumpyPrinter(_SympyNumPyPrinter):
    """Prints with ``np.`` (or ``cp.``: ``lib``) and a renaming table for symbols."""

    def __init__(self, names: Mapping[str, str] | None = None, lib: str = "np"):
        super().__init__({"fully_qualified_modules": True, "inline": True})
        self._names = dict(names or {})
        self._lib = lib

    def _print(self, expr, **kwargs):
        if isinstance(expr, Op):  # before NumPyPrinter's own tanh, exp, ... (same class names)
            return type(expr).numpy.format(x=self._print(expr.args[0]), xp=self._lib)
        if isinstance(expr, Reduce):  # over the last (unit) axis, kept
            return type(expr).numpy.format(x=self._print(expr.args[0]), xp=self._lib)
        return super()._print(expr, **kwargs)

    def _print_Symbol(self, expr):
        return self._names.get(expr.name, expr.name)

    def _print_Function(self, expr):
        raise InternalError(f"no NumPy spelling for {expr}")

    def _module_format(self, fqn, register=True):
        return f"{self._lib}." + fqn.split(".")[-1] if fqn.startswith("numpy.") else fqn

    def _print_Pow(self, expr, rational=False):
        base, exp = expr.args
        if exp.is_Integer and exp < 0:
            inv = sympy.Pow(base, -exp, evaluate=False) if exp != -1 else base
            return f"1/{self.parenthesize(inv, sympy.printing.precedence.PRECEDENCE['Pow'])}"
        return super()._print_Pow(expr, rational=rational)


def numpy_code(expr: sympy.Expr, names: Mapping[str, str] | None = None, lib: str = "np") -> str:
    """``expr`` as NumPy code (``lib``: ``cp`` for CuPy), symbols renamed through ``names``.

    >>> import sympy
    >>> s = sympy.Symbol("s")
    >>> numpy_code(1 - s**2, {"s": "s_seq"})
    '1 - s_seq**2'
    """
    return NumpyPrinter(names, lib).doprint(expr)


@cache
def numpy_function(op: type[Op]) -> Callable:
    """The op as a NumPy function of one array, from its own ``numpy`` rule (SymPy's
    lambdify over this printer: no second spelling of the op anywhere)."""
    import numpy as np

    a = sympy.Symbol("a")
    return sympy.lambdify(a, op(a), modules=[{"np": np}], printer=NumpyPrinter())
