"""Sums over units in the NumPy backward (reductions' adjoints): computed once, and left
out where they are zero by the reductions' own definitions.

A reduction ``r = mean(a)`` passes ``d_a += (1/n) sum_k d_r[k]`` to its operand
(backends/numpy_backward.Backward.reduction_backward).  Two passes:

* ``shared_unit_sums``: reductions whose adjoints are one value (``d_r2 = d_r1``, as for
  the four gate blocks' means of one stacked projection) sum it once and pass one share;
  an adjoint that is an alias of another is read as that one, so the terms of a
  consumer that reads both combine into one (one coefficient, one product);
* ``zero_unit_sums``: a value that is the same at every unit (a reduction, or a function
  of reductions and scalars only: a mean, a variance, an inverse standard deviation)
  affects the loss only through the sum over units of its adjoint.  A term ``u * K`` of
  that adjoint, with ``u`` an adjoint that is the same at every unit (a reduction's
  share), is left out when the mean over units of ``K`` is zero identically: when ``K``
  is linear in per-unit values whose means are reductions of the graph, and replacing
  each by its mean, then each uniform value by its definition, gives 0 (the centred
  values' sum of layer normalization, sum_k (a_k - mean(a)) = 0, as the hand-derived
  layer-norm backward uses it).  Anything else is kept; the gradients stay those of the
  derivation (checked against finite differences, RTRL and, switched off, the same values).
"""

from __future__ import annotations

import sympy

from ..ir import Pointwise, Reduction
from ..reductions import mean, sum_units

__all__ = ["UnitSums"]


class UnitSums:
    """What one backward (``b``: backends/numpy_backward.Backward) knows about values and
    adjoints that are the same at every unit."""

    def __init__(self, backward):
        self.b = backward
        g = backward.g
        self.uniform_adjoints: set[str] = set()  # adjoints the same at every unit (reductions' shares)
        dims = {sympy.Symbol(name) for name, _ in g.dims}
        self.uniform_symbols: set[sympy.Symbol] = set(dims)
        self.means: dict[sympy.Symbol, sympy.Expr] = {}  # a per-unit value -> its mean over units (a reduction)
        self.definitions: dict[sympy.Symbol, sympy.Expr] = {}  # a uniform pointwise value -> its expression
        for leaf in g.leaves:
            if leaf.size is None:  # a scalar
                self.uniform_symbols.add(sympy.Symbol(leaf.name))
        for node in g.nodes:  # in graph order: deps first
            sym = sympy.Symbol(node.name)
            if isinstance(node, Reduction):
                self.uniform_symbols.add(sym)
                operand = sympy.Symbol(node.operand)
                if node.reduce is mean:
                    self.means.setdefault(operand, sym)
                elif node.reduce is sum_units:
                    self.means.setdefault(operand, sym / node.size)
            elif isinstance(node, Pointwise) and node.expr.free_symbols <= self.uniform_symbols:
                self.uniform_symbols.add(sym)
                self.definitions[sym] = node.expr

    def is_uniform(self, name: str) -> bool:
        """Value ``name`` is the same at every unit of a row."""
        return sympy.Symbol(name) in self.uniform_symbols

    def note(self, adjoint: str, expr: sympy.Expr) -> None:
        """Record adjoint ``adjoint`` = ``expr`` as the same at every unit if every symbol of
        ``expr`` is (an adjoint that is, or a uniform value)."""
        if all(s.name in self.uniform_adjoints or s in self.uniform_symbols for s in expr.free_symbols):
            self.uniform_adjoints.add(adjoint)

    def mean_over_units(self, k: sympy.Expr) -> sympy.Expr | None:
        """The mean over units of ``k`` in uniform values only, or None where that is not known
        (``k`` not linear in per-unit values, or one whose mean no reduction gives)."""
        total = []
        for term in sympy.Add.make_args(sympy.expand(k)):
            per_unit = [s for s in term.free_symbols if s not in self.uniform_symbols]
            if not per_unit:
                total.append(term)
                continue
            if len(per_unit) > 1 or per_unit[0] not in self.means:
                return None
            v = per_unit[0]
            rest = sympy.cancel(term / v)
            if rest.has(v):  # not linear in v
                return None
            total.append(rest * self.means[v])
        return sympy.Add(*total)

    def is_zero_mean(self, k: sympy.Expr) -> bool:
        """The mean over units of ``k`` is 0 by the reductions' definitions."""
        m = self.mean_over_units(k)
        if m is None:
            return False
        for _ in range(len(self.definitions) + 1):  # each uniform value by its definition, until none is left
            expanded = m.xreplace(self.definitions)
            if expanded == m:
                break
            m = expanded
        return sympy.expand(m) == 0

    def drop_zero_sums(self, expr: sympy.Expr) -> sympy.Expr:
        """The adjoint ``expr`` of a uniform value without its terms ``u * K`` (``u`` a uniform
        adjoint) whose sum over units is zero."""
        for u in sorted((s for s in expr.free_symbols if s.name in self.uniform_adjoints), key=lambda s: s.name):
            k = sympy.diff(expr, u)
            if not k.has(u) and self.is_zero_mean(k):
                expr = expr.xreplace({u: 0})
        return expr
