"""CuPy backend: a kernel plan -> fused CUDA kernels and the Python that launches them.

Python computes every statement and every line of CUDA here;
``templates/cupy_module.py.j2`` and ``templates/cuda_kernels.cu.j2`` lay them out.

Per time step (as haste and cuDNN do it): the input projection of all steps is
one cuBLAS GEMM before the loop; each step runs the recurrent GEMM(s) of a loop
stage, then ONE fused kernel for all of the stage's pointwise nodes, which also
writes what backward needs (``plan.stored``).  Backward runs, per step and
stage, one fused kernel for every adjoint of the stage, then the GEMM W^T delta;
weight gradients are one GEMM per stacked product after the loop, bias and
other elementwise-parameter gradients one deterministic ``cupy.sum`` over a
stored adjoint buffer (no atomics).  A cell whose recurrence has no GEMM
(``single_sigmoid``, IndRNN-like cells) gets one kernel that loops over time,
one thread per (batch, unit).

Each ``__global__`` kernel is a thin wrapper that computes its (row, unit)
index and calls a ``__host__ __device__`` function holding all of the math, so
the same source also compiles for the host (tests/test_cupy_host.py).

Naming follows the NumPy backend: ``f_seq`` holds f over all steps, ``d_f`` is
the adjoint of ``f``, ``d_W`` the gradient of parameter ``W``.  Two namers
(:mod:`symrnn.naming`) own every name: ``self.py`` the module's Python names,
``self.c`` the C++ names of the kernels (a value's local, an adjoint, a pointer).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import sympy

from ..cuda_printing import SCALAR, cuda_code, dim_code
from ..errors import CellError, InternalError
from ..ir import MatVecNode, Pointwise, rule
from ..naming import C_FIXED, Namer
from ..ops import Op
from ..plan import GemmGroup, KernelPlan, Stage
from .numpy_backend import _slice, dim, module_namer

__all__ = ["emit_cupy", "CupyModule", "Kernel"]

BLOCK = 256  # threads per block of every elementwise kernel


# -- kernels: plain data for the CUDA template ------------------------------------
@dataclass
class Kernel:
    """One fused elementwise kernel: rows x units threads (time loop: batch x units)."""

    name: str
    doc: str
    units: str  # C expression of the units per row
    py_units: str  # the same in Python
    mode: str  # "step" (one step, rows = B), "all" (every step, rows = T * B), "time" (loops over T)
    reverse: bool = False  # time mode: t runs from T - 1 down to 0
    params: list[tuple[str, str]] = field(default_factory=list)  # C pointer parameters: (qualifiers, name)
    py_args: list[str] = field(default_factory=list)  # Python expressions passed for them
    prologue: list[str] = field(default_factory=list)  # before the time loop (time mode)
    body: list[str] = field(default_factory=list)  # per element (per step in time mode)
    epilogue: list[str] = field(default_factory=list)  # after the time loop (time mode)

    @property
    def restrict(self) -> bool:
        return self.mode != "time"


class _Builder:
    """Collects a kernel's pointer arguments, loads, statements and stores."""

    def __init__(self, kernel: Kernel, c: Namer):
        self.k = kernel
        self.c = c  # the kernels' namer: a pointer never has the name of a local
        self.ptr_of: dict[str, str] = {}  # Python array expression -> C pointer name
        self.out: set[str] = set()
        self.loads: list[str] = []
        self.loaded: set[str] = set()
        self.stores: list[str] = []

    def ptr(self, py: str, out: bool) -> str:
        if py not in self.ptr_of:
            base = re.sub(r"\W+", "_", py).strip("_")
            key = ("ptr", py)  # the same array has the same pointer name in every kernel
            taken = self.c.taken(base) and self.c.owner(base) != key
            self.ptr_of[py] = self.c.get(key, base + "_ptr" if taken else base)
        if out:
            self.out.add(py)
        return self.ptr_of[py]

    def index(self, loc: "Loc") -> str:
        if loc.kind == "scalar":
            return "0"
        off = "" if sympy.sympify(loc.off, strict=True) == 0 else f"{dim_code(loc.off)} + "
        if loc.kind == "vec":
            return f"{off}unit_"
        ld = dim_code(loc.ld)
        ld = ld if re.fullmatch(r"\w+", ld) else f"({ld})"
        if self.k.mode == "time" or (loc.seq and self.k.mode == "step"):
            t = "t_" if self.k.mode == "time" else "step_"
            row = f"(({t} + {loc.shift}) * rows_ + row_)" if loc.shift else f"({t} * rows_ + row_)"
        else:
            row = "row_"
        return f"{row} * {ld} + {off}unit_"

    def load(self, local: str, loc: "Loc") -> None:
        if local in self.loaded:
            return
        self.loaded.add(local)
        self.loads.append(f"const {SCALAR} {local} = {self.ptr(loc.py, False)}[{self.index(loc)}];")

    def store(self, loc: "Loc", code: str, comment: str = "") -> None:
        self.stores.append(f"{self.ptr(loc.py, True)}[{self.index(loc)}] = {code};{comment}")

    def finish(self) -> Kernel:
        k = self.k
        for py, name in self.ptr_of.items():
            const = "" if py in self.out else "const "
            restrict = " __restrict__" if k.restrict else ""
            k.params.append((f"{const}{{}}*{restrict}", name))
            k.py_args.append(py)
        return k


