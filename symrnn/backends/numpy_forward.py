"""The forward pass of the NumPy module, as statements (symrnn.stmt).

Per region (``pre``: every step at once; ``loop``: step by step; ``post``: every
step at once) and stage: the GEMMs of the stage, then its pointwise nodes.  In the
loop, :class:`~symrnn.passes.loop_fusion.LoopFusion` turns a recurrent GEMM and its
consumers into one fused step (the ``fusion`` pass); a value with a stored buffer is
written straight into it (``in_place``); views of the input side's products that
nothing reads are dropped (``prune_views``).
"""

from __future__ import annotations

import sympy

from ..ir import Pointwise, Reduction
from ..ops import Op
from ..plan import GemmGroup
from ..passes.loop_fusion import LoopFusion, inplace_calls
from ..passes.prune_views import without_unread_views
from ..passes.unit_products import UNITS
from ..stmt import ETC, Assign, Attr, Call, Do, Helper, Key, MatMul, Ref, Reshape, Size, Span, Text, empty, span, t_SYM

__all__ = ["emit_forward"]


# -- the forward function --------------------------------------------------------------------
def gemm_forward(e, group: GemmGroup, ctx: str, out: list) -> None:
    """A stage's GEMM (not fused): one step's product, or every step's at once."""
    n = e.n
    operand = e.ref_of(group.operand, ctx)
    labels = ", ".join(mv.name for mv in group.members)
    if ctx == "loop":
        product = Call("dot", (operand, Ref(e.transposed(group))))
    else:  # once for every step: W's transposed view (a copy would cost more than it saves)
        product = Reshape(MatMul(Reshape(operand, e.g.size(group.operand)), e.weights[group.name].t), group.rows, steps=True)
    value = (lambda name: Ref(n.value(name))) if ctx == "loop" else (lambda name: Ref(n("seq", name)))
    if len(group.members) == 1:
        out.append(Assign(value(group.members[0].name), product, labels))
    else:
        whole = Ref(n("group", group.name) if ctx == "loop" else n("gseq", group.name))
        out.append(Assign(whole, product, labels))
        for mv, off in zip(group.members, group.offsets):
            out.append(Assign(value(mv.name), Ref(whole.name, (ETC, span(off, mv.size)))))
    if ctx == "loop":
        out.extend(Assign(Ref(n("seq", mv.name), (t_SYM,)), Ref(n.value(mv.name))) for mv in group.members
                   if mv.name in e.plan.stored)


def pointwise_forward(e, node: Pointwise, expr: sympy.Expr, fused: LoopFusion, out: list) -> None:
    """One step of a pointwise node, written straight into its stored buffer where it has one."""
    g, plan, n = e.g, e.plan, e.n
    refs = fused.slot_refs
    label = e.label(node)
    name = Ref(n.value(node.name))
    if node.name in g.state_names:
        dest = Ref(n("seq", node.name), (t_SYM + 1,))
    elif node.name in plan.stored:
        dest = Ref(n("seq", node.name), (t_SYM,))
    else:
        out.append(Assign(name, full_width(e, node, e.ew(expr, "loop", refs), "loop"), label))
        return
    if "in_place" not in e.passes:
        out.append(Assign(name, full_width(e, node, e.ew(expr, "loop", refs), "loop"), label))
        out.append(Assign(dest, name))
        return
    ufunc = {sympy.Add: "add", sympy.Mul: "multiply"}.get(type(expr))
    if ufunc and len(expr.args) >= 2:
        first, rest = expr.args[0], expr.func(*expr.args[1:])
        out.append(Assign(name, dest))
        out.append(Do(Call(ufunc, (e.ew(first, "loop", refs), e.ew(rest, "loop", refs)), (("out", name),)), name, label))
    elif isinstance(expr, Op) and type(expr).numpy_inplace:  # its ufunc calls, into the buffer
        out.append(Assign(name, dest))
        out.extend(inplace_calls(type(expr), e.ew(expr.args[0], "loop", refs), name, label))
    else:
        out.append(Assign(name, full_width(e, node, e.ew(expr, "loop", refs), "loop"), label))
        out.append(Assign(dest, name))


def reduction_value(e, node: Reduction, ctx: str, refs: dict | None = None):
    """``reduce(a)`` over the unit axis, kept as an axis of length 1 (one value per row,
    broadcast by NumPy where it is used), or broadcast back to ``a``'s shape (a view: no
    copy) where the value needs its full width (a matrix-vector operand)."""
    if node.operand in e.compact:  # one value per row: reduced at its full width (a sum of n equal units)
        steps = (Text("T"), Text("B")) if ctx == "all" else (Text("B"),)
        whole = Call("broadcast_to", (e.ew(sympy.Symbol(node.operand), ctx, refs), (*steps, Size(node.size))))
        refs = {**(refs or {}), node.operand: whole}
    if "unit_products" in e.passes and node.reduce in UNITS and node.operand not in e.compact:
        value = Helper(UNITS[node.reduce], (e.ew(sympy.Symbol(node.operand), ctx, refs),))  # a product with ones
    else:
        value = e.ew(node.reduce(sympy.Symbol(node.operand)), ctx, refs)
    if node.name in e.compact:
        return value
    return Call("broadcast_to", (value, Attr(e.ew(sympy.Symbol(node.operand), ctx, refs), "shape")))


