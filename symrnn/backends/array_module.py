"""What the NumPy and CuPy modules share on their Python side: the namer, the
weight of a product (rows and columns of a parameter), and stacked weights."""

from __future__ import annotations

import sympy

from ..ir import MatVecNode, StepGraph
from ..naming import PYTHON_FIXED, Namer
from ..plan import GemmGroup, KernelPlan
from ..stmt import ALL, Assign, Concat, Elementwise, ETC, Ref, Span, Update, span

__all__ = ["module_namer", "weight_ref", "group_weight", "weight_gradient", "derived_setup", "derived_gradient",
           "parameter_sums"]


def module_namer(plan: KernelPlan) -> Namer:
    """The namer of a NumPy (or CuPy) module: every value of the step graph keeps its
    name where Python, the template and the other names allow; the input reads ``x``."""
    g = plan.graph
    values = [p.name for p in g.params] + [d.name for d in g.derived]
    values += [leaf.name for leaf in g.leaves if leaf.kind not in ("input", "target")]
    values += [n.name for n in g.nodes]
    return Namer(PYTHON_FIXED, dict.fromkeys(values), spellings={g.input.name: "x"})


def weight_ref(g: StepGraph, n: Namer, mv: MatVecNode, base: str | None = None) -> Ref:
    """The rows and columns of its parameter one product uses (of ``base``: the
    parameter's gradient, say); transposed (``W[rows].T``) for ``W.T @ v``."""
    p = g.param(mv.param)
    base = base or n.value(mv.param)
    if g.is_derived(mv.param):  # a derived matrix is always used whole
        return Ref(base)
    if mv.transpose:  # W[cols].T: the product's columns are rows of W
        whole = sympy.simplify(mv.cols[0]) == 0 and sympy.simplify(mv.cols[1] - p.shape[0]) == 0
        return Ref(base, T=True) if whole else Ref(base, (span(mv.cols[0], mv.cols[1] - mv.cols[0]),), T=True)
    rows = ALL if mv.block is None else span(mv.block * mv.size, mv.size)
    full_cols = sympy.simplify(mv.cols[0]) == 0 and sympy.simplify(mv.cols[1] - p.shape[1]) == 0
    if full_cols:
        return Ref(base) if rows is ALL else Ref(base, (rows,))
    return Ref(base, (rows, span(mv.cols[0], mv.cols[1] - mv.cols[0])))


def group_weight(g: StepGraph, n: Namer, group: GemmGroup, stacks: list, stacked: set) -> Ref:
    """The weight of a group's product: a parameter, rows and columns of one, or the
    members' stacked (concatenated once per call into ``stacks``; ``stacked`` collects
    their names, which the cache keeps for backward)."""
    if group.whole_param:
        return Ref(n.value(group.whole_param))
    if len(group.members) == 1:
        return weight_ref(g, n, group.members[0])
    name = n.get(("stack", group.name), f"W_stack_{n.spelling(group.operand)}")
    stacked.add(name)
    parts = tuple(weight_ref(g, n, mv) for mv in group.members)
    stacks.append(Assign(Ref(name), Concat(parts, 0), f"stacked: one GEMM for {len(group.members)} products"))
    return Ref(name)


def weight_gradient(g: StepGraph, n: Namer, group: GemmGroup, grad, dW) -> list:
    """Statements adding ``dW`` (sum_t delta[t]^T operand[t], one GEMM for the group's
    stacked rows) into the gradients of the members' parameters (``grad``: a parameter's
    name -> its gradient's)."""
    if group.whole_param:
        return [Update(Ref(grad(group.whole_param)), "+", dW)]
    out = [Assign(Ref("dW_stack"), dW)]
    for mv, off in zip(group.members, group.offsets):
        part = Ref("dW_stack", (span(off, mv.size),))
        if g.is_derived(mv.param):
            out.extend(derived_gradient(g, mv, grad, part))
            continue
        target = weight_ref(g, n, mv, base=grad(mv.param))
        out.append(Update(target.t, "+", part.t) if mv.transpose else Update(target, "+", part))  # dW[rows] += dW_T.T
    return out


def derived_setup(g: StepGraph, n: Namer) -> list:
    """Each derived matrix formed from its parameters, once per call (``M_z = W - W.T``)."""
    out = []
    for d in g.derived:
        refs = tuple((f"_term{k}", Ref(n.value(p), T=transposed)) for k, (_, p, transposed) in enumerate(d.terms))
        expr = sympy.Add(*[c * sympy.Symbol(name) for (c, _, _), (name, _) in zip(d.terms, refs)])
        out.append(Assign(Ref(n.value(d.name)), Elementwise(expr, refs), "formed once: one product per step for the combination"))
    return out


def derived_gradient(g: StepGraph, mv: MatVecNode, grad, part: Ref) -> list:
    """``part`` (dL/dM of the derived matrix ``mv`` multiplies) into the gradients of the
    parameters M is made of: dP += c dM, or c dM^T for a transposed term (``grad``: a
    parameter's name -> its gradient's)."""
    out = []
    for coeff, param, transposed in g.weight_terms(mv):
        dM = part.t if transposed else part
        if abs(coeff) == 1:
            out.append(Update(Ref(grad(param)), "+" if coeff > 0 else "-", dM))
        else:
            out.append(Update(Ref(grad(param)), "+", Elementwise(coeff * sympy.Symbol("_dM"), (("_dM", dM),))))
    return out


def parameter_sums(sums: list[tuple[Ref, str, Span | None, bool]], n: Namer, total, over_rows, comment: str = "",
                   summed: frozenset[str] = frozenset()) -> list:
    """Gradients of elementwise parameters from the adjoint buffers that hold theirs.

    ``sums``: (gradient, buffer over every step, the columns of the buffer that hold the
    parameter's adjoint (None: all), scalar?).  A scalar's gradient is the sum of its
    columns; a vector's, its columns of one reduction over the steps and the batch per
    buffer, shared by every parameter that reads it (PyTorch's two biases get the same
    sum).  ``total(value)`` spells a sum of every entry, ``over_rows(buffer)`` a sum over
    the steps and the batch; a buffer in ``summed`` is that sum already (a kernel's accumulator)."""
    lines, totals = [], {}
    for grad, buf, cols, scalar in sums:
        if scalar:
            lines.append(Update(grad, "+", total(Ref(buf, (ETC, cols)) if cols is not None else Ref(buf))))
            continue
        if buf in summed:
            totals[buf] = buf
        elif buf not in totals:
            totals[buf] = n.fresh(f"{buf.removesuffix('_seq')}_sum")
            lines.append(Assign(Ref(totals[buf]), over_rows(Ref(buf)), comment))
        lines.append(Update(grad, "+", Ref(totals[buf], (cols,)) if cols is not None else Ref(totals[buf])))
    return lines