@dataclass(frozen=True)
class Loc:
    """Where a kernel finds a value: a Python array expression and its layout."""

    py: str
    kind: str = "row"  # "row": [row, ld] (rows = B or T * B), "vec": per unit, "scalar"
    ld: sympy.Expr = sympy.Integer(1)
    off: sympy.Expr = sympy.Integer(0)
    seq: bool = False  # py holds every step (T, B, ld): one-step kernels read step ``step_`` of it
    shift: int = 0  # ... or step ``step_ + shift`` (a state's new value in its (T + 1, B, ld) array)


@dataclass
class CupyModule:
    """Plain data for the module template."""

    kernels: list[Kernel] = field(default_factory=list)
    ops: list[type[Op]] = field(default_factory=list)
    setup: list[str] = field(default_factory=list)
    stacks: list[str] = field(default_factory=list)
    forward: list[str] = field(default_factory=list)
    cache_names: list[str] = field(default_factory=list)
    outputs: list[tuple[str, str]] = field(default_factory=list)
    backward: list[str] = field(default_factory=list)
    grads: list[tuple[str, str]] = field(default_factory=list)
    generated_names: frozenset[str] = frozenset()  # every Python name the namer gave out
    generated_c_names: frozenset[str] = frozenset()  # ... and every C++ name


def emit_cupy(plan: KernelPlan) -> CupyModule:
    """The kernels and statements of the generated CuPy module for ``plan``."""
    return _Emitter(plan).run()