def full_width(e, node, value, ctx: str):
    """A value of reductions only that a state, readout or product needs at its full width."""
    if node.name not in e.uniform or node.name in e.compact or isinstance(node, Reduction):
        return value
    steps = (Text("T"), Text("B")) if ctx == "all" else (Text("B"),)
    return Call("broadcast_to", (value, (*steps, Size(node.size))))


def reduction_forward(e, node: Reduction, ctx: str, fused: LoopFusion, out: list) -> None:
    """One reduction over units: every step at once (``ctx`` 'all'), or one step of the loop."""
    n, label = e.n, e.label(node)
    if ctx == "all":
        out.append(Assign(Ref(n("seq", node.name)), reduction_value(e, node, ctx), label))
        return
    out.append(Assign(Ref(n.value(node.name)), reduction_value(e, node, ctx, fused.slot_refs), label))
    if node.name in e.plan.stored:
        out.append(Assign(Ref(n("seq", node.name), (t_SYM,)), Ref(n.value(node.name))))


def emit_forward(e) -> None:
    """Fill the emitter's forward sections (``e.m``) with statements."""
    m, g, plan, n = e.m, e.g, e.plan, e.n
    # values that do not change over time (computed from parameters only, e.g.
    # sigmoid(b)): broadcast to (T, B, size) like every other value of a region
    constant = {leaf.name for leaf in g.leaves if leaf.kind == "param"}
    for node in g.nodes:
        if isinstance(node, Pointwise) and all(d in constant for d in node.deps):
            constant.add(node.name)
    fused = LoopFusion(e)
    for ctx, region, out in (("all", plan.pre, m.forward_pre), ("loop", plan.loop, m.forward_loop), ("all", plan.post, m.forward_post)):
        for stage in region.stages:
            for group in stage.groups:
                if ctx == "loop" and group.name in fused.groups:
                    fused.gemm(group, out)
                else:
                    gemm_forward(e, group, ctx, out)
            if region is plan.pre:
                out.extend(fused.pre_lines if stage is region.stages[-1] else [])
            for node in stage.reductions:
                reduction_forward(e, node, ctx, fused, out)
            for node in stage.pointwise:
                seq = Ref(n("seq", node.name))
                if ctx == "all" and node.name in constant:
                    shape = (Text("T"), Text("B"), Size(node.size))
                    out.append(Assign(seq, Call("broadcast_to", (e.ew(node.expr, ctx), shape)), e.label(node)))
                elif ctx == "all":
                    out.append(Assign(seq, full_width(e, node, e.ew(node.expr, ctx), ctx), e.label(node)))
                elif node.name not in fused.computed:
                    pointwise_forward(e, node, fused.expr(node), fused, out)
    for s in g.states:
        m.forward_alloc.append(Assign(Ref(n("seq", s.name)), empty(Text("T + 1"), Text("B"), Size(s.size))))
        m.forward_alloc.append(Assign(Ref(n("seq", s.name), (sympy.Integer(0),)), Ref("state0", (Key(s.name),))))
    m.forward_alloc.extend(fused.alloc_lines)
    for name in plan.stored:
        if name not in fused.views:  # a value of reductions only: one per row
            width = sympy.Integer(1) if name in e.compact else g.node(name).size
            m.forward_alloc.append(Assign(Ref(n("seq", name)), empty(Text("T"), Text("B"), Size(width))))
    m.forward_alloc.extend(fused.view_lines)
    if plan.loop.stages:
        m.forward_loop[:0] = [Assign(Ref(n.value(s.prev)), Ref(n("seq", s.name), (t_SYM,))) for s in g.states]
    m.outputs = [(s.name, Ref(n("seq", s.name), (Span(1, None),))) for s in g.states] + [(r, Ref(n("seq", r))) for r in g.readouts]
    m.finals = [(s.name, Ref(n("seq", s.name))) for s in g.states]
    # lengths (symrnn.schedule): a held row's state is 0 after its step (its output; the final state is read
    # at its last step)
    m.forward_hold = [Do(Call("copyto", (Ref(n("seq", s), (t_SYM + 1,)), Text("0")), (("where", Ref("hold", (t_SYM,))),)),
                         Ref(n("seq", s)), "the rows past their length") for s in e.schedule.held]
    m.cache_names = sorted(_cache(e))
    if "prune_views" in e.passes:
        m.forward_pre = without_unread_views(m.forward_pre, [*m.forward_loop, *m.forward_post, *fused.pre_lines],
                                         {ref.name for _, ref in m.outputs} | set(m.cache_names))


def _cache(e) -> set[str]:
    """What backward reads of forward: the states, the stored values, the stacked weights."""
    n = e.n
    return {n("seq", s.name) for s in e.g.states} | {n("seq", name) for name in e.schedule.cached} | e.stacked
