"""The kernel plan: what runs where, independent of the backend.

* **Regions.**  ``pre``: nodes that read no state (the input projection of all
  time steps, one GEMM before the loop); ``loop``: nodes on the recurrence,
  computed step by step; ``post``: nodes that read the states but do not feed
  them back (the readout, one GEMM over all steps after the loop).
* **Stages.**  Within a region, stage k runs its GEMMs, then its pointwise
  nodes; a GEMM whose operand is computed in the same step (the seeds' GRU
  multiplies r * h_prev) waits for the stage before it.  Per step, most cells
  have one stage: one recurrent GEMM and one fused pointwise pass.
* **Widths.**  Before and after the loop, a stage's values of two widths (two readouts,
  ``tanh(V @ h)`` and ``h * s``) are two stages, the GEMMs in the first: values of two
  widths cannot read each other elementwise, and a kernel runs over one width's units.
* **Reductions.**  A reduction over units (``mean(a)``) waits, like a GEMM, for an
  operand computed in the same step: it runs at the start of the next stage, after
  the stage's GEMMs and before its pointwise nodes (a stage boundary: every unit of
  the operand is known before any is reduced).
* **Stacking.**  Matrix-vector nodes of one stage that multiply the same
  vector form one GEMM with their weights stacked row-wise, ordered by
  parameter and row block; when the stack is exactly one declared parameter
  (PyTorch's ``weight_hh_l0``), it is used as it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import sympy

from .derive import Derivation
from .errors import CellError
from .ir import MatVecNode, Pointwise, Reduction, StepGraph, rule

__all__ = ["GemmGroup", "KernelPlan", "Region", "Stage", "plan"]


@dataclass(frozen=True)
class GemmGroup:
    """Matrix-vector nodes of one stage that multiply the same operand.

    ``name`` identifies the group in the plan: ``<operand>_proj``, numbered when one
    operand is multiplied in several stages or regions (a state in the step and in the
    readout)."""

    name: str
    operand: str
    members: tuple[MatVecNode, ...]
    offsets: tuple[sympy.Expr, ...]  # row offset of each member in the stacked product
    rows: sympy.Expr
    whole_param: str | None  # the declared parameter this stack is, if any


@dataclass(frozen=True)
class Stage:
    groups: tuple[GemmGroup, ...]
    pointwise: tuple[Pointwise, ...]
    reductions: tuple[Reduction, ...] = ()  # after the GEMMs, before the pointwise nodes

    @property
    def matvecs(self) -> tuple[MatVecNode, ...]:
        return tuple(m for g in self.groups for m in g.members)


@dataclass(frozen=True)
class Region:
    name: str  # "pre", "loop" or "post"
    stages: tuple[Stage, ...]

    @property
    def nodes(self) -> tuple[str, ...]:
        return tuple(n.name for s in self.stages for n in (*s.matvecs, *s.reductions, *s.pointwise))


@dataclass(frozen=True)
class KernelPlan:
    graph: StepGraph
    derivation: Derivation
    pre: Region
    loop: Region
    post: Region

    @property
    def regions(self) -> tuple[Region, Region, Region]:
        return (self.pre, self.loop, self.post)

    @cached_property
    def region_of(self) -> dict[str, str]:
        return {n: r.name for r in self.regions for n in r.nodes}

    @cached_property
    def stored(self) -> tuple[str, ...]:
        """Loop nodes kept for every step (besides the states): those the
        backward pass or the post region reads.  Sorted by node order."""
        need = set(self.derivation.stored_values)
        for name in self.post.nodes:
            need |= set(self.graph.node(name).deps)
        states = set(self.graph.state_names)
        return tuple(n for n in self.loop.nodes if n in need and n not in states)

    @cached_property
    def groups(self) -> dict[str, GemmGroup]:
        """Every GEMM group by name."""
        return {grp.name: grp for r in self.regions for st in r.stages for grp in st.groups}

    def group_of(self, member: str) -> tuple[GemmGroup, sympy.Expr]:
        """The group of a product, and the product's row offset in it."""
        for grp in self.groups.values():
            for mv, off in zip(grp.members, grp.offsets):
                if mv.name == member:
                    return grp, off
        raise KeyError(member)


