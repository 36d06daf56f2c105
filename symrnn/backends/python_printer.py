"""Statements (symrnn.stmt) as Python lines, over NumPy (``np``) or CuPy (``cp``).

Every value prints by its kind: a ref as ``name[index]`` (sizes and positions by
SymPy's NumPy printer), an elementwise expression by :class:`~symrnn.printing.NumpyPrinter`
with each symbol of ``refs`` printed as its array, a call as ``np.func(...)``.
"""

from __future__ import annotations

from collections.abc import Iterable

import sympy

from ..errors import InternalError
from ..printing import numpy_code
from ..stmt import (
    Assign, Attr, Call, Comment, Concat, Dict, Do, Elementwise, Helper, If, Index, Infix, Key, Loop, MatMul, Method, OpCall,
    Paren, Ref, Reshape, Size, Span, Text, Update, _Marker,
)

__all__ = ["PythonPrinter", "dim"]


def dim(expr) -> str:
    """A size as Python code in n_in, n_hidden, n_out (and T, B)."""
    return numpy_code(sympy.sympify(expr, strict=True))


class PythonPrinter:
    """Prints statements; ``lib`` is the array library's name in the module (np or cp)."""

    def __init__(self, lib: str = "np"):
        self.lib = lib

    # -- values -------------------------------------------------------------------------
    def value(self, v) -> str:
        if isinstance(v, Ref):
            index = ", ".join(self.item(i) for i in v.index)
            return v.name + (f"[{index}]" if v.index else "") + (".T" if v.T else "")
        if isinstance(v, Elementwise):
            return numpy_code(v.expr, {k: self.value(ref) for k, ref in v.refs}, self.lib)
        if isinstance(v, Call):
            return f"{self.lib}.{v.func}({self.arguments(v)})"
        if isinstance(v, Helper):
            return f"{v.func}({self.arguments(v)})"
        if isinstance(v, MatMul):
            return f"{self.value(v.a)} @ {self.value(v.b)}"
        if isinstance(v, Reshape):
            inner = self.value(v.value)
            if isinstance(v.value, MatMul):
                inner = f"({inner})"
            shape = f"T, B, {dim(v.cols)}" if v.steps else f"-1, {dim(v.cols)}"
            return f"{inner}.reshape({shape})" + (".T" if v.T else "")
        if isinstance(v, Concat):
            axis = "" if v.axis is None else f", axis={v.axis}"
            return f"{self.lib}.concatenate([{', '.join(self.value(p) for p in v.parts)}]{axis})"
        if isinstance(v, Size):
            return dim(v.expr)
        if isinstance(v, Text):
            return v.text
        if isinstance(v, Key):
            return f'"{v.name}"'
        if isinstance(v, Infix):
            return f" {v.op} ".join(self.value(p) for p in v.parts)
        if isinstance(v, Paren):
            return f"({self.value(v.value)})"
        if isinstance(v, Attr):
            return f"{self.value(v.value)}.{v.name}"
        if isinstance(v, Method):
            return f"{self.value(v.value)}.{v.name}({self.arguments(v)})"
        if isinstance(v, Index):
            return f"{self.value(v.value)}[{', '.join(self.item(i) for i in v.items)}]"
        if isinstance(v, Dict):
            return "{" + ", ".join(f'"{k}": {self.value(x)}' for k, x in v.items) + "}"
        if isinstance(v, tuple):
            items = [self.value(x) for x in v]
            return "(" + ", ".join(items) + ("," if len(items) == 1 else "") + ")"
        raise InternalError(f"{v!r} is not a value")

    def arguments(self, call) -> str:
        return ", ".join([self.value(a) for a in call.args] + [f"{k}={self.value(v)}" for k, v in call.kwargs])

    def item(self, item) -> str:
        if isinstance(item, _Marker):
            return str(item)
        if isinstance(item, Span):
            lo = "" if item.lo is None else self.item(item.lo)
            return f"{'' if lo == '0' else lo}:{'' if item.hi is None else self.item(item.hi)}"
        if isinstance(item, sympy.Basic):
            return dim(item)
        return self.value(item)

    # -- statements ---------------------------------------------------------------------
    def lines(self, stmts: Iterable, indent: int = 0) -> list[str]:
        out: list[str] = []
        for s in stmts:
            out.extend(self.stmt(s, indent))
        return out

    def stmt(self, s, indent: int = 0) -> list[str]:
        pad = " " * indent
        note = f"  # {s.comment}" if getattr(s, "comment", "") else ""
        if isinstance(s, Assign):
            if isinstance(s.dst, tuple):
                dst = ", ".join(self.value(d) for d in s.dst)
                value = ", ".join(self.value(v) for v in s.value) if isinstance(s.value, tuple) else self.value(s.value)
            else:
                dst, value = self.value(s.dst), self.value(s.value)
            return [f"{pad}{dst} = {value}{note}"]
        if isinstance(s, Update):
            return [f"{pad}{self.value(s.dst)} {s.op}= {self.value(s.value)}{note}"]
        if isinstance(s, Do):
            return [f"{pad}{self.value(s.call)}{note}"]
        if isinstance(s, OpCall):
            return [pad + s.op.numpy_inplace[s.step].format(a=self.value(s.a), out=self.value(s.out), xp=self.lib) + note]
        if isinstance(s, If):
            return [f'{pad}if "{s.key}" in {s.mapping}:', *self.lines(s.body, indent + 4)]
        if isinstance(s, Loop):
            steps = f"range({self.value(s.stop)})"
            return [f"{pad}for {s.var} in {f'reversed({steps})' if s.reverse else steps}:", *self.lines(s.body, indent + 4)]
        if isinstance(s, Comment):
            return [f"{pad}# {s.text}"]
        raise InternalError(f"{s!r} is not a statement")
