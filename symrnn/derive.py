"""Derivation: the symbolic gradients of a step graph.

From the local partial derivatives of every pointwise node (written through
stored forward values, so sigma' = sigma (1 - sigma)) and two fixed rules for a
matrix-vector node M = W v (adjoint: delta_v += W^T delta_M, gradient:
delta_W += delta_M v^T; tangent: dM = W dv + dW v), and one for a reduction over
units r = R(a), broadcast back (adjoint: delta_a += w sum_k delta_r[k]; tangent:
dr = sum_j w_j da_j, with the reduction's weight w = dr/da_j: 1/n for the mean,
symrnn.reductions), this module derives

* the reverse-mode (BPTT) adjoint of every value: a sum of terms
  ``partial * adjoint(consumer)`` and ``W^T adjoint(consumer)``
  (:meth:`Derivation.adjoint_terms`);
* the forward-mode (RTRL) tangent of every node (:meth:`Derivation.tangent_terms`);
* the sensitivity recursions of every state with respect to every parameter
  as the seeds write them (:meth:`Derivation.sensitivity`), e.g. for seed 002
  dh^t/db = sigma'(a^t) [v dh^{t-1}/db + 1], with initial condition
  dh^{-1}/db = 0.

Both gradient programs are generated from these same objects; that they agree
to rounding, and with finite differences, is tested.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import sympy

from .ir import MatVecNode, Pointwise, Reduction, StepGraph, rule

__all__ = ["Derivation", "derive", "Sensitivity"]


@dataclass(frozen=True)
class Sensitivity:
    """ds^t_l / d theta as the seeds write it, per unit l of state s.

    ``rhs`` is in the stored forward values at t, the sensitivities at t-1
    (``Indexed`` objects ``ds_prev_dtheta[m, ...]``) and, for a matrix entry
    theta = W[i, j], Kronecker deltas.  ``initial`` is the value at t = -1.
    """

    state: str
    param: str
    lhs: sympy.Expr
    rhs: sympy.Expr
    initial: sympy.Expr
    indices: tuple[sympy.Symbol, ...]


@dataclass(frozen=True)
class Derivation:
    graph: StepGraph

    # -- local derivatives ---------------------------------------------------
    @cached_property
    def partials(self) -> dict[str, tuple[tuple[str, sympy.Expr], ...]]:
        """Node -> ((dependency, d node / d dependency), ...), non-zero only, for each node
        with local partial derivatives (a matrix-vector node has none: its rules are linear)."""
        out = {}
        for node in self.graph.nodes:
            partials = rule(PARTIALS, node, "local partial")(node)
            if partials is not None:
                out[node.name] = partials
        return out

    def partial(self, node: str, dep: str) -> sympy.Expr:
        return dict(self.partials.get(node, ())).get(dep, sympy.Integer(0))

    @cached_property
    def loss_partials(self) -> tuple[tuple[str, sympy.Expr], ...]:
        """(output, d L^t / d output) per unit, before the reduction over time."""
        loss = self.graph.loss
        if loss is None:
            return ()
        out = []
        for name in self.graph.outputs:
            p = sympy.diff(loss.expr, sympy.Symbol(name))
            if p != 0:
                out.append((name, p))
        return tuple(out)

    # -- reverse mode ------------------------------------------------------------
    def adjoint_terms(self, name: str) -> tuple[tuple[str, object], ...]:
        """Terms of adjoint(name) within one step: ``(consumer, coefficient)`` for a
        pointwise consumer (adjoint += coefficient * adjoint(consumer)), and
        ``(consumer, MatVecNode)`` for a matrix-vector consumer (adjoint += W^T adjoint)."""
        return tuple(term for c in self.graph.consumers(name) for term in rule(ADJOINT, c, "adjoint")(self, c, name))

    # -- forward mode ------------------------------------------------------------
    def tangent_terms(self, node: str) -> tuple[tuple[str, object], ...]:
        """Terms of the tangent of a pointwise node: (dependency, coefficient)."""
        return self.partials[node]

    def sensitivity(self, state: str, param: str) -> Sensitivity:
        """The sensitivity recursion of ``state`` w.r.t. parameter ``param`` (seed form)."""
        return _sensitivity(self, state, param)

    @cached_property
    def stored_values(self) -> tuple[str, ...]:
        """Forward values the backward pass reads (sorted): those in any partial
        derivative and every matrix-vector operand."""
        names = set()
        for terms in self.partials.values():
            for _, p in terms:
                names |= {s.name for s in p.free_symbols}
        for node in self.graph.nodes:
            names |= set(rule(OPERANDS_READ, node, "stored operand")(node))
        return tuple(sorted(names))


def derive(graph: StepGraph) -> Derivation:
    """The second stage of the pipeline: StepGraph -> Derivation."""
    return Derivation(graph)


def _pointwise_adjoint(der: Derivation, consumer: Pointwise, name: str) -> tuple:
    p = der.partial(consumer.name, name)
    return ((consumer.name, p),) if p != 0 else ()


def _reduction_read(node: Reduction) -> tuple[str, ...]:
    """What a reduction's adjoint reads: its weight's values (logsumexp: operand and result)."""
    return tuple(sorted(s.name for s in sympy.sympify(node.weight()).free_symbols if s.name in (node.operand, node.name)))


#: the rules of each node kind (ir.NODE_KINDS): local partials (None: linear rules instead),
#: the terms a consumer adds to an adjoint (a matrix-vector product's W^T delta, a
#: reduction's weight * sum_k delta[k]: the consumer itself stands for the rule), the
#: operands backward reads
PARTIALS = {Pointwise: lambda node: local_partials(node), MatVecNode: lambda node: None, Reduction: lambda node: None}
ADJOINT = {Pointwise: _pointwise_adjoint, MatVecNode: lambda der, consumer, name: ((consumer.name, consumer),),
           Reduction: lambda der, consumer, name: ((consumer.name, consumer),)}
OPERANDS_READ = {Pointwise: lambda node: (), MatVecNode: lambda node: (node.operand,), Reduction: _reduction_read}


def local_partials(node: Pointwise) -> tuple[tuple[str, sympy.Expr], ...]:
    """d node / d dep for each dependency, through the node's own value for ops."""
    if node.op is not None:
        arg = node.expr.args[0]
        outer = node.op.derivative(sympy.Symbol(node.name), arg)
    else:
        outer, arg = sympy.Integer(1), node.expr
    out = []
    for dep in node.deps:
        p = outer * sympy.diff(arg, sympy.Symbol(dep))
        if p != 0:
            out.append((dep, p))
    return tuple(out)