class _Emitter:
    def __init__(self, plan: KernelPlan):
        self.plan, self.g, self.d = plan, plan.graph, plan.derivation
        self.m = CupyModule()
        self.cell = self.g.cell
        self.weights: dict[str, str] = {}
        self.stacked: set[str] = set()
        self.values = {leaf.name for leaf in self.g.leaves} | {n.name for n in self.g.nodes}
        self.py = module_namer(plan)
        c_values = [leaf.name for leaf in self.g.leaves if leaf.kind != "target"] + [n.name for n in self.g.nodes]
        self.c = Namer(C_FIXED, c_values)
        self.c_names = {name: self.c.value(name) for name in c_values}  # graph name -> its kernel local
        self.time_mode = bool(self.plan.loop.stages) and not any(s.groups for s in self.plan.loop.stages)
        self.check()
        self.keep = self.forward_kept()

    # -- what this backend supports ----------------------------------------------
    def unsupported(self, what: str) -> CellError:
        return CellError(self.cell, "cupy backend", f"{what}; use the NumPy backend for this cell")

    def check(self) -> None:
        g, plan = self.g, self.plan
        if len(plan.pre.stages) > 1:
            raise self.unsupported("a product of a value computed from the input alone (two GEMM stages before the loop) is not supported yet")
        for region in (plan.pre, plan.loop, plan.post):
            for stage in region.stages:
                sizes = {self.fixed(n.size) for n in stage.pointwise}
                if len(sizes) > 1:
                    raise self.unsupported(f"pointwise nodes of different sizes in one {region.name} stage are not supported yet")
        for name in plan.pre.nodes:
            if any(plan.region_of[c.name] == "post" for c in g.consumers(name)):
                raise self.unsupported(f"a readout that reads '{name}', a value of the input alone, is not supported yet")

    def fixed(self, expr) -> sympy.Expr:
        from ..cell import DIMS

        subs = {DIMS[name]: value for name, value in self.g.dims if value is not None}
        return sympy.sympify(expr, strict=True).subs(subs)

    def forward_kept(self) -> set[str]:
        """Loop values kept over all steps: plan.stored, and values a later stage reads."""
        keep = set(self.plan.stored)
        stages = self.plan.loop.stages
        for k, stage in enumerate(stages):
            mine = {n.name for n in stage.pointwise}
            for later in stages[k + 1:]:
                for n in later.pointwise:
                    keep |= set(n.deps) & mine
                keep |= {grp.operand for grp in later.groups} & mine
        return keep - set(self.g.state_names)

    # -- locations -------------------------------------------------------------
    def loc(self, name: str, ctx: str) -> Loc:
        """Where kernels of context ``ctx`` ('step', 'time', 'all') read value ``name``.

        One-step and time-loop kernels get whole arrays over the steps and index the
        step themselves (no per-step views); 'all' kernels run over T * B rows."""
        g, py = self.g, self.py
        if g.is_leaf(name):
            leaf = g.leaf(name)
            if leaf.kind == "input":
                return Loc("x", ld=g.size(name), seq=True)
            if leaf.kind == "prev_state":
                size, seq = g.size(name), py("seq", leaf.state)
                return Loc(f"{seq}[:-1]", ld=size) if ctx == "all" else Loc(seq, ld=size, seq=True)
            if leaf.kind == "param":
                if leaf.size is None:
                    return Loc(py.value(leaf.param), kind="scalar")
                return Loc(py.value(leaf.param), kind="vec", off=(leaf.block or 0) * leaf.size)
            raise InternalError(f"kernel of cell '{self.cell}' reads the target '{name}'")
        node = g.node(name)
        region = self.plan.region_of[name]
        if name in g.state_names:
            seq = py("seq", name)
            return Loc(f"{seq}[1:]", ld=node.size) if ctx == "all" else Loc(seq, ld=node.size, seq=True, shift=1)
        if rule(_IN_GROUP, node, "location") and not (region == "loop" and name in self.keep):
            group, off = self.group_of(name)
            if region == "loop":
                return Loc(py("group", group.name), ld=group.rows, off=off)  # this step's product
            return Loc(py("gseq", group.name), ld=group.rows, off=off, seq=True)
        if region == "loop" and name not in self.keep:
            raise InternalError(f"kernel of cell '{self.cell}' reads '{name}', which forward does not keep")
        return Loc(py("seq", name), ld=node.size, seq=True)

    def group_of(self, name: str) -> tuple[GemmGroup, sympy.Expr]:
        for region in self.plan.regions:
            for stage in region.stages:
                for group in stage.groups:
                    for mv, off in zip(group.members, group.offsets):
                        if mv.name == name:
                            return group, off
        raise KeyError(name)

    def label(self, node) -> str:
        return f"eq:{self.cell}:{node.name if node.role != 'auxiliary' else node.equation or node.name}"

    # -- the module --------------------------------------------------------------
    def run(self) -> CupyModule:
        self.setup()
        self.forward()
        self.backward()
        read = set(re.findall(r"\b\w+\b", "\n".join(line.split("#")[0] for line in self.m.backward)))
        self.m.cache_names = [name for name in self.m.cache_names if name in read]  # only what backward reads
        ops = set()
        for n in self.g.nodes:
            if isinstance(n, Pointwise):
                ops |= {type(a) for a in sympy.preorder_traversal(n.expr) if isinstance(a, Op)}
        for _, terms in self.d.partials.items():
            for _, p in terms:
                ops |= {type(a) for a in sympy.preorder_traversal(p) if isinstance(a, Op)}
        self.m.ops = sorted(ops, key=lambda op: op.__name__)
        self.m.generated_names, self.m.generated_c_names = self.py.names(), self.c.names()
        return self.m

    def setup(self) -> None:
        m, g = self.m, self.g
        for p in g.params:
            m.setup.append(f'{self.py.value(p.name)} = p["{p.name}"]')
        for region in self.plan.regions:
            for stage in region.stages:
                for group in stage.groups:
                    self.weights[group.name] = self.stack(group)

    def member_weight(self, mv: MatVecNode, base: str | None = None) -> str:
        """The rows and columns of its parameter one product uses (of ``base``: the
        parameter's gradient, say)."""
        p = self.g.param(mv.param)
        base = base or self.py.value(mv.param)
        rows = "" if mv.block is None else _slice(mv.block * mv.size, mv.size)
        full_cols = sympy.simplify(mv.cols[0]) == 0 and sympy.simplify(mv.cols[1] - p.shape[1]) == 0
        cols = "" if full_cols else _slice(mv.cols[0], mv.cols[1] - mv.cols[0])
        if not rows and not cols:
            return base
        return f"{base}[{rows or ':'}{', ' + cols if cols else ''}]"

    def stack(self, group: GemmGroup) -> str:
        if group.whole_param:
            return self.py.value(group.whole_param)
        if len(group.members) == 1:
            return self.member_weight(group.members[0])
        name = self.py.get(("stack", group.name), f"W_stack_{self.py.spelling(group.operand)}")
        self.stacked.add(name)
        parts = ", ".join(self.member_weight(mv) for mv in group.members)
        self.m.stacks.append(f"{name} = cp.concatenate([{parts}], axis=0)  # stacked: one GEMM for {len(group.members)} products")
        return name

    def launch(self, k: Kernel, rows: str, steps: str = "1", step: str = "0") -> str:
        return f'_launch("{k.name}", dtype, {rows}, {k.py_units}, {steps}, {step}, dims, {", ".join(k.py_args)})'

    # -- forward -----------------------------------------------------------------
    def gemm(self, group: GemmGroup, ctx: str) -> str:
        w = self.weights[group.name]
        labels = ", ".join(mv.name for mv in group.members)
        if ctx == "step":
            loc = self.loc(group.operand, "step")  # this step's operand: a view of its array
            operand = f"{loc.py}[t{f' + {loc.shift}' if loc.shift else ''}]" if loc.seq else loc.py
            return f"{self.py('group', group.name)} = cp.matmul({operand}, {w}.T)  # {labels}"
        operand = self.loc(group.operand, "all").py
        cols, rows = dim(self.g.size(group.operand)), dim(group.rows)
        return f"{self.py('gseq', group.name)} = cp.matmul({operand}.reshape(-1, {cols}), {w}.T).reshape(T, B, {rows})  # {labels}"

    def forward(self) -> None:
        m, g, plan, py = self.m, self.g, self.plan, self.py
        lines = m.forward
        for stage in plan.pre.stages:
            lines.append("# input side, every step at once: one GEMM" + (", then one kernel" if stage.pointwise else ""))
            lines.extend(self.gemm(group, "all") for group in stage.groups)
            if stage.pointwise:
                for n in stage.pointwise:
                    lines.append(f"{py('seq', n.name)} = cp.empty((T, B, {dim(n.size)}), dtype)")
                k = self.forward_kernel(stage, 0, "all", "pre")
                lines.append(self.launch(k, "T * B"))
        for s in g.states:
            lines.append(f"{py('seq', s.name)} = cp.empty((T + 1, B, {dim(s.size)}), dtype)")
            lines.append(f'{py("seq", s.name)}[0] = state0["{s.name}"]')
        for name in sorted(self.keep, key=self.order):
            lines.append(f"{py('seq', name)} = cp.empty((T, B, {dim(g.node(name).size)}), dtype)")
        if self.time_mode:
            k = self.forward_kernel(plan.loop.stages[0], 0, "time")
            lines.append("# the whole recurrence: one kernel that loops over time, one thread per (batch, unit)")
            lines.append(self.launch(k, "B", "T"))
        elif plan.loop.stages:
            body = []
            for i, stage in enumerate(plan.loop.stages):
                body.extend(self.gemm(group, "step") for group in stage.groups)
                k = self.forward_kernel(stage, i, "step")
                body.append(self.launch(k, "B", step="t"))
            lines.append("for t in range(T):")
            lines.extend("    " + line for line in body)
        for i, stage in enumerate(plan.post.stages):
            lines.append("# readout, every step at once")
            lines.extend(self.gemm(group, "all") for group in stage.groups)
            if stage.pointwise:
                for n in stage.pointwise:
                    lines.append(f"{py('seq', n.name)} = cp.empty((T, B, {dim(n.size)}), dtype)")
                k = self.forward_kernel(stage, i, "all", "post")
                lines.append(self.launch(k, "T * B"))
        m.outputs = [(s.name, f"{py('seq', s.name)}[1:]") for s in g.states]
        for r in g.readouts:
            node = g.node(r)
            m.outputs.append((r, self.readout_product(r) if rule(_IN_GROUP, node, "readout") else py("seq", r)))
        keep = {py("seq", s.name) for s in g.states} | {py("seq", n) for n in self.keep}
        for stage in (*plan.pre.stages, *plan.post.stages):
            keep |= {py("gseq", grp.name) for grp in stage.groups}
            keep |= {py("seq", n.name) for n in stage.pointwise}
        keep |= self.stacked
        m.cache_names = sorted(keep)

    def readout_product(self, name: str) -> str:
        group, off = self.group_of(name)
        if len(group.members) == 1:
            return self.py("gseq", group.name)
        return f"{self.py('gseq', group.name)}[..., {_slice(off, self.g.node(name).size)}]"

    def forward_kernel(self, stage: Stage, k: int, mode: str, region: str = "loop") -> Kernel:
        g = self.g
        size = stage.pointwise[0].size
        kernel = Kernel(f"{self.cell}_forward_{region}{k}", f"forward, {region} stage {k}: " + ", ".join(n.name for n in stage.pointwise), dim_code(size), dim(size), mode)
        b = _Builder(kernel, self.c)
        c = self.c.value
        ctx = "step" if mode == "step" else mode
        mine = {n.name for n in stage.pointwise}
        members = {mv.name for mv in stage.matvecs}
        for node in stage.pointwise:
            for dep in node.deps:
                if dep in members:
                    group, off = self.group_of(dep)
                    buf = self.py("group", group.name) if region == "loop" else self.py("gseq", group.name)
                    b.load(c(dep), Loc(buf, ld=group.rows, off=off, seq=region != "loop"))
                elif dep not in mine:
                    b.load(c(dep), self.loc(dep, ctx))
            b.stores.append(f"const {SCALAR} {c(node.name)} = {self.ccode(node.expr)};  // {self.label(node)}")
            if node.name in g.state_names or node.name in self.keep or region != "loop":
                b.store(self.loc(node.name, ctx), c(node.name))
        for mv in stage.matvecs:
            if mv.name in self.keep:  # products backward reads (PyTorch's GRU: W_hn h + b_hn)
                group, off = self.group_of(mv.name)
                b.load(c(mv.name), Loc(self.py("group", group.name), ld=group.rows, off=off))
                b.store(self.loc(mv.name, ctx), c(mv.name))
        kernel.body = b.loads + b.stores
        self.m.kernels.append(b.finish())
        return kernel

    def order(self, name: str) -> int:
        return [n.name for n in self.g.nodes].index(name)

    def ccode(self, expr: sympy.Expr) -> str:
        """An expression as C++: every value by its kernel name (adjoints and temporaries
        are named by the kernels' namer already)."""
        return cuda_code(expr, self.c_names)

    # -- backward ----------------------------------------------------------------
    def backward(self) -> None:
        BackwardEmitter(self).run()


