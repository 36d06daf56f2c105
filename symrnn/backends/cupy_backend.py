"""CuPy backend: a kernel plan -> fused CUDA kernels and the Python that launches them.

Python computes every statement (symrnn.stmt) and every line of CUDA here;
``templates/cupy_module.py.j2`` and ``templates/cuda_kernels.cu.j2`` lay them out.

Per time step (as haste and cuDNN do it): the input projection of all steps is
one cuBLAS GEMM before the loop; each step runs the recurrent GEMM(s) of a loop
stage, then ONE fused kernel for all of the stage's pointwise nodes, which also
writes what backward needs (``plan.stored``).  Backward (backends/cupy_backward.py)
runs, per step and stage, one fused kernel for every adjoint of the stage, then the
GEMM W^T delta; weight gradients are one GEMM per stacked product after the loop,
bias and other elementwise-parameter gradients one deterministic ``cupy.sum`` over a
stored adjoint buffer (no atomics).  A cell whose recurrence has no GEMM
(``single_sigmoid``, IndRNN-like cells) gets one kernel that loops over time,
one thread per (batch, unit).

Each ``__global__`` kernel is a thin wrapper that computes its (row, unit)
index and calls a ``__host__ __device__`` function holding all of the math, so
the same source also compiles for the host (tests/host_cupy.py).

Naming follows the NumPy backend: ``f_seq`` holds f over all steps, ``d_f`` is
the adjoint of ``f``, ``d_W`` the gradient of parameter ``W``.  Two namers
(:mod:`symrnn.naming`) own every name: ``self.py`` the module's Python names,
``self.c`` the C++ names of the kernels (a value's local, an adjoint, a pointer).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import sympy

from ..cuda_printing import dim_code
from ..errors import CellError, InternalError
from ..ir import Pointwise, Reduction, rule
from ..naming import Namer
from ..ops import Op
from ..plan import GemmGroup, KernelPlan, Stage
from ..schedule import schedule
from ..stmt import Assign, Call, Comment, Do, ETC, Elementwise, Helper, Key, Loop, Ref, Reshape, Size, Span, Text, empty, span, t_SYM
from .array_module import derived_setup, group_weight, module_namer
from .cuda_kernels import BLOCK, CUDA, IN_GROUP, Dialect, Kernel, KernelBuilder, Loc, design_note, template_kernels
from .python_printer import PythonPrinter

__all__ = ["BLOCK", "CupyModule", "Kernel", "design_note", "emit_cupy", "template_kernels"]


@dataclass
class CupyModule:
    """The template's data: the kernels, and the module's sections as statements while
    the emitter builds them, printed lines once :meth:`_Emitter.printed` has run."""

    kernels: list[Kernel] = field(default_factory=list)
    ops: list[type[Op]] = field(default_factory=list)
    setup: list = field(default_factory=list)
    stacks: list = field(default_factory=list)
    forward: list = field(default_factory=list)
    cache_names: list[str] = field(default_factory=list)
    outputs: list[tuple] = field(default_factory=list)
    finals: list[tuple] = field(default_factory=list)  # each state's array over the steps, the initial state first
    backward: list = field(default_factory=list)
    grads: list[tuple] = field(default_factory=list)
    generated_names: frozenset[str] = frozenset()  # every Python name the namer gave out
    generated_c_names: frozenset[str] = frozenset()  # ... and every C++ name


def emit_cupy(plan: KernelPlan) -> CupyModule:
    """The kernels and statements of the generated CuPy module for ``plan``."""
    return _Emitter(plan).run()


def emit_kernels(plan: KernelPlan, dialect: Dialect, backend: str) -> tuple[CupyModule, Namer]:
    """The same kernels and statements, the kernels' lines in ``dialect``, the module's
    statements not printed (for a backend that prints them itself; ``backend`` names it
    in a CellError), and the namer of the module's Python names."""
    e = _Emitter(plan, dialect, backend)
    return e.build(), e.py