# -- seed-form sensitivity recursions ---------------------------------------------
_l, _i, _j = sympy.symbols("l i j", integer=True)


def sensitivity_name(state: str, param: str, prev: bool = False) -> str:
    """The name of the array of d state / d param in a sensitivity recursion (``prev``: of
    the state at the step before)."""
    return f"d{state}{'_prev' if prev else ''}_d{param}"


def _sensitivity(der: Derivation, state: str, param: str) -> Sensitivity:
    """Per-unit forward-mode recursion: every vector value is indexed by its unit
    (``s[l]``), a matrix-vector product becomes a sum over a fresh index."""
    g = der.graph
    decl = g.param(param)
    idx: tuple[sympy.Symbol, ...] = {"scalar": (), "vector": (_i,), "matrix": (_i, _j)}[decl.kind]
    sens_prev = {s.prev: sympy.IndexedBase(sensitivity_name(s.name, param, prev=True)) for s in g.states}
    dummies = iter(sympy.numbered_symbols("m", integer=True, start=1))

    def at(expr: sympy.Expr, unit: sympy.Expr) -> sympy.Expr:
        """Index every vector value of a per-unit expression at ``unit``."""
        table = {sym: sympy.IndexedBase(sym.name)[unit] for sym in expr.free_symbols if g.size(sym.name) is not None}
        return expr.xreplace(table)

    memo: dict[str, sympy.Expr] = {}  # a node's tangent at the unit ``probe``
    probe = sympy.Dummy("unit")

    def tan(name: str, unit: sympy.Expr) -> sympy.Expr:
        """The tangent of ``name`` at ``unit``; a node's is derived once and re-indexed (its
        summation indices are bound, drawn before any sum that holds it)."""
        if g.is_leaf(name) or name in sens_prev:
            return tan_at(name, unit)
        if name not in memo:
            memo[name] = tan_at(name, probe)
        return memo[name].xreplace({probe: unit})

    def tan_at(name: str, unit: sympy.Expr) -> sympy.Expr:
        if name in sens_prev:
            return sens_prev[name][(unit, *idx)] if idx else sens_prev[name][unit]
        if g.is_leaf(name):
            leaf = g.leaf(name)
            if leaf.kind == "param" and leaf.param == param:
                if decl.kind == "scalar":
                    return sympy.Integer(1)
                offset = leaf.block * leaf.size if leaf.block is not None else 0
                return sympy.KroneckerDelta(unit + offset, _i)
            return sympy.Integer(0)
        node = g.node(name)
        return rule({Pointwise: pointwise, MatVecNode: matvec, Reduction: reduction}, node, "sensitivity")(node, unit)

    def pointwise(node: Pointwise, unit: sympy.Expr) -> sympy.Expr:
        return sympy.Add(*[at(p, unit) * tan(d, unit) for d, p in der.partials[node.name]])

    def matvec(node: MatVecNode, unit: sympy.Expr) -> sympy.Expr:
        w = sympy.IndexedBase(node.param.lower() if len(node.param) == 1 else node.param)
        row = unit + (node.block * node.size if node.block is not None else 0)
        col0 = node.cols[0]
        terms = []
        probe = sympy.Dummy("m")
        dv = tan(node.operand, probe)
        if dv != 0:  # a fresh summation index, drawn only when a sum is written
            m = next(dummies)
            dv = dv.xreplace({probe: m})
            entry = w[m + col0, unit] if node.transpose else w[row, m + col0]  # W.T @ v: sum_m W[m, l] v_m
            terms.append(sympy.Sum(entry * dv, (m, 0, g.size(node.operand) - 1)))
        for coeff, name, transposed in g.weight_terms(node):  # d(W v)_l / dW_ij = delta_li v_j; W.T: delta_lj v_i
            if name != param:
                continue
            if transposed:
                terms.append(coeff * sympy.KroneckerDelta(unit, _j) * sympy.IndexedBase(node.operand)[_i - col0])
            else:
                terms.append(coeff * sympy.KroneckerDelta(row, _i) * sympy.IndexedBase(node.operand)[_j - col0])
        return sympy.Add(*terms)

    def reduction(node: Reduction, unit: sympy.Expr) -> sympy.Expr:
        """The same at every unit: sum_m w_m d operand[m] over a fresh index."""
        probe = sympy.Dummy("m")
        da = tan(node.operand, probe)
        if da == 0:
            return sympy.Integer(0)
        m = next(dummies)
        w = node.weight()
        w = w.xreplace({sympy.Symbol(v): sympy.IndexedBase(v)[m] for v in (node.operand, node.name)})
        return sympy.Sum(w * da.xreplace({probe: m}), (m, 0, node.size - 1))

    lhs_base = sympy.IndexedBase(sensitivity_name(state, param))
    lhs = lhs_base[(_l, *idx)] if idx else lhs_base[_l]
    return Sensitivity(state, param, lhs, tan(state, _l), sympy.Integer(0), idx)