def plan(derivation: Derivation) -> KernelPlan:
    """The third stage of the pipeline: Derivation -> KernelPlan."""
    g = derivation.graph
    states = set(g.state_names)
    recurrent: set[str] = {s.prev for s in g.states}
    for n in g.nodes:
        if n.name in states or any(d in recurrent for d in n.deps):
            recurrent.add(n.name)
    feeds: set[str] = set(states)  # nodes the next states depend on
    for n in reversed(g.nodes):
        if n.name in feeds:
            feeds |= {d for d in n.deps if not g.is_leaf(d)}
    region: dict[str, str] = {}
    for n in g.nodes:
        if n.name not in recurrent:
            region[n.name] = "pre"
        elif n.name in feeds:
            region[n.name] = "loop"
        else:
            region[n.name] = "post"
            for d in n.deps:
                if g.is_leaf(d) and g.leaf(d).kind == "prev_state":
                    raise CellError(g.cell, f"readout '{n.name}'", f"reads '{d}'; a readout can read the new states only")
    names: set[str] = set()  # group names taken so far
    return KernelPlan(
        g, derivation, *(_region(g, name, [n for n in g.nodes if region[n.name] == name], names)
                         for name in ("pre", "loop", "post"))
    )


def _region(g: StepGraph, name: str, nodes: list, names: set[str]) -> Region:
    inside = {n.name for n in nodes}
    level: dict[str, int] = {}
    for n in nodes:
        deps = [level[d] for d in n.deps if d in inside]
        level[n.name] = rule(LEVEL, n, "stage")(deps)
    stages = []
    for k in range(max(level.values(), default=-1) + 1):
        parts: dict[str, list] = {"matvec": [], "reduction": [], "pointwise": []}
        for n in nodes:
            if level[n.name] == k:
                parts[rule(PART, n, "stage part")].append(n)
        groups = _groups(g, parts["matvec"], names)
        stages.extend(_by_width(groups, parts["pointwise"], parts["reduction"]) if name != "loop" else
                      [Stage(groups, tuple(parts["pointwise"]), tuple(parts["reduction"]))])
    return Region(name, tuple(stages))


def _by_width(groups: tuple[GemmGroup, ...], pointwise: list, reductions: list) -> list[Stage]:
    """A stage before or after the loop as one stage per width of its values (two readouts,
    ``tanh(V @ h)`` and ``h * s``): values of two widths cannot read each other elementwise,
    and a kernel backend runs a stage's values as one kernel over their units.  The GEMMs run
    in the first."""
    widths: list = []
    for n in (*reductions, *pointwise):
        if n.size not in widths:
            widths.append(n.size)
    if len(widths) <= 1:
        return [Stage(groups, tuple(pointwise), tuple(reductions))]
    return [Stage(groups if i == 0 else (), tuple(n for n in pointwise if n.size == w), tuple(r for r in reductions if r.size == w))
            for i, w in enumerate(widths)]


#: the rules of each node kind (ir.NODE_KINDS): its stage from its dependencies' (a
#: matrix-vector product or a reduction waits for an operand computed in the step: the
#: next stage), and which part of a stage holds it
LEVEL = {MatVecNode: lambda deps: deps[0] + 1 if deps else 0, Pointwise: lambda deps: max(deps, default=0),
         Reduction: lambda deps: deps[0] + 1 if deps else 0}
PART = {MatVecNode: "matvec", Pointwise: "pointwise", Reduction: "reduction"}


def _groups(g: StepGraph, matvecs: list[MatVecNode], names: set[str]) -> tuple[GemmGroup, ...]:
    order = {p.name: i for i, p in enumerate(g.params + tuple(d.decl for d in g.derived))}
    by_operand: dict[str, list[MatVecNode]] = {}
    for m in matvecs:
        by_operand.setdefault(m.operand, []).append(m)
    groups = []
    for operand, members in by_operand.items():
        members.sort(key=lambda m: (order[m.param], m.transpose, m.block or 0, str(m.cols[0])))
        offsets, start = [], sympy.Integer(0)
        for m in members:
            offsets.append(start)
            start = start + m.size
        name, k = f"{operand}_proj", 2
        while name in names:
            name, k = f"{operand}_proj_{k}", k + 1
        names.add(name)
        groups.append(GemmGroup(name, operand, tuple(members), tuple(offsets), start, _whole(g, members)))
    return tuple(groups)


def _whole(g: StepGraph, members: list[MatVecNode]) -> str | None:
    """The parameter the stacked members are, exactly, if they are one."""
    if g.is_derived(members[0].param):  # formed once per call, not a parameter of the module
        return None
    p = g.param(members[0].param)
    blocks = [m.block or 0 for m in members]
    if any(m.param != p.name or m.transpose for m in members) or blocks != list(range(p.blocks)):
        return None
    if any(sympy.simplify(m.cols[0]) != 0 or sympy.simplify(m.cols[1] - p.shape[1]) != 0 for m in members):
        return None
    return p.name
