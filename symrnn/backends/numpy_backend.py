"""NumPy backend: a kernel plan -> the statements of a NumPy module.

Python computes every statement here; ``templates/numpy_module.py.j2`` lays
them out.  Naming, from the math: a value at one step is its own name (``f``),
its array over all steps ``f_seq`` (states: ``h_seq`` holds h^{-1} .. h^{T-1},
the initial state first); the adjoint of ``f`` is ``d_f``; the gradient of
parameter ``W`` is ``d_W``; the RTRL tangent of ``f`` is ``J_f``.  Every name
comes from the module's :class:`~symrnn.naming.Namer` (``self.n``), which keeps
these spellings unless another name has them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import sympy

from ..errors import InternalError
from ..ir import MatVecNode, Pointwise, Reduction, StepGraph
from ..plan import GemmGroup, KernelPlan
from ..printing import numpy_code
from ..schedule import schedule
from ..stmt import Assign, Call, Elementwise, Key, Ref, Span, span, t0_SYM, t1_SYM, t_SYM
from ..passes import ALL, check
from ..passes.hoist_coefficients import MIN_BLOCK_STEPS, block_steps
from ..passes.lean_buffers import lean_buffers
from ..passes.centred_in_place import centre_module
from ..passes.input_side_in_loop import input_side_in_loop
from ..passes.stack_blocks import stack_module
from ..passes.unit_products import helpers_used
from .array_module import derived_setup, group_weight, module_namer, weight_ref
from .numpy_backward import emit_backward
from .numpy_forward import emit_forward
from .numpy_rtrl import emit_rtrl
from .python_printer import PythonPrinter

__all__ = ["emit"]


def dim(expr: sympy.Expr) -> str:
    """A size as Python code in n_in, n_hidden, n_out."""
    return numpy_code(sympy.sympify(expr, strict=True))


def _slice(start: sympy.Expr, size: sympy.Expr) -> str:
    lo, hi = dim(start), dim(sympy.expand(start + size))
    return f"{'' if lo == '0' else lo}:{hi}"


@dataclass
class NumpyModule:
    """The template's data: each section a list of statements (symrnn.stmt) while the
    emitter builds it, of printed lines once :meth:`_Emitter.printed` has run."""

    setup: list = field(default_factory=list)  # bind parameters and their row blocks
    forward_setup: list = field(default_factory=list)  # ... those forward reads
    backward_setup: list = field(default_factory=list)
    rtrl_bind: list = field(default_factory=list)
    stacks: list = field(default_factory=list)  # stacked weights (forward computes, cache keeps)
    forward_pre: list = field(default_factory=list)
    forward_alloc: list = field(default_factory=list)
    forward_loop: list = field(default_factory=list)
    forward_post: list = field(default_factory=list)
    forward_hold: list = field(default_factory=list)  # lengths: after each step, the held rows' states
    cache_names: list = field(default_factory=list)
    outputs: list[tuple] = field(default_factory=list)
    finals: list[tuple] = field(default_factory=list)  # each state's array over the steps, the initial state first
    backward_seed: list = field(default_factory=list)
    backward_carry: list = field(default_factory=list)  # each state's adjoint from step t + 1, zero at T - 1
    backward_post: list = field(default_factory=list)
    backward_coefs: list = field(default_factory=list)  # per block of steps, before the loop over it
    coef_steps: int = 0  # the steps of such a block (passes/hoist_coefficients.block_steps)
    backward_loop: list = field(default_factory=list)
    backward_after: list = field(default_factory=list)
    backward_pre: list = field(default_factory=list)
    backward_weights: list = field(default_factory=list)
    grads: list[tuple] = field(default_factory=list)
    rtrl_setup: list = field(default_factory=list)
    rtrl_loop: list = field(default_factory=list)
    rtrl_carry: list = field(default_factory=list)  # lengths: the held rows' states and tangents carried
    rtrl_cot: list = field(default_factory=list)  # the outputs' cotangents at step t
    rtrl_grads: list[tuple] = field(default_factory=list)
    loss_value: str = ""
    loss_grad: str = ""
    loss_scale: str = ""
    generated_names: frozenset[str] = frozenset()  # every name the namer gave out
    helpers: tuple[str, ...] = ()  # the module's helpers of the unit_products pass that it calls


def emit(plan: KernelPlan, passes=ALL) -> NumpyModule:
    """The statements of the generated module for ``plan`` (``passes``: the optimisations
    to run, symrnn.passes).  Where hoisting the backward's coefficients does not pay (too many
    buffers for a block of MIN_BLOCK_STEPS steps to stay in cache: passes/hoist_coefficients), the module
    is the one emitted without that pass."""
    passes = check(passes)
    m = _Emitter(plan, passes).run()
    if "hoist_coefficients" in passes and m.backward_coefs and m.coef_steps < MIN_BLOCK_STEPS:
        return _Emitter(plan, passes - {"hoist_coefficients"}).run()
    return m


def uniform_values(g: StepGraph) -> tuple[frozenset[str], frozenset[str]]:
    """(uniform, compact): the nodes whose value is the same at every unit (a reduction, and a
    pointwise node of reductions and scalars only), and those of them the module keeps as one
    value per row, shape (..., 1), broadcast where they are used: all but the states, readouts
    and matrix-vector operands (which get their full width)."""
    full = set(g.state_names) | set(g.readouts) | {n.operand for n in g.nodes if isinstance(n, MatVecNode)}
    uniform: set[str] = set()
    compact: set[str] = set()  # ... of compact values only (a value of a full-width one is full-width)
    for n in g.nodes:
        vectors = [d for d in n.deps if not (g.is_leaf(d) and g.leaf(d).size is None)]
        if isinstance(n, Reduction) or (isinstance(n, Pointwise) and vectors and all(d in uniform for d in vectors)):
            uniform.add(n.name)
            if n.name not in full and (isinstance(n, Reduction) or all(d in compact for d in vectors)):
                compact.add(n.name)
    return frozenset(uniform), frozenset(compact)


def loss_code(plan: KernelPlan, lib: str = "np") -> tuple[str, str, str]:
    """The per-step loss in ``y`` and ``target``, its derivative in ``y``, and the factor of
    the reduction over time, as code over ``lib`` (np; cp for the CuPy module, which shares them)."""
    g = plan.graph
    loss = g.loss
    extra = sorted({s.name for s in loss.expr.free_symbols} - {loss.target, loss.target_of})
    if extra:
        raise InternalError(f"the loss of cell '{g.cell}' reads {extra}; only '{loss.target_of}' and the target are supported")
    table = {loss.target_of: "y", loss.target: "target"}
    grad = dict(plan.derivation.loss_partials)[loss.target_of]
    scale = "1.0 / T" if loss.reduction == "mean" else "1.0"
    return numpy_code(loss.expr, table, lib), numpy_code(grad, table, lib), scale


class _Emitter:
    def __init__(self, plan: KernelPlan, passes: frozenset[str] = ALL):
        self.plan, self.g, self.d = plan, plan.graph, plan.derivation
        self.passes = passes
        self.schedule = schedule(plan)
        self.n = module_namer(plan)
        self.m = NumpyModule()
        self.weights: dict[str, Ref] = {}  # group name -> its weight
        self.stacked: set[str] = set()  # stacked weights (the cache keeps them for backward)
        self.grad_of: dict[str, str] = {}  # a parameter's gradient name -> the parameter
        self.transposes: dict[Ref, str] = {}  # weight -> its contiguous transpose
        self.uniform, self.compact = uniform_values(self.g)  # values the same at every unit (reductions')

    # -- names in each context ----------------------------------------------------
    def ref_of(self, name: str, ctx: str) -> Ref:
        """The array of value ``name`` in context ``ctx`` ('loop': one step t; 'all': every
        step; 'block': the steps t0 .. t1 - 1)."""
        g, n = self.g, self.n
        t, t0, t1 = t_SYM, t0_SYM, t1_SYM
        block = Span(t0, t1)
        if g.is_leaf(name):
            leaf = g.leaf(name)
            if leaf.kind == "input":
                return {"loop": Ref("x", (t,)), "block": Ref("x", (block,))}.get(ctx, Ref("x"))
            if leaf.kind == "prev_state":
                seq = n("seq", leaf.state)
                return {"loop": Ref(n.value(name)), "block": Ref(seq, (block,))}.get(ctx, Ref(seq, (Span(None, -1),)))
            return Ref(n.value(name))  # parameters (and their row blocks) are bound once
        region = self.plan.region_of[name]
        seq = n("seq", name)
        if name in g.state_names:
            return {"loop": Ref(n.value(name)), "block": Ref(seq, (Span(t0 + 1, t1 + 1),))}.get(ctx, Ref(seq, (Span(1, None),)))
        if ctx == "loop" and region == "loop":
            return Ref(n.value(name))
        return {"loop": Ref(seq, (t,)), "block": Ref(seq, (block,))}.get(ctx, Ref(seq))

    def refs(self, ctx: str) -> dict[str, Ref]:
        """Every value of the step graph -> its array in context ``ctx``."""
        table = {leaf.name: self.ref_of(leaf.name, ctx) for leaf in self.g.leaves if leaf.kind != "target"}
        table.update({n.name: self.ref_of(n.name, ctx) for n in self.g.nodes})
        return table

    def ew(self, expr: sympy.Expr, ctx: str, extra: dict | None = None) -> Elementwise:
        """An elementwise expression over the values of the step graph in context ``ctx``
        (``extra``: more symbols, or other arrays for some)."""
        table = {**self.refs(ctx), **(extra or {})}
        return Elementwise(expr, tuple((s.name, table[s.name]) for s in sorted(expr.free_symbols, key=lambda s: s.name)
                                       if s.name in table))

    def weight_ref(self, mv: MatVecNode, base: str | None = None) -> Ref:
        """The rows and columns of its parameter one product uses (of ``base``: the
        parameter's gradient, say)."""
        return weight_ref(self.g, self.n, mv, base)

    # -- the module ---------------------------------------------------------------
    def run(self) -> NumpyModule:
        self.setup()
        self.forward()
        self.backward()
        self.rtrl()
        self.loss()
        m = self.m
        if "lean_buffers" in self.passes:
            lean_buffers(m, {grad: self.n.value(param) for grad, param in self.grad_of.items()}, self.d_x)
        if "stack_blocks" in self.passes:
            stack_module(m, *self.param_shapes(), self.n.fresh)
        if "centred_in_place" in self.passes:
            centre_module(m, *self.param_shapes())
        if "input_side_in_loop" in self.passes:
            input_side_in_loop(m, frozenset(s.dst.name for s in m.setup if isinstance(s, Assign) and isinstance(s.dst, Ref)))
        m.forward_setup = self.used_setup(m.stacks, m.forward_pre, m.forward_alloc, m.forward_loop, m.forward_post)
        m.backward_setup = self.used_setup(m.backward_seed, m.backward_post, m.backward_coefs, m.backward_loop,
                                           m.backward_after, m.backward_pre, m.backward_weights)
        m.rtrl_bind = self.used_setup(m.rtrl_setup, m.rtrl_loop, m.rtrl_carry, m.rtrl_cot,
                                      [Assign(Ref("_"), v) for _, v in m.rtrl_grads])
        m.generated_names = self.n.names()
        read = set().union(*(s.reads for section in (m.forward_pre, m.forward_loop, m.forward_post, m.backward_post,
                                                       m.backward_coefs, m.backward_loop, m.backward_after, m.backward_pre)
                             for s in section))
        m.coef_steps = block_steps(len(m.backward_coefs))
        m.helpers = helpers_used(read)  # the unit_products pass's helpers it calls
        return self.printed(m)

    def printed(self, m: NumpyModule) -> NumpyModule:
        """The module's sections, statements printed as lines (the template's data)."""
        printer = PythonPrinter()
        for section in ("forward_setup", "backward_setup", "rtrl_bind", "stacks", "forward_pre", "forward_alloc",
                        "forward_loop", "forward_post", "forward_hold", "backward_seed", "backward_carry", "backward_post",
                        "backward_coefs", "backward_loop", "backward_after", "backward_pre", "backward_weights",
                        "rtrl_setup", "rtrl_loop", "rtrl_carry", "rtrl_cot"):
            setattr(m, section, printer.lines(getattr(m, section)))
        for pairs in ("outputs", "finals", "grads", "rtrl_grads"):
            setattr(m, pairs, [(k, printer.value(v)) for k, v in getattr(m, pairs)])
        return m

    def param_shapes(self) -> tuple[dict, frozenset[str]]:
        """(rank, last-axis size) of each parameter and its gradient, and the names of the vectors
        among them (passes/stack_blocks.py)."""
        shapes, vectors = {}, set()
        grads = {param: grad for grad, param in self.grad_of.items()}
        for p in self.g.params:
            shape = (len(p.shape), p.shape[-1] if p.shape else sympy.Integer(1))
            for name in (self.n.value(p.name), grads.get(p.name)):
                if name is not None:
                    shapes[name] = shape
                    if len(p.shape) == 1:
                        vectors.add(name)
        return shapes, frozenset(vectors)

    def used_setup(self, *bodies: list) -> list:
        """The setup statements a function needs: every parameter, and the row blocks and
        derived matrices it reads."""
        read = set()
        for body in bodies:
            for s in body:
                read |= s.reads
        return [s for s in self.m.setup if getattr(s.value, "name", "") == "p" or s.dst.name in read]

    @property
    def d_x(self) -> str:
        """The adjoint of the input over every step (the gradient "x")."""
        return self.n("adj_seq", self.g.input.name)

    def grad(self, param: str) -> str:
        """The name of a parameter's gradient."""
        name = self.n("adj", param)
        self.grad_of[name] = param
        return name

    def setup(self) -> None:
        m, g, n = self.m, self.g, self.n
        for p in g.params:
            m.setup.append(Assign(Ref(n.value(p.name)), Ref("p", (Key(p.name),))))
        m.setup.extend(derived_setup(g, n))
        for leaf in g.leaves:
            if leaf.kind == "param" and leaf.block is not None:
                m.setup.append(Assign(Ref(n.value(leaf.name)), Ref(n.value(leaf.param), (span(leaf.block * leaf.size, leaf.size),))))
        for region in self.plan.regions:
            for stage in region.stages:
                for group in stage.groups:
                    self.weights[group.name] = group_weight(self.g, self.n, group, self.m.stacks, self.stacked)

    def transposed(self, group: GemmGroup) -> str:
        """W^T of a per-step product as a contiguous array, made once per call (per-step
        products are ``np.dot``: for 2-D operands the same GEMM as ``np.matmul``, with about
        1 us less dispatch per call, a few percent of a step at small sizes): OpenBLAS
        multiplies one step's (B, H) by it faster than by the transposed view (up to
        1.4x in float32 at B=32, H=256).  The copy costs ~7 ms for a 512 x 2048 float32
        weight, so products done once (all steps in one GEMM) keep the view."""
        w = self.weights[group.name]
        if w not in self.transposes:
            stem = (w.name if not w.index else f"W_{group.name}") + "_T"
            self.transposes[w] = self.n.fresh(stem)
            self.m.stacks.append(Assign(Ref(self.transposes[w]), Call("ascontiguousarray", (w.t,))))
        return self.transposes[w]

    # -- forward ------------------------------------------------------------------
    def forward(self) -> None:
        emit_forward(self)

    def label(self, node) -> str:
        """The label of the equation a node implements (as in ``symrnn latex``)."""
        return f"eq:{self.g.cell}:{node.name if node.role != 'auxiliary' else node.equation or node.name}"

    # -- backward -----------------------------------------------------------------
    def backward(self) -> None:
        emit_backward(self)

    # -- forward mode (RTRL) ------------------------------------------------------
    def rtrl(self) -> None:
        """The statements of ``_rtrl`` (symrnn.backends.numpy_rtrl)."""
        self.m.rtrl_setup, self.m.rtrl_loop, self.m.rtrl_carry, self.m.rtrl_cot, self.m.rtrl_grads = emit_rtrl(self)

    # -- loss ----------------------------------------------------------------------
    def loss(self) -> None:
        if self.g.loss is not None:
            self.m.loss_value, self.m.loss_grad, self.m.loss_scale = loss_code(self.plan)

