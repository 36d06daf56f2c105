"""What every backend decides the same way, decided once: KernelPlan -> Schedule.

* **Shared adjoints.**  An input-side product (W_x x) whose consumers are exactly a
  recurrent product's (W_h h_prev), with the same partial derivatives, has the same
  adjoint at every step: the input side reads the recurrent GEMM's adjoint buffer
  instead of keeping a copy of its own.  Whole groups share when every member does
  (the LSTM's four gates); an input-side group whose members share one by one (the
  GRU's r and z, not its n) is *partially* shared.
* **Forward cache.**  What forward keeps for backward: the states, ``plan.stored``,
  and values of the input side or readout the derivation reads.
* **Variable lengths.**  With ``lengths`` (B integers in [0, T]) the cell is, by
  definition, h^t = m^t h_new^t + (1 - m^t) h^{t-1} with the mask m^t = [t < length]
  per row, and every output is m^t times its value (the final states are h^{T-1}).
  Steps at and beyond a row's length are a suffix of its steps, so the adjoint of
  every value there is 0 but the carried dL/dh^{T-1}; the kernels use that: at a held
  step they store 0 for each state of :attr:`Schedule.held` (its output, exactly),
  the next held step computes from that 0 (finite values, never read with a nonzero
  adjoint), the final states are read at each row's last step, and backward is the
  unmasked recursion with the outputs' cotangents masked and dL/d(final state)
  added at each row's last step.  Every backend does this the same way (the
  templates' contract helpers; the step kernels' stores); RTRL runs the definition
  (the carry) and checks it.
* **Common subexpressions.**  :func:`shared_subexpressions` places the temporaries
  of ``sympy.cse`` over a stage's adjoint statements, each just before the first
  statement that reads it, for every backend's printer.

A schedule is frozen data; backends read it and do not decide these again.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType

import sympy

from .ir import MatVecNode, Pointwise
from .plan import KernelPlan

__all__ = ["Schedule", "schedule", "shared_subexpressions"]


@dataclass(frozen=True)
class Schedule:
    plan: KernelPlan
    #: input-side group -> the loop group whose adjoint buffer holds its adjoints, member by member
    shared_groups: Mapping[str, str]
    #: input-side product -> the loop product with the same adjoint
    shared_members: Mapping[str, str]
    #: products of partially shared input-side groups -> (loop group, offset of the product there)
    member_source: Mapping[str, tuple]
    #: input-side groups some (not all) of whose members share
    partial_groups: tuple[str, ...]
    #: values (graph names) forward keeps over every step for backward, besides the states
    cached: tuple[str, ...]
    #: states whose step stores 0 at the steps at and beyond a row's length (lengths): all of them
    held: tuple[str, ...] = ()


def schedule(plan: KernelPlan) -> Schedule:
    """Decide, for every backend, what ``plan`` leaves open."""
    groups, members, source, partial = _shared_adjoints(plan)
    g, d = plan.graph, plan.derivation
    cached = set(plan.stored) | {name for name in d.stored_values if not g.is_leaf(name) and plan.region_of[name] != "loop"}
    return Schedule(plan, MappingProxyType(groups), MappingProxyType(members), MappingProxyType(source), tuple(partial),
                    tuple(n.name for n in g.nodes if n.name in cached), tuple(g.state_names))


def _shared_adjoints(plan: KernelPlan) -> tuple[dict, dict, dict, list]:
    g = plan.graph
    groups: dict[str, str] = {}
    members: dict[str, str] = {}
    source: dict[str, tuple] = {}
    partial: list[str] = []
    loop_groups = [grp for st in plan.loop.stages for grp in st.groups]
    for stage in plan.pre.stages:
        for pre in stage.groups:
            for rec in loop_groups:
                if len(pre.members) == len(rec.members) and all(
                    _same_adjoint(plan, a, b) for a, b in zip(pre.members, rec.members)
                ):
                    groups[pre.name] = rec.name
                    members.update({a.name: b.name for a, b in zip(pre.members, rec.members)})
                    break
            else:
                if pre.operand != g.input.name:
                    continue
                # member by member (GRU: r and z share, n keeps its own)
                for a in pre.members:
                    for rec in loop_groups:
                        for b, off in zip(rec.members, rec.offsets):
                            if a.name not in source and _same_adjoint(plan, a, b):
                                source[a.name] = (rec.name, off)
                                members[a.name] = b.name
                if any(a.name in source for a in pre.members):
                    partial.append(pre.name)
    return groups, members, source, partial


def _same_adjoint(plan: KernelPlan, a: MatVecNode, b: MatVecNode) -> bool:
    """Products with the same consumers, all pointwise in the loop, by the same partials."""
    g, d = plan.graph, plan.derivation
    consumers_a = {c.name for c in g.consumers(a.name)}
    if consumers_a != {c.name for c in g.consumers(b.name)} or sympy.simplify(a.size - b.size) != 0:
        return False
    loop = set(plan.loop.nodes)
    return consumers_a <= loop and all(
        isinstance(g.node(c), Pointwise) and d.partial(c, a.name) == d.partial(c, b.name) for c in consumers_a
    )


def shared_subexpressions(exprs: Iterable[sympy.Expr], symbols: Iterator[sympy.Symbol]) \
        -> list[tuple[list[tuple[sympy.Symbol, sympy.Expr]], sympy.Expr]]:
    """``sympy.cse`` over a stage's statements: for each expression, the temporaries to
    define just before it (a temporary before the first statement that reads it, after
    the temporaries it reads itself) and the expression over them.  Statements may read
    what the ones above them computed, so no temporary moves up past its first reader."""
    replacements, reduced = sympy.cse(list(exprs), symbols=symbols, order="none")
    definition = dict(replacements)
    position = {sym: i for i, (sym, _) in enumerate(replacements)}
    emitted: set[sympy.Symbol] = set()

    def place(expr: sympy.Expr, before: list) -> None:
        for sym in sorted(expr.free_symbols & definition.keys(), key=position.get):
            if sym not in emitted:
                place(definition[sym], before)
                emitted.add(sym)
                before.append((sym, definition[sym]))

    placed = []
    for expr in reduced:
        before: list = []
        place(expr, before)
        placed.append((before, expr))
    return placed
