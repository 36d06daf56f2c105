"""RTRL in the NumPy module: the forward-mode sensitivity recursion, as statements.

Tangents of every value w.r.t. every parameter, initial state and input entry:
the directions are stacked on a leading axis of length K (the parameters in
declaration order, then each initial state, then x: T * n_in entries), and
``J_q`` has shape (K, B, size of q).  One step of a node is its value and its
tangent (:data:`RULES`, by node kind); the gradients are the tangents contracted
with the cotangents of the outputs (``G``).
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy

from ..ir import MatVecNode, Pointwise, Reduction, rule
from ..stmt import (
    ALL, NEW, Assign, Attr, Call, Comment, Dict, Do, Elementwise, Helper, If, Index, Infix, Key, MatMul, Method, Paren, Ref, Size, Span,
    Text, Update, t_SYM,
)

__all__ = ["emit_rtrl", "RULES"]


@dataclass
class Context:
    refs: dict  # graph name -> its array at step t
    x_slab: object  # the first tangent direction of x[t]
    constant: set[str]  # values of the parameters alone (broadcast over the batch)


def emit_rtrl(e) -> tuple[list, list, list, list, list]:
    """(setup, loop body, carry, cotangents, gradients) of ``_rtrl`` for the emitter ``e``; the
    carry is the definition of lengths (symrnn.schedule): a held row keeps its state and tangent."""
    g, n = e.g, e.n
    J, o = (lambda name: Ref(n("tangent", name))), (lambda name: Ref(n("offset", name)))
    o_x = o(g.input.name)
    setup, prev = [], Text("0")
    for p in g.params:
        setup.append(Assign(o(p.name), prev))
        prev = Infix("+", (o(p.name), Attr(Ref(n.value(p.name)), "size")))
    for s in g.states:
        setup.append(Assign(Ref(n("offset0", s.name)), prev))
        prev = Infix("+", (Ref(n("offset0", s.name)), Size(s.size)))
    setup.append(Assign(o_x, prev))
    setup.append(Assign(Ref("K"), Infix("+", (o_x, Text("T * n_in")))))
    for s in g.states:
        setup.append(Assign(Ref(n.value(s.name)), Ref("state0", (Key(s.name),))))
        setup.append(Assign(J(s.name), Call("zeros", ((Text("K"), Text("B"), Size(s.size)), Text("dtype")))))
        setup.append(Do(Helper("_add_diagonal", (J(s.name), Ref(n("offset0", s.name)), Text("1.0"))), J(s.name),
                        f"d{s.name}^(-1)/d{s.name}0 = I"))
    loop = [Assign((Ref(n.value(s.prev)), J(s.prev)), (Ref(n.value(s.name)), J(s.name))) for s in g.states]
    refs = {**e.refs("loop"), **{node.name: Ref(n.value(node.name)) for node in g.nodes}, g.input.name: Ref("x", (t_SYM,))}
    ctx = Context(refs, Infix("+", (o_x, Text("t * n_in"))), {leaf.name for leaf in g.leaves if leaf.kind == "param"})
    for node in g.nodes:
        loop.append(Comment(f"{node.name}  {e.label(node)}"))
        loop.extend(rule(RULES, node, "RTRL")(e, node, ctx))
    hold = Ref("hold", (t_SYM,))
    carry = [Assign(Ref(n.value(s.name)), Call("where", (hold, Ref(n.value(s.prev)), Ref(n.value(s.name))))) for s in g.states]
    carry += [Assign(J(s.name), Call("where", (hold, J(s.prev), J(s.name)))) for s in g.states]
    cot = [Assign(Ref("cot"), Helper("cotangent", (Text("t"), Dict(tuple((out, Ref(n.value(out))) for out in g.outputs)))))]
    for out in g.outputs:
        contract = Call("einsum", (Key("kbn,bn->kb"), J(out), Ref("cot", (Key(out),))))
        cot.append(If(out, "cot", (Update(Ref("G"), "+", contract),)))
    return setup, loop, carry, cot, _gradients(e, o, o_x)


def _gradients(e, o, o_x) -> list:
    g, n = e.g, e.n
    G = lambda lo, hi: Ref("G", (Span(lo, hi),))  # noqa: E731
    grads = []
    for p in g.params:
        W = Ref(n.value(p.name))
        rows = G(o(p.name), Infix("+", (o(p.name), Attr(W, "size"))))
        grads.append((p.name, Method(Method(rows, "sum", kwargs=(("axis", Text("1")),)), "reshape", (Attr(W, "shape"),))))
    grads.append(("x", Method(Method(Ref("G", (Span(o_x, None),)), "reshape", (Text("T"), Text("n_in"), Text("B"))),
                              "transpose", (Text("0"), Text("2"), Text("1")))))
    for s in g.states:
        start = Ref(n("offset0", s.name))
        grads.append((f"{s.name}0", Attr(G(start, Infix("+", (start, Size(s.size)))), "T")))
    return grads


def _pointwise(e, node: Pointwise, ctx: Context) -> list:
    """One step of a pointwise node and its tangent: J_q = sum_d (dq/dd) J_d, plus the
    direct dependencies on parameter and input entries."""
    g, n = e.g, e.n
    J, o = (lambda name: Ref(n("tangent", name))), (lambda name: Ref(n("offset", name)))
    value = e.ew(node.expr, "loop", ctx.refs)
    if all(dep in ctx.constant for dep in node.deps):  # the same for every row: a (B, size) view
        ctx.constant.add(node.name)
        value = Call("broadcast_to", (value, (Text("B"), Size(node.size))))
    stmts = [Assign(Ref(n.value(node.name)), value)]
    tangent, direct = [], []
    for dep, coeff in e.d.tangent_terms(node.name):
        leaf = g.leaf(dep) if g.is_leaf(dep) else None
        c = e.ew(coeff, "loop", ctx.refs)
        if leaf is None or leaf.kind == "prev_state":
            tangent.append(J(dep) if coeff == 1 else Infix("*", (Paren(c), J(dep))))
        elif leaf.kind == "input":
            direct.append(Do(Helper("_add_diagonal", (J(node.name), ctx.x_slab, c)), J(node.name)))
        elif g.param(leaf.param).kind == "scalar":
            direct.append(Update(Ref(n("tangent", node.name), (o(leaf.param),)), "+", c))
        else:
            offset = o(leaf.param) if not leaf.block else Infix("+", (o(leaf.param), Size(leaf.block * leaf.size)))
            direct.append(Do(Helper("_add_diagonal", (J(node.name), offset, c)), J(node.name)))
    if not tangent:
        rhs = Call("zeros", ((Text("K"), Text("B"), Size(node.size)), Text("dtype")))
    elif len(tangent) == 1 and isinstance(tangent[0], Ref) and direct:  # J_q itself: a copy to add into
        rhs = Method(tangent[0], "copy")
    else:
        rhs = Infix("+", tuple(tangent))
    return [*stmts, Assign(J(node.name), rhs), *direct]


def _matvec(e, node: MatVecNode, ctx: Context) -> list:
    """One step of a matrix-vector node and its tangent: W dv + dW v."""
    g, n = e.g, e.n
    J, o = (lambda name: Ref(n("tangent", name))), (lambda name: Ref(n("offset", name)))
    w = e.weight_ref(node)
    operand = ctx.refs.get(node.operand) or Ref(n.value(node.operand))
    stmts = [Assign(Ref(n.value(node.name)), MatMul(operand, w.t))]
    if node.operand == g.input.name:
        stmts.append(Assign(J(node.name), Call("zeros", ((Text("K"), Text("B"), Size(node.size)), Text("dtype")))))
        slab = Span(ctx.x_slab, Infix("+", (ctx.x_slab, Text("n_in"))))
        stmts.append(Update(Ref(n("tangent", node.name), (slab,)), "+", Index(w.t, (ALL, NEW, ALL))))
    else:
        stmts.append(Assign(J(node.name), MatMul(J(node.operand), w.t)))
    row0 = Size(node.block * node.size if node.block else sympy.Integer(0))
    for coeff, param, transposed in g.weight_terms(node):  # a derived matrix: c dP v for each of its terms
        shape = Attr(Ref(n.value(param)), "shape")
        v = operand if coeff == 1 else Elementwise(coeff * sympy.Symbol("_v"), (("_v", operand),))
        if transposed:  # d(W[cols].T @ v)_i / dW[cols_0 + c, i] = v_c
            stmts.append(Do(Helper("_add_matrix_t", (J(node.name), o(param), shape, Size(node.cols[0]), v)), J(node.name)))
        else:
            stmts.append(Do(Helper("_add_matrix", (J(node.name), o(param), shape, row0, Size(node.cols[0]), v)),
                            J(node.name)))
    return stmts


def _reduction(e, node: Reduction, ctx: Context) -> list:
    """One step of a reduction over units and its tangent: J_r = sum_j w_j J_a[..., j], the
    same at every unit (broadcast views; symrnn.reductions for the weight w)."""
    n = e.n
    J = lambda name: Ref(n("tangent", name))  # noqa: E731
    refs = {**ctx.refs, node.name: Ref(n.value(node.name))}
    a = sympy.Symbol(node.operand)
    value = Call("broadcast_to", (e.ew(node.reduce(a), "loop", refs), Attr(e.ew(a, "loop", refs), "shape")))
    weighted = Infix("*", (Paren(e.ew(node.weight(), "loop", refs)), J(node.operand)))
    tangent = Call("sum", (weighted,), (("axis", Text("-1")), ("keepdims", Text("True"))))
    return [Assign(Ref(n.value(node.name)), value),
            Assign(J(node.name), Call("broadcast_to", (tangent, Attr(J(node.operand), "shape"))))]


#: RTRL's step of each node kind (ir.NODE_KINDS)
RULES = {Pointwise: _pointwise, MatVecNode: _matvec, Reduction: _reduction}