class _Emitter:
    def __init__(self, plan: KernelPlan, dialect: Dialect = CUDA, backend: str = "cupy"):
        self.plan, self.g, self.d = plan, plan.graph, plan.derivation
        self.dialect, self.backend = dialect, backend
        self.schedule = schedule(plan)
        self.m = CupyModule()
        self.cell = self.g.cell
        self.weights: dict[str, Ref] = {}
        self.stacked: set[str] = set()
        self.py = module_namer(plan)
        c_values = [leaf.name for leaf in self.g.leaves if leaf.kind != "target"] + [n.name for n in self.g.nodes]
        self.c = Namer(dialect.fixed, c_values)
        self.c_names = {name: self.c.value(name) for name in c_values}  # graph name -> its kernel local
        self.time_mode = bool(self.plan.loop.stages) and not any(s.groups or s.reductions for s in self.plan.loop.stages)
        self.check()
        self.keep = self.forward_kept()

    # -- what this backend supports ----------------------------------------------
    def unsupported(self, what: str) -> CellError:
        return CellError(self.cell, f"{self.backend} backend", f"{what}; use the NumPy backend for this cell")

    def check(self) -> None:
        plan = self.plan
        if len(plan.pre.stages) > 1 and not any(s.reductions for s in plan.pre.stages):
            raise self.unsupported("a product of a value computed from the input alone (two GEMM stages before the loop) is not supported yet")
        for region in (plan.pre, plan.loop, plan.post):
            for stage in region.stages:
                # a stage's kernel runs over its values' units (its products of another width:
                # cupy_backward.wider_member); a reduction's adjoint has its operand's width
                sizes = {self.fixed(n.size) for n in (*stage.pointwise, *stage.reductions)}
                if len(sizes) > 1:
                    raise self.unsupported(f"values of different sizes (pointwise nodes, reductions) in one {region.name} stage are not supported yet")

    def fixed(self, expr) -> sympy.Expr:
        from ..cell import DIMS

        subs = {DIMS[name]: value for name, value in self.g.dims if value is not None}
        return sympy.sympify(expr, strict=True).subs(subs)

    def forward_kept(self) -> set[str]:
        """Loop values kept over all steps: plan.stored, and values a later stage reads
        (each stage is a kernel of its own)."""
        keep = set(self.plan.stored)
        stages = self.plan.loop.stages
        for k, stage in enumerate(stages):
            mine = {n.name for n in stage.pointwise}
            for later in stages[k + 1:]:
                for n in later.pointwise:
                    keep |= set(n.deps) & mine
                keep |= {grp.operand for grp in later.groups} & mine
        for stage in stages:  # a reduction reads its operand's array (a product's: its GEMM's output)
            keep |= {r.operand for r in stage.reductions if not rule(IN_GROUP, self.g.node(r.operand), "location")}
        keep |= {r.name for stage in stages for r in stage.reductions}
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
                return Loc(Ref("x"), ld=g.size(name), seq=True)
            if leaf.kind == "prev_state":
                size, seq = g.size(name), py("seq", leaf.state)
                return Loc(Ref(seq, (Span(None, -1),)), ld=size) if ctx == "all" else Loc(Ref(seq), ld=size, seq=True)
            if leaf.kind == "param":
                if leaf.size is None:
                    return Loc(Ref(py.value(leaf.param)), kind="scalar")
                return Loc(Ref(py.value(leaf.param)), kind="vec", off=(leaf.block or 0) * leaf.size)
            raise InternalError(f"kernel of cell '{self.cell}' reads the target '{name}'")
        node = g.node(name)
        region = self.plan.region_of[name]
        if isinstance(node, Reduction):  # (T, B, 1): one value per row, the same at every unit
            return Loc(Ref(py("seq", name)), kind="rowval", seq=True)
        if name in g.state_names:
            seq = py("seq", name)
            return Loc(Ref(seq, (Span(1, None),)), ld=node.size) if ctx == "all" else Loc(Ref(seq), ld=node.size, seq=True, shift=1)
        if rule(IN_GROUP, node, "location") and not (region == "loop" and name in self.keep):
            group, off = self.plan.group_of(name)
            if region == "loop":
                return Loc(Ref(py("group", group.name)), ld=group.rows, off=off)  # this step's product
            return Loc(Ref(py("gseq", group.name)), ld=group.rows, off=off, seq=True)
        if region == "loop" and name not in self.keep:
            raise InternalError(f"kernel of cell '{self.cell}' reads '{name}', which forward does not keep")
        return Loc(Ref(py("seq", name)), ld=node.size, seq=True)

    def label(self, node) -> str:
        return f"eq:{self.cell}:{node.name if node.role != 'auxiliary' else node.equation or node.name}"

    # -- the module --------------------------------------------------------------
    def run(self) -> CupyModule:
        return self.printed(self.build())

    def build(self) -> CupyModule:
        """The module's kernels and statements (not printed)."""
        from .cupy_backward import BackwardEmitter

        self.setup()
        self.forward()
        BackwardEmitter(self).run()
        read = set().union(*(s.reads for s in self.m.backward))
        self.m.cache_names = [name for name in self.m.cache_names if name in read]  # only what backward reads
        ops = set()
        for n in self.g.nodes:
            if isinstance(n, Pointwise):
                ops |= {type(a) for a in sympy.preorder_traversal(n.expr) if isinstance(a, Op)}
        for _, terms in self.d.partials.items():
            for _, p in terms:
                ops |= {type(a) for a in sympy.preorder_traversal(p) if isinstance(a, Op)}
        for n in self.g.nodes:  # a reduction's weight (logsumexp's softmax) in the operand's kernel
            if isinstance(n, Reduction):
                ops |= {type(a) for a in sympy.preorder_traversal(n.weight()) if isinstance(a, Op)}
        self.m.ops = sorted(ops, key=lambda op: op.__name__)
        self.m.generated_names, self.m.generated_c_names = self.py.names(), self.c.names()
        return self.m

    def printed(self, m: CupyModule) -> CupyModule:
        """The module's sections, statements printed as lines (the template's data)."""
        printer = PythonPrinter("cp")
        for section in ("setup", "stacks", "forward", "backward"):
            setattr(m, section, printer.lines(getattr(m, section)))
        for pairs in ("outputs", "finals", "grads"):
            setattr(m, pairs, [(k, printer.value(v)) for k, v in getattr(m, pairs)])
        return m

    def setup(self) -> None:
        m, g = self.m, self.g
        for p in g.params:
            m.setup.append(Assign(Ref(self.py.value(p.name)), Ref("p", (Key(p.name),))))
        m.setup.extend(derived_setup(g, self.py))
        for group in self.plan.groups.values():
            self.weights[group.name] = group_weight(g, self.py, group, m.stacks, self.stacked)

    def launch(self, k: Kernel, rows: str, steps: str = "1", step: str = "0") -> Do:
        """``_launch(kernel, dtype, rows, units, steps, step, dims, arrays...)``."""
        args = (Key(k.name), Text("dtype"), Text(rows), Size(k.size), Text(steps), Text(step), Text("dims"), *k.py_args)
        return Do(Helper("_launch", args))

    # -- forward -----------------------------------------------------------------
    def gemm(self, group: GemmGroup, ctx: str) -> Assign:
        w = self.weights[group.name]
        labels = ", ".join(mv.name for mv in group.members)
        # the operand as an array: this step's view of it, or every step's; a product itself
        # (W @ x stacked with other products of x) its columns of its group's buffer
        operand = self.widened(group.operand, self.array(group.operand, ctx), ctx)
        if ctx == "step":
            return Assign(Ref(self.py("group", group.name)), Call("matmul", (operand, w.t)), labels)
        product = Call("matmul", (Reshape(operand, self.g.size(group.operand)), w.t))
        return Assign(Ref(self.py("gseq", group.name)), Reshape(product, group.rows, steps=True), labels)

    def forward(self) -> None:
        m, g, plan, py = self.m, self.g, self.plan, self.py
        lines = m.forward
        for i, stage in enumerate(plan.pre.stages):
            lines.append(Comment("input side, every step at once: one GEMM" + (", then one kernel" if stage.pointwise else "")))
            lines.extend(self.gemm(group, "all") for group in stage.groups)
            lines.extend(self.reductions(stage, "all"))
            if stage.pointwise:
                lines.extend(Assign(Ref(py("seq", n.name)), empty(Text("T"), Text("B"), Size(n.size))) for n in stage.pointwise)
                lines.append(self.launch(self.forward_kernel(stage, i, "all", "pre"), "T * B"))
        for s in g.states:
            lines.append(Assign(Ref(py("seq", s.name)), empty(Text("T + 1"), Text("B"), Size(s.size))))
            lines.append(Assign(Ref(py("seq", s.name), (sympy.Integer(0),)), Ref("state0", (Key(s.name),))))
        for name in sorted(self.keep, key=self.order):
            width = 1 if isinstance(g.node(name), Reduction) else g.node(name).size  # a reduction: one per row
            lines.append(Assign(Ref(py("seq", name)), empty(Text("T"), Text("B"), Size(width))))
        if self.time_mode:
            k = self.forward_kernel(plan.loop.stages[0], 0, "time")
            lines.append(Comment("the whole recurrence: one kernel that loops over time, one thread per (batch, unit)"))
            lines.append(self.launch(k, "B", "T"))
        elif plan.loop.stages:
            body = []
            for i, stage in enumerate(plan.loop.stages):
                body.extend(self.gemm(group, "step") for group in stage.groups)
                body.extend(self.reductions(stage, "step"))
                kernel = self.forward_kernel(stage, i, "step")
                if kernel is not None:
                    body.append(self.launch(kernel, "B", step="t"))
            lines.append(Loop("t", Text("T"), tuple(body)))
        for i, stage in enumerate(plan.post.stages):
            lines.append(Comment("readout, every step at once"))
            lines.extend(self.gemm(group, "all") for group in stage.groups)
            lines.extend(self.reductions(stage, "all"))
            if stage.pointwise:
                lines.extend(Assign(Ref(py("seq", n.name)), empty(Text("T"), Text("B"), Size(n.size))) for n in stage.pointwise)
                lines.append(self.launch(self.forward_kernel(stage, i, "all", "post"), "T * B"))
        m.outputs = [(s.name, Ref(py("seq", s.name), (Span(1, None),))) for s in g.states]
        m.finals = [(s.name, Ref(py("seq", s.name))) for s in g.states]
        for r in g.readouts:
            m.outputs.append((r, self.readout_product(r) if rule(IN_GROUP, g.node(r), "readout") else Ref(py("seq", r))))
        keep = {py("seq", s.name) for s in g.states} | {py("seq", n) for n in self.keep}
        for stage in (*plan.pre.stages, *plan.post.stages):
            keep |= {py("gseq", grp.name) for grp in stage.groups}
            keep |= {py("seq", n.name) for n in (*stage.pointwise, *stage.reductions)}
        keep |= self.stacked
        m.cache_names = sorted(keep)

    def array(self, name: str, ctx: str) -> Ref:
        """Value ``name`` as a Python array: one step of it (``ctx`` 'step') or every step ('all')."""
        node = None if self.g.is_leaf(name) else self.g.node(name)
        region = self.plan.region_of.get(name)
        if node is not None and rule(IN_GROUP, node, "location") and not (region == "loop" and name in self.keep):
            group, off = self.plan.group_of(name)
            buf = self.py("group", group.name) if region == "loop" else self.py("gseq", group.name)
            step = (t_SYM,) if ctx == "step" and region != "loop" else ()
            return Ref(buf, step + ((ETC, span(off, node.size)) if len(group.members) > 1 else ()))
        loc = self.loc(name, ctx)
        return Ref(loc.py.name, (t_SYM + loc.shift,)) if loc.seq and ctx == "step" else loc.py

    def widened(self, name: str, array, ctx: str):
        """``array`` of value ``name`` at its full width: a reduction's (one value per row) broadcast."""
        if self.g.is_leaf(name) or not isinstance(self.g.node(name), Reduction):
            return array
        steps = (Text("T"), Text("B")) if ctx == "all" else (Text("B"),)
        return Call("broadcast_to", (array, (*steps, Size(self.g.node(name).size))))

    def reductions(self, stage: Stage, ctx: str) -> list:
        """A stage's reductions over units, before its kernel: (T, B, 1) arrays, one value per
        row (CuPy's reductions: a fixed tree per row, no atomics, the same bits on every run)."""
        out = []
        for r in stage.reductions:
            operand = self.widened(r.operand, self.array(r.operand, ctx), ctx)  # a reduction's: n equal units
            value = Elementwise(r.reduce(sympy.Symbol(r.operand)), ((r.operand, operand),))
            dst = Ref(self.py("seq", r.name), (t_SYM,) if ctx == "step" else ())
            out.append(Assign(dst, value, self.label(r)))
        return out

    def readout_product(self, name: str) -> Ref:
        group, off = self.plan.group_of(name)
        if len(group.members) == 1:
            return Ref(self.py("gseq", group.name))
        return Ref(self.py("gseq", group.name), (ETC, span(off, self.g.node(name).size)))

    def forward_kernel(self, stage: Stage, k: int, mode: str, region: str = "loop") -> Kernel | None:
        g = self.g
        if not stage.pointwise and not any(mv.name in self.keep for mv in stage.matvecs):
            return None  # GEMMs (and reductions) only: nothing elementwise to compute
        size = (stage.pointwise or stage.matvecs)[0].size
        doc = f"forward, {region} stage {k}: " + ", ".join(n.name for n in stage.pointwise)
        kernel = Kernel(f"{self.cell}_forward_{region}{k}", doc, dim_code(size), size, mode)
        b = KernelBuilder(kernel, self.c, self.dialect)
        c = self.c.value
        ctx = "step" if mode == "step" else mode
        mine = {n.name for n in stage.pointwise}
        members = {mv.name for mv in stage.matvecs}
        for node in stage.pointwise:
            for dep in node.deps:
                if dep in members:
                    group, off = self.plan.group_of(dep)
                    buf = self.py("group", group.name) if region == "loop" else self.py("gseq", group.name)
                    b.load(c(dep), Loc(Ref(buf), ld=group.rows, off=off, seq=region != "loop"))
                elif dep not in mine:
                    b.load(c(dep), self.loc(dep, ctx))
            b.stores.append(self.dialect.decl(c(node.name), self.ccode(node.expr), self.label(node)))
            if region == "loop" and node.name in self.schedule.held:  # lengths: 0 at a held step (symrnn.schedule)
                b.store(self.loc(node.name, ctx), self.dialect.select("active_", c(node.name), self.dialect.zero()))
            elif node.name in g.state_names or node.name in self.keep or region != "loop":
                b.store(self.loc(node.name, ctx), c(node.name))
        for mv in stage.matvecs:
            if mv.name in self.keep:  # products backward reads (PyTorch's GRU: W_hn h + b_hn)
                group, off = self.plan.group_of(mv.name)
                b.load(c(mv.name), Loc(Ref(self.py("group", group.name)), ld=group.rows, off=off))
                b.store(self.loc(mv.name, ctx), c(mv.name))
        held = region == "loop" and any(n.name in self.schedule.held for n in stage.pointwise)
        step = "t_" if mode == "time" else "step_"
        active = self.dialect.flag("active_", f"{step} < {self.dialect.load('lengths_', 'row_')}",
                                   "lengths: steps at and beyond a row's length are held")
        kernel.body = ([active] if held else []) + b.loads + b.stores
        self.m.kernels.append(b.finish())
        if held:  # every row's length (T where forward has none)
            kernel.params.append(("const long long*", "lengths_"))
            kernel.py_args.append(Ref("lengths"))
        return kernel

    def order(self, name: str) -> int:
        return [n.name for n in self.g.nodes].index(name)

    def ccode(self, expr: sympy.Expr) -> str:
        """An expression as C++: every value by its kernel name (adjoints and temporaries
        are named by the kernels' namer already)."""
        return self.dialect.code(expr, self.c_names)
