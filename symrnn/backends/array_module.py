"""What the NumPy and CuPy modules share on their Python side: the namer, the
weight of a product (rows and columns of a parameter), and stacked weights."""

from __future__ import annotations

import sympy

from ..ir import MatVecNode, StepGraph
from ..naming import PYTHON_FIXED, Namer
from ..plan import GemmGroup, KernelPlan
from ..stmt import ALL, Assign, Concat, Ref
from .python_printer import span

__all__ = ["module_namer", "weight_ref", "group_weight"]


def module_namer(plan: KernelPlan) -> Namer:
    """The namer of a NumPy (or CuPy) module: every value of the step graph keeps its
    name where Python, the template and the other names allow; the input reads ``x``."""
    g = plan.graph
    values = [p.name for p in g.params] + [leaf.name for leaf in g.leaves if leaf.kind not in ("input", "target")]
    values += [n.name for n in g.nodes]
    return Namer(PYTHON_FIXED, dict.fromkeys(values), spellings={g.input.name: "x"})


def weight_ref(g: StepGraph, n: Namer, mv: MatVecNode, base: str | None = None) -> Ref:
    """The rows and columns of its parameter one product uses (of ``base``: the
    parameter's gradient, say)."""
    p = g.param(mv.param)
    base = base or n.value(mv.param)
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