class BackwardEmitter:
    """Adjoint kernels, GEMMs and reductions of ``backward``."""

    def __init__(self, e: _Emitter):
        self.e, self.g, self.d, self.plan = e, e.g, e.d, e.plan
        self.py, self.c = e.py, e.c
        self.lines = e.m.backward
        self.acc: dict[str, list[tuple[str, Loc]]] = {}  # value -> (C local, location) of contributions to its adjoint
        self.sums: list[tuple] = []  # (gradient, stored adjoint, its width, columns, scalar?): reduced after the loop
        self.dx_terms: list[str] = []
        self.weight_lines: list[str] = []
        self.next_sources: dict[str, list[str]] = {}  # state -> arrays carried to the step before
        self.direct_sources: list[tuple[str, str]] = []  # (array, its size) written per step, carried
        self.step_fresh: list[str] = []
        self.pre_alias: dict[str, str] = {}  # pre group -> loop adjoint buffer holding the same values
        self.member_exprs: dict[str, sympy.Expr] = {}
        self.loop_lines: list[str] = []
        self.gemm_sources: list[tuple[str, str]] = []  # (array, its size): W^T delta, carried
        self.time_carry: set[str] = set()  # states whose adjoint a time-loop kernel carries in a register

    def run(self) -> None:
        g, e, py, c = self.g, self.e, self.py, self.c
        L = self.lines
        for s in g.states:
            L.append(f'{py("adj_seq", s.name)} = _seed(grad_outputs, "{s.name}", (T, B, {dim(s.size)}), dtype)')
            self.acc.setdefault(s.name, []).append((c("adj_out", s.name), Loc(py("adj_seq", s.name), ld=s.size, seq=True)))
        for r in g.readouts:
            L.append(f'{py("adj_seq", r)} = _seed(grad_outputs, "{r}", (T, B, {dim(g.node(r).size)}), dtype)')
            self.acc.setdefault(r, []).append((c("adj_out", r), Loc(py("adj_seq", r), ld=g.node(r).size, seq=True)))
        for p in g.params:
            L.append(f"{py('adj', p.name)} = cp.zeros_like({py.value(p.name)})")
        self.post()
        self.member_adjoints()
        self.decide_pre_alias()
        self.loop()
        self.pre()
        if self.sums:
            L.append("# gradients of elementwise parameters: deterministic sums over the stored adjoints")
            L.extend(self.sum_lines())
        if self.weight_lines:
            L.append("# weight gradients: one GEMM over every step per stacked product")
            L.extend(self.weight_lines)
        d_x = py("adj", g.input.name)
        L.append(f"{d_x} = " + (" + ".join(self.dx_terms) if self.dx_terms else "cp.zeros_like(x)"))
        e.m.grads = [(p.name, py("adj", p.name)) for p in g.params] + [("x", d_x)]
        e.m.grads += [(f"{s.name}0", py("grad0", s.name)) for s in g.states]

    def sum_lines(self) -> list[str]:
        """One reduction over the batch and the steps per stored adjoint buffer (cupy.sum:
        no atomics), then each parameter's gradient from its columns."""
        lines, reduced = [], {}
        for target, src, width, part, scalar in self.sums:
            if scalar:
                lines.append(f"{target} += cp.sum({src})")
                continue
            if src not in reduced:
                reduced[src] = self.py.fresh(src.removesuffix("_seq") + "_sum")
                lines.append(f"{reduced[src]} = cp.sum({src}.reshape(-1, {dim(width)}), axis=0)")
            lines.append(f"{target} += {reduced[src]}{part}")
        return lines

    # -- symbolic adjoints of one stage ----------------------------------------------
    def stage_adjoints(self, stage: Stage) -> tuple[list[tuple[str, sympy.Expr]], dict[str, sympy.Expr]]:
        """In-stage adjoints (reverse order, in acc locals and d_ symbols) and
        contributions to values outside the stage."""
        g, d = self.g, self.d
        pw = {n.name for n in stage.pointwise}
        nodes = [n for n in g.nodes if n.name in pw or n.name in {mv.name for mv in stage.matvecs}]
        adj = []
        for node in reversed(nodes):
            terms = [sympy.Symbol(local) for local, _ in self.acc.get(node.name, [])]
            for c in stage.pointwise:
                p = d.partial(c.name, node.name)
                if p != 0:
                    terms.append(p * self.adjoint(c.name))
            adj.append((node.name, sympy.factor_terms(sympy.Add(*terms))))
        inside = pw | {mv.name for mv in stage.matvecs}
        outside = {}
        deps = sorted({dep for n in stage.pointwise for dep in n.deps} - inside, key=self.order)
        for dep in deps:
            expr = sympy.Add(*[d.partial(c.name, dep) * self.adjoint(c.name) for c in stage.pointwise])
            if expr != 0:
                outside[dep] = sympy.factor_terms(expr)
        return adj, outside

    def adjoint(self, name: str) -> sympy.Symbol:
        """The symbol of a value's adjoint: a local of the adjoint kernels."""
        return sympy.Symbol(self.c("adj", name))

    def order(self, name: str) -> tuple[int, str]:
        for i, leaf in enumerate(self.g.leaves):
            if leaf.name == name:
                return (i, name)
        return (len(self.g.leaves) + self.e.order(name), name)

    def member_adjoints(self) -> None:
        """The adjoint of every loop-stage product, as an expression in the stage's d_ symbols."""
        for stage in self.plan.loop.stages:
            for mv in stage.matvecs:
                self.member_exprs[mv.name] = sympy.factor_terms(sympy.Add(*[
                    self.d.partial(c.name, mv.name) * self.adjoint(c.name) for c in stage.pointwise]))

    def loop_slot(self, expr: sympy.Expr, stage: Stage) -> str | None:
        """The product (of ``stage``, or an input-side one it reads) whose stored adjoint is ``expr``."""
        for mv in stage.matvecs:
            if self.member_exprs.get(mv.name) == expr:
                return mv.name
        for pre in self.plan.pre.stages:
            for group in pre.groups:
                if group.name in self.pre_alias:
                    continue
                for mv in group.members:
                    if self.pre_expr(mv, stage) == expr:
                        return mv.name
        return None

    def decide_pre_alias(self) -> None:
        """An input-side group whose adjoints are, member by member, a recurrent
        group's (same offsets) reads that group's adjoint buffer: no copy."""
        for stage in self.plan.pre.stages:
            for pre in stage.groups:
                for loop_stage in self.plan.loop.stages:
                    for rec in loop_stage.groups:
                        if len(rec.members) != len(pre.members) or sympy.simplify(rec.rows - pre.rows) != 0:
                            continue
                        ok = all(
                            sympy.simplify(a_off - b_off) == 0
                            and self.pre_expr(a, loop_stage) is not None
                            and self.pre_expr(a, loop_stage) == self.member_exprs[b.name]
                            for a, b, a_off, b_off in zip(pre.members, rec.members, pre.offsets, rec.offsets)
                        )
                        if ok:
                            self.pre_alias[pre.name] = self.py("gadj_seq", rec.name)

    def pre_expr(self, mv: MatVecNode, stage: Stage) -> sympy.Expr | None:
        cons = {c.name for c in self.g.consumers(mv.name)}
        if not cons <= {n.name for n in stage.pointwise}:
            return None
        return sympy.factor_terms(sympy.Add(*[self.d.partial(c.name, mv.name) * self.adjoint(c.name) for c in stage.pointwise]))

    # -- one stage kernel ------------------------------------------------------------
    def stage_kernel(self, stage: Stage, k: int, mode: str, region: str = "loop") -> Kernel:
        g, e, py, c = self.g, self.e, self.py, self.c
        size = stage.pointwise[0].size
        kernel = Kernel(f"{self.g.cell}_backward_{region}{k}", f"backward, {region} stage {k}: adjoints of "
                        + ", ".join(n.name for n in reversed(stage.pointwise)), dim_code(size), dim(size), mode, reverse=True)
        b = _Builder(kernel, c)
        ctx = "step" if mode == "step" else mode
        adj, outside = self.stage_adjoints(stage)
        stmts: list[tuple[str, sympy.Expr]] = []  # (C line with {} for the expression, expression)
        carry_lines: list[str] = []
        members = {mv.name for mv in stage.matvecs}
        for name, expr in adj:
            if expr == 0:
                continue
            for local, loc in self.acc.get(name, []):
                if c.kind(local) == "adj_next" and mode == "time":
                    continue  # carried in a register
                b.load(local, loc)
            if name in members:
                group, off = e.group_of(name)
                buf = Loc(py("gadj_seq", group.name), ld=group.rows, off=off, seq=True)
                stmts.append((f"const {SCALAR} {c('adj', name)} = {{}};", expr))
                stmts.append((b_store_line(b, buf, c("adj", name)), None))
            else:
                label = f"eq:{self.g.cell}:adj:{name}"
                stmts.append((f"const {SCALAR} {c('adj', name)} = {{}};  // {label}", expr))
        for dep, expr in outside.items():
            leaf = g.leaf(dep) if g.is_leaf(dep) else None
            if leaf is not None and leaf.kind == "param":
                slot = next((n for n, ex in adj if n in members and ex == expr), None)
                if slot is None and region == "loop":
                    slot = self.loop_slot(expr, stage)
                p = g.param(leaf.param)
                rows = "" if leaf.block is None else f"[{_slice(leaf.block * leaf.size, leaf.size)}]"
                if slot is not None:
                    group, off = e.group_of(slot)
                    src, width = self.pre_alias.get(group.name, py("gadj_seq", group.name)), group.rows
                    part = "" if len(group.members) == 1 else f"[{_slice(off, g.node(slot).size)}]"
                else:
                    src, width, part = py("adj_stage_seq", dep, f"{region}{k}"), size, ""
                    self.lines.append(f"{src} = cp.empty((T, B, {dim(size)}), dtype)")
                    stmts.append((b_store_line(b, Loc(src, ld=size, seq=True), "{}"), expr))
                self.sums.append((f"{py('adj', p.name)}{rows}", src, width, part, p.kind == "scalar"))
            elif leaf is not None and leaf.kind == "input":
                src = py("adj_stage_seq", dep, f"{region}{k}")
                self.lines.append(f"{src} = cp.empty_like(x)")
                stmts.append((b_store_line(b, Loc(src, ld=leaf.size, seq=True), "{}"), expr))
                self.dx_terms.append(src)
            elif leaf is not None and leaf.kind == "prev_state":
                name = py("adj_part", dep, k)
                if mode == "time":
                    carry_lines.append((f"{c('adj_next', leaf.state)} = {{}};", expr))
                    self.time_carry.add(leaf.state)
                else:
                    stmts.append((b_store_line(b, Loc(name, ld=leaf.size), "{}"), expr))
                    self.direct_sources.append((name, dim(leaf.size)))
                    self.next_sources.setdefault(leaf.state, []).append(name)
            elif self.plan.region_of[dep] == "pre" and isinstance(g.node(dep), Pointwise):
                name = py("adj_stage_seq", dep, f"{region}{k}")
                self.lines.append(f"{name} = cp.empty((T, B, {dim(g.size(dep))}), dtype)")
                stmts.append((b_store_line(b, Loc(name, ld=g.size(dep), seq=True), "{}"), expr))
                self.acc.setdefault(dep, []).append((c("adj_stage", dep, f"{region}{k}"), Loc(name, ld=g.size(dep), seq=True)))
            elif self.plan.region_of[dep] == "pre":
                group, off = e.group_of(dep)
                if group.name in self.pre_alias:
                    continue
                stmts.append((b_store_line(b, Loc(py("gadj_seq", group.name), ld=group.rows, off=off, seq=True), "{}"), expr))
            elif self.plan.region_of[dep] == "loop" and region == "loop":
                name, local = py("adj_from", dep, k), c("adj_from", dep, k)  # the local first: its pointer yields
                self.step_fresh.append(f"{name} = cp.empty((B, {dim(g.size(dep))}), dtype)")
                stmts.append((b_store_line(b, Loc(name, ld=g.size(dep)), "{}"), expr))
                self.acc.setdefault(dep, []).append((local, Loc(name, ld=g.size(dep))))
            elif region == "post":
                name = py("adj_post_seq", dep, f"post{k}")
                self.lines.append(f"{name} = cp.empty((T, B, {dim(g.size(dep))}), dtype)")
                stmts.append((b_store_line(b, Loc(name, ld=g.size(dep)), "{}"), expr))
                self.acc.setdefault(dep, []).append((c("adj_post", dep, f"post{k}"), Loc(name, ld=g.size(dep), seq=True)))
            else:
                raise InternalError(f"backward of cell '{g.cell}': no route for the adjoint of '{dep}'")
        body = self.print_with_cse(stmts + carry_lines, b, ctx)
        kernel.body = body
        self.m_kernel(b)
        return kernel

    def m_kernel(self, b: _Builder) -> None:
        self.e.m.kernels.append(b.finish())

    def print_with_cse(self, stmts, b: _Builder, ctx: str) -> list[str]:
        """C lines of a kernel: loads of what it reads, then the statements with
        common subexpressions shared (each temporary just before its first use)."""
        exprs = [ex for _, ex in stmts if ex is not None]
        replacements, reduced = sympy.cse(exprs, symbols=self.c.numbered("tmp", scoped=True), order="none")
        definition = dict(replacements)
        position = {sym: i for i, (sym, _) in enumerate(replacements)}
        emitted: set = set()
        out: list[str] = []
        code = self.e.ccode

        def need(expr):  # load every value of the step graph the expression reads
            for s in sorted(expr.free_symbols, key=lambda s: s.name):
                if s in definition or s.name not in self.e.c_names or self.c.value(s.name) in b.loaded:
                    continue  # a temporary, an adjoint (a local of this kernel), or loaded already
                b.load(self.c.value(s.name), self.e.loc(s.name, ctx))

        def place(expr):
            for sym in sorted(expr.free_symbols & definition.keys(), key=position.get):
                if sym not in emitted:
                    place(definition[sym])
                    emitted.add(sym)
                    need(definition[sym])
                    out.append(f"const {SCALAR} {sym.name} = {code(definition[sym])};")

        reduced = iter(reduced)
        for template, expr in stmts:
            if expr is None:
                out.append(template)
                continue
            expr = next(reduced)
            need(expr)
            place(expr)
            out.append(template.format(code(expr)))
        return b.loads + out

    # -- regions -----------------------------------------------------------------------
    def post(self) -> None:
        e = self.e
        for k in reversed(range(len(self.plan.post.stages))):
            stage = self.plan.post.stages[k]
            self.lines.append("# readout, every step at once")
            if stage.pointwise:
                for mv in stage.matvecs:
                    group, _ = e.group_of(mv.name)
                    self.lines.append(f"{self.py('gadj_seq', group.name)} = cp.empty((T, B, {dim(group.rows)}), dtype)")
                kernel = self.stage_kernel(stage, k, "all", "post")
                self.lines.append(e.launch(kernel, "T * B"))
            for group in stage.groups:
                if not stage.pointwise:
                    srcs = [self.acc.get(mv.name, []) for mv in group.members]
                    if len(group.members) != 1 or len(srcs[0]) != 1:
                        raise e.unsupported("a readout product with several adjoint sources is not supported yet")
                    self.lines.append(f"{self.py('gadj_seq', group.name)} = {srcs[0][0][1].py}")
                self.gemm_back(group, "all", k)

    def gemm_back(self, group: GemmGroup, ctx: str, k: int) -> None:
        """W^T delta for the operand, and the weight gradient (after the loop)."""
        g, e, py, c = self.g, self.e, self.py, self.c
        w = e.weights[group.name]
        operand = group.operand
        rows, cols = dim(group.rows), dim(g.size(operand))
        buf = self.pre_alias.get(group.name, py("gadj_seq", group.name))
        if ctx == "step":
            leaf = g.leaf(operand) if g.is_leaf(operand) else None
            name = py("adj_via", operand, group.name)
            self.loop_lines.append(f"{name} = cp.matmul({buf}[t], {w})  # W^T delta")
            if leaf is not None and leaf.kind == "prev_state":
                self.next_sources.setdefault(leaf.state, []).append(name)
                self.gemm_sources.append((name, cols))
            else:
                self.acc.setdefault(operand, []).append((c("adj_via", operand, group.name), Loc(name, ld=g.size(operand))))
        else:
            back = f"cp.matmul({buf}.reshape(-1, {rows}), {w}).reshape(T, B, {cols})"
            if operand == g.input.name:
                self.dx_terms.append(back)
            else:
                name = py("adj_via_seq", operand, group.name)
                self.lines.append(f"{name} = {back}  # W^T delta, every step")
                self.acc.setdefault(operand, []).append((c("adj_via", operand, group.name), Loc(name, ld=g.size(operand), seq=True)))
        src = e.loc(operand, "all").py
        dW = f"cp.matmul({buf}.reshape(-1, {rows}).T, {src}.reshape(-1, {cols}))"
        if group.whole_param:
            self.weight_lines.append(f"{py('adj', group.whole_param)} += {dW}")
        else:
            self.weight_lines.append(f"dW_stack = {dW}")
            for mv, off in zip(group.members, group.offsets):
                target = e.member_weight(mv, base=py("adj", mv.param))
                self.weight_lines.append(f"{target} += dW_stack[{_slice(off, mv.size)}]")

    def loop(self) -> None:
        g, e, plan, py = self.g, self.e, self.plan, self.py
        for stage in plan.loop.stages:
            for group in stage.groups:
                self.lines.append(f"{py('gadj_seq', group.name)} = cp.empty((T, B, {dim(group.rows)}), dtype)")
        for stage in plan.pre.stages:
            for group in stage.groups:
                if group.name not in self.pre_alias:
                    self.lines.append(f"{py('gadj_seq', group.name)} = cp.empty((T, B, {dim(group.rows)}), dtype)")
        if not plan.loop.stages:
            for s in g.states:
                self.lines.append(f"{py('grad0', s.name)} = cp.zeros((B, {dim(s.size)}), dtype)")
            return
        if e.time_mode:
            self.time_loop()
            return
        # sources carried from step t + 1 to step t: named now, filled by the kernels
        for s in g.states:
            for source in self.planned_sources(s.name):
                self.acc[s.name].append((self.c("next", source), Loc(py("next", source), ld=s.size)))
        kernels = []
        for k in reversed(range(len(plan.loop.stages))):
            stage = plan.loop.stages[k]
            kernel = self.stage_kernel(stage, k, "step")
            kernels.append(kernel)
            self.step_fresh_flush()
            self.loop_lines.append(e.launch(kernel, "B", step="t"))
            for group in stage.groups:
                self.gemm_back(group, "step", k)
        carried = [name for name, _ in self.direct_sources]
        head = [f"{py('next', name)} = {name}" for name in carried + [n for n, _ in self.gemm_sources]]
        head += [f"{name} = cp.empty((B, {size}), dtype)" for name, size in self.direct_sources]
        for name, size in self.direct_sources + self.gemm_sources:
            self.lines.append(f"{name} = cp.zeros((B, {size}), dtype)")
        self.lines.append("for t in reversed(range(T)):")
        self.lines.extend("    " + line for line in head + self.loop_lines)
        for s in g.states:
            srcs = self.next_sources.get(s.name, [])
            self.lines.append(f"{py('grad0', s.name)} = " + (" + ".join(srcs) if srcs else f"cp.zeros((B, {dim(s.size)}), dtype)"))

    def step_fresh_flush(self) -> None:
        self.loop_lines.extend(self.step_fresh)
        self.step_fresh = []

    def planned_sources(self, state: str) -> list[str]:
        """Names of the arrays that carry the adjoint of ``state`` to the step before."""
        g, plan = self.g, self.plan
        prev = next(s.prev for s in g.states if s.name == state)
        out = []
        for k, stage in enumerate(plan.loop.stages):
            if any(self.d.partial(c.name, prev) != 0 for c in stage.pointwise):
                out.append(self.py("adj_part", prev, k))
        for stage in plan.loop.stages:
            for group in stage.groups:
                if group.operand == prev:
                    out.append(self.py("adj_via", prev, group.name))
        return out

    def time_loop(self) -> None:
        g, e, py, c = self.g, self.e, self.py, self.c
        stage = self.plan.loop.stages[0]
        for s in g.states:
            self.acc[s.name].append((c("adj_next", s.name), None))
        kernel = self.stage_kernel(stage, 0, "time")
        b_out = []
        kernel.body += [f"{c('adj_next', s.name)} = {SCALAR}(0);" for s in g.states if s.name not in self.time_carry]
        kernel.prologue = [f"{SCALAR} {c('adj_next', s.name)} = {SCALAR}(0);  // from step t + 1" for s in g.states]
        for s in g.states:
            array = py("grad0", s.name)
            self.lines.append(f"{array} = cp.empty((B, {dim(s.size)}), dtype)")
            ptr = c.get(("ptr", array), f"{array}_ptr")
            kernel.params.append(("{}*", ptr))
            kernel.py_args.append(array)
            b_out.append(f"{ptr}[row_ * {dim_code(s.size)} + unit_] = {c('adj_next', s.name)};")
        kernel.epilogue = b_out
        self.lines.append("# the whole recurrence backward: one kernel that loops over time, one thread per (batch, unit)")
        self.lines.append(e.launch(kernel, "B", "T"))

    def pre(self) -> None:
        g = self.g
        for stage in self.plan.pre.stages:
            if stage.pointwise:
                self.lines.append("# input side, every step at once")
            if stage.pointwise:
                for group in stage.groups:
                    if group.name in self.pre_alias:
                        continue
                    for mv, off in zip(group.members, group.offsets):
                        if any(self.plan.region_of[c.name] == "loop" for c in g.consumers(mv.name)):
                            # the loop's kernels wrote their part of this adjoint here; this kernel adds the rest
                            self.acc.setdefault(mv.name, []).append(
                                (self.c("adj_loop", mv.name), Loc(self.py("gadj_seq", group.name), ld=group.rows, off=off)))
                kernel = self.stage_kernel(stage, 0, "all", "pre")
                self.lines.append(self.e.launch(kernel, "T * B"))
            for group in stage.groups:
                self.gemm_back(group, "all", 0)


#: the rule of each node kind (ir.NODE_KINDS): whether its values live in a stacked GEMM's
#: output (a matrix-vector product) or in an array of their own
_IN_GROUP = {MatVecNode: True, Pointwise: False}


def b_store_line(b: _Builder, loc: Loc, code: str) -> str:
    """A store as a statement template (``{}`` stays for the expression)."""
    return f"{b.ptr(loc.py, True)}[{b.index(loc)}] = {code};"


def template_kernels(kernels: list[Kernel]) -> list[dict]:
    """Kernels as plain data for templates/cuda_kernels.cu.j2 (signatures per dtype)."""
    out = []
    for k in kernels:
        names = [name for _, name in k.params]

        def signature(ctype: str) -> list[str]:
            return [f"{quals.format(ctype)} {name}" for quals, name in k.params]

        out.append({
            "name": k.name,
            "doc": k.doc,
            "units": k.units,
            "mode": k.mode,
            "loop": "steps_ - 1; t_ >= 0; --t_" if k.reverse else "0; t_ < steps_; ++t_",
            "params": signature(SCALAR),
            "prologue": k.prologue,
            "body": k.body,
            "epilogue": k.epilogue,
            "call": ", ".join(names),
            "typed": [(ctype, suffix, signature(ctype)) for ctype, suffix in (("float", "f32"), ("double", "f64"))],
        })
    return out


def design_note(plan: KernelPlan) -> str:
    """One sentence on how the kernels are laid out for this cell."""
    loop = plan.loop.stages
    if not loop:
        return "no recurrence; the readout runs over every step at once."
    if not any(s.groups for s in loop):
        return ("the recurrence is elementwise, so forward and backward are each one kernel that loops "
                "over time, one thread per (batch, unit).")
    gemms = sum(len(s.groups) for s in loop)
    return (f"per step, {gemms} recurrent GEMM(s) (cuBLAS) and {len(loop)} fused kernel(s) for all gates and "
            "state updates; backward, per step, the same number of fused adjoint kernels and GEMMs W^T delta; "
            "input projections and weight gradients are one GEMM each over every step.")
