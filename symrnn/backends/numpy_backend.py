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

import re
from dataclasses import dataclass, field

import sympy

from ..errors import InternalError
from ..ir import MatVecNode, Pointwise
from ..naming import PYTHON_FIXED, Namer
from ..plan import GemmGroup, KernelPlan, Region, Stage
from ..printing import numpy_code
from ..stmt import ALL, Assign, Call, Concat, Elementwise, Key, Ref, Span, t0_SYM, t1_SYM, t_SYM
from .numpy_forward import emit_forward
from .numpy_rtrl import emit_rtrl
from .python_printer import PythonPrinter, span

__all__ = ["emit"]


def dim(expr: sympy.Expr) -> str:
    """A size as Python code in n_in, n_hidden, n_out."""
    return numpy_code(sympy.sympify(expr, strict=True))


def steps_matmul(a: str, a_cols: str, b: str, rows: str) -> str:
    """``a @ b`` for ``a`` of shape (T, B, a_cols): one GEMM over all T * B rows.

    (NumPy runs a 3-D ``a @ b`` as T separate small products, several times slower.)"""
    return f"({a}.reshape(-1, {a_cols}) @ {b}).reshape(T, B, {rows})"


def _words(code: str) -> list[str]:
    return re.findall(r"\b[A-Za-z_]\w*\b", code.split("#")[0])


#: the kinds of name (symrnn.naming) that hold adjoints
_ADJOINT_KINDS = frozenset({"adj", "adj_part", "adj_from", "adj_via", "adj_next", "adj_seq", "gadj_seq"})


def _slice(start: sympy.Expr, size: sympy.Expr) -> str:
    lo, hi = dim(start), dim(sympy.expand(start + size))
    return f"{'' if lo == '0' else lo}:{hi}"


@dataclass
class NumpyModule:
    """Plain data for the template."""

    setup: list[str] = field(default_factory=list)  # bind parameters and their row blocks
    forward_setup: list[str] = field(default_factory=list)  # ... those forward reads
    backward_setup: list[str] = field(default_factory=list)
    rtrl_bind: list[str] = field(default_factory=list)
    stacks: list[str] = field(default_factory=list)  # stacked weights (forward computes, cache keeps)
    forward_pre: list[str] = field(default_factory=list)
    forward_alloc: list[str] = field(default_factory=list)
    forward_loop: list[str] = field(default_factory=list)
    forward_post: list[str] = field(default_factory=list)
    cache_names: list[str] = field(default_factory=list)
    outputs: list[tuple[str, str]] = field(default_factory=list)
    backward_seed: list[str] = field(default_factory=list)
    backward_carry: list[str] = field(default_factory=list)  # each state's adjoint from step t + 1, zero at T - 1
    backward_post: list[str] = field(default_factory=list)
    backward_coefs: list[str] = field(default_factory=list)  # per block of steps, before the loop over it
    backward_loop: list[str] = field(default_factory=list)
    backward_after: list[str] = field(default_factory=list)
    backward_pre: list[str] = field(default_factory=list)
    backward_weights: list[str] = field(default_factory=list)
    grads: list[tuple[str, str]] = field(default_factory=list)
    rtrl_setup: list[str] = field(default_factory=list)
    rtrl_loop: list[str] = field(default_factory=list)
    rtrl_grads: list[tuple[str, str]] = field(default_factory=list)
    loss_value: str = ""
    loss_grad: str = ""
    loss_scale: str = ""
    generated_names: frozenset[str] = frozenset()  # every name the namer gave out


def module_namer(plan: KernelPlan) -> Namer:
    """The namer of a NumPy (or CuPy) module: every value of the step graph keeps its
    name where Python, the template and the other names allow; the input reads ``x``."""
    g = plan.graph
    values = [p.name for p in g.params] + [leaf.name for leaf in g.leaves if leaf.kind not in ("input", "target")]
    values += [n.name for n in g.nodes]
    return Namer(PYTHON_FIXED, dict.fromkeys(values), spellings={g.input.name: "x"})


def emit(plan: KernelPlan) -> NumpyModule:
    """The statements of the generated module for ``plan``."""
    return _Emitter(plan).run()


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
    def __init__(self, plan: KernelPlan):
        self.plan, self.g, self.d = plan, plan.graph, plan.derivation
        self.n = module_namer(plan)
        self.m = NumpyModule()
        self.weights: dict[str, str] = {}  # group name -> weight code
        self.stacked: set[str] = set()  # stacked weights (the cache keeps them for backward)
        self.grad_of: dict[str, str] = {}  # a parameter's gradient name -> the parameter
        self.alias: dict[str, str] = {}  # adjoint name -> the name holding the same value
        self.acc: dict[str, list[str]] = {}  # value -> names of the arrays its adjoint sums
        self.group_buffers: dict[str, tuple[str, tuple]] = {}  # loop adjoint buffer -> (owner group, adjoints of its slots)
        self.destination: dict[str, str] = {}  # loop adjoint -> its slot in an adjoint buffer
        self.in_place: set[str] = set()  # loop adjoints computed directly into their slot
        self.region_name = ""
        self.temporaries = self.n.numbered("d_tmp")  # names of shared subexpressions
        self.stage: Stage | None = None
        self.shared_members: dict[str, str] = {}  # input-side product -> recurrent product, same adjoint
        self.shared_groups: dict[str, str] = {}
        self.partial_groups: dict[str, GemmGroup] = {}  # input-side groups some of whose members share a loop slot
        self.member_source: dict[str, tuple] = {}  # input-side product -> (loop group, offset) holding its adjoint
        self.routed: dict[sympy.Expr, str] = {}  # a step's whole contribution to an input-side buffer -> the buffer
        self.loop_buffer: dict[str, str] = {}  # loop group name -> its adjoint buffer
        self.slots: dict[str, tuple[str, str | None]] = {}  # loop adjoint -> (buffer over all steps, its columns there)
        self.deferred_sums: list = []  # (parameter leaf, adjoint name): sums over stored buffers
        self.coefs: dict[sympy.Expr, str] = {}  # coefficient of the adjoint recursion -> its buffer
        self.coef_refs: dict[str, str] = {}  # coefficient buffer -> its value at step t
        self.block_coefs: list[tuple[str, sympy.Expr]] = []  # (buffer, coefficient) computed per block of steps
        self.transposes: dict[str, str] = {}  # weight code -> its contiguous transpose

    # -- names in each context ----------------------------------------------------
    def ref_of(self, name: str, ctx: str) -> Ref:
        """The array of value ``name`` in context ``ctx`` ('loop': one step t; 'all': every
        step; 'block': the steps t0 .. t1 - 1)."""
        g, n = self.g, self.n
        t, t0, t1 = t_SYM, t0_SYM, t1_SYM
        block, every = Span(t0, t1), Ref(name)
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
        del every
        return {"loop": Ref(seq, (t,)), "block": Ref(seq, (block,))}.get(ctx, Ref(seq))

    def refs(self, ctx: str) -> dict[str, Ref]:
        """Every value of the step graph -> its array in context ``ctx``."""
        table = {leaf.name: self.ref_of(leaf.name, ctx) for leaf in self.g.leaves if leaf.kind != "target"}
        table.update({n.name: self.ref_of(n.name, ctx) for n in self.g.nodes})
        if ctx == "loop":
            table.update({name: Ref(name, (t_SYM - t0_SYM,)) if ref.endswith("]") else Ref(name)
                          for name, ref in self.coef_refs.items()})
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
        p = self.g.param(mv.param)
        base = base or self.n.value(mv.param)
        rows = ALL if mv.block is None else span(mv.block * mv.size, mv.size)
        full_cols = sympy.simplify(mv.cols[0]) == 0 and sympy.simplify(mv.cols[1] - p.shape[1]) == 0
        if full_cols:
            return Ref(base) if rows is ALL else Ref(base, (rows,))
        return Ref(base, (rows, span(mv.cols[0], mv.cols[1] - mv.cols[0])))

    def ref(self, name: str, ctx: str) -> str:
        """Code for value ``name`` in context ``ctx`` ('loop': one step t; 'all': every step;
        'block': the steps t0 .. t1 - 1)."""
        g, n = self.g, self.n
        if g.is_leaf(name):
            leaf = g.leaf(name)
            if leaf.kind == "input":
                return {"loop": "x[t]", "block": "x[t0:t1]"}.get(ctx, "x")
            if leaf.kind == "prev_state":
                seq = n("seq", leaf.state)
                return {"loop": n.value(name), "block": f"{seq}[t0:t1]"}.get(ctx, f"{seq}[:-1]")
            return n.value(name)  # parameters (and their row blocks) are bound once
        region = self.plan.region_of[name]
        seq = n("seq", name)
        if name in g.state_names:
            return {"loop": n.value(name), "block": f"{seq}[t0 + 1:t1 + 1]"}.get(ctx, f"{seq}[1:]")
        if ctx == "loop" and region == "loop":
            return n.value(name)
        return {"loop": f"{seq}[t]", "block": f"{seq}[t0:t1]"}.get(ctx, seq)

    def names(self, ctx: str) -> dict[str, str]:
        table = {leaf.name: self.ref(leaf.name, ctx) for leaf in self.g.leaves if leaf.kind != "target"}
        table.update({n.name: self.ref(n.name, ctx) for n in self.g.nodes})
        if ctx == "loop":
            table.update(self.coef_refs)
        return table

    def code(self, expr: sympy.Expr, ctx: str, extra: dict[str, str] | None = None) -> str:
        return numpy_code(expr, {**self.names(ctx), **(extra or {})})

    # -- the module ---------------------------------------------------------------
    def run(self) -> NumpyModule:
        self.setup()
        self.forward()
        self.backward()
        self.rtrl()
        self.loss()
        m = self.m
        self.lean_buffers()
        m.forward_setup = self.used_setup(m.stacks, m.forward_pre, m.forward_alloc, m.forward_loop, m.forward_post)
        m.backward_setup = self.used_setup(m.backward_seed, m.backward_post, m.backward_coefs, m.backward_loop,
                                           m.backward_after, m.backward_pre, m.backward_weights)
        m.rtrl_bind = self.used_setup(m.rtrl_setup, m.rtrl_loop, [Assign(Ref("_"), v) for _, v in m.rtrl_grads])
        m.generated_names = self.n.names()
        return self.printed(m)

    def printed(self, m: NumpyModule) -> NumpyModule:
        """The module's sections, statements printed as lines (the template's data)."""
        printer = PythonPrinter()
        for section in ("forward_setup", "backward_setup", "rtrl_bind", "stacks", "forward_pre", "forward_alloc",
                        "forward_loop", "forward_post", "backward_seed", "backward_carry", "backward_post",
                        "backward_coefs", "backward_loop", "backward_after", "backward_pre", "backward_weights",
                        "rtrl_setup", "rtrl_loop"):
            setattr(m, section, printer.lines(getattr(m, section)))
        for pairs in ("outputs", "grads", "rtrl_grads"):
            setattr(m, pairs, [(k, v if isinstance(v, str) else printer.value(v)) for k, v in getattr(m, pairs)])
        return m

    def lean_buffers(self) -> None:
        """Backward allocates no more than it writes: a seed nothing adds into is read
        from the caller's array (or a broadcast zero); when the first write to d_x is a
        GEMM over every step, that GEMM writes into it (no zero fill, no temporary); so
        does a weight's gradient GEMM when it is the only write to that gradient."""
        m = self.m
        later = [*m.backward_post, *m.backward_coefs, *m.backward_loop, *m.backward_after, *m.backward_pre, *m.backward_weights]
        code = "\n".join(line.split("#")[0] for line in later)
        for i, line in enumerate(m.backward_weights):
            match = re.match(r"^(\w+) \+= (.+\.T) @ (.+)$", line)
            if not match or match.group(1) not in self.grad_of:
                continue
            grad = match.group(1)
            if len(re.findall(rf"(\b{grad}\b(\[[^\]]*\])? \+?=)|(out={grad}\b)", code)) != 1:
                continue
            param = self.n.value(self.grad_of[grad])
            m.backward_weights[i] = f"np.matmul({match.group(2)}, {match.group(3)}, out={grad})"
            m.backward_seed[m.backward_seed.index(f"{grad} = np.zeros_like({param})")] = f"{grad} = np.empty_like({param})"
        for i, line in enumerate(m.backward_seed):
            match = re.match(r"^(\w+) = _seed\((.*)\)$", line)
            if match and not re.search(rf"\b{match.group(1)}(\[[^\]]*\])? \+?=", code):
                m.backward_seed[i] = f"{match.group(1)} = _seed({match.group(2)}, writable=False)"
        d_x = re.escape(self.n("adj_seq", self.g.input.name))
        for body in (m.backward_post, m.backward_coefs, m.backward_loop, m.backward_after, m.backward_pre):
            for i, line in enumerate(body):
                if not re.search(rf"\b{d_x}\b", line.split("#")[0]):
                    continue
                match = re.match(rf"^{d_x} \+= \((.*) @ (.*)\)\.reshape\(T, B, n_in\)$", line.split("  #")[0])
                if match:
                    body[i] = f"np.matmul({match.group(1)}, {match.group(2)}, out={self.d_x}.reshape(-1, n_in))"
                    m.backward_seed[m.backward_seed.index(f"{self.d_x} = np.zeros_like(x)")] = f"{self.d_x} = np.empty((T, B, n_in), dtype)"
                return

    def used_setup(self, *bodies: list) -> list:
        """The setup statements a function needs: every parameter, and the row blocks it reads."""
        read = set()
        for body in bodies:
            for s in body:
                read |= set(_words(s)) if isinstance(s, str) else s.reads  # (lines: while backward is text)
        return [s for s in self.m.setup if s.value.name == "p" or s.dst.name in read]

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
        for leaf in g.leaves:
            if leaf.kind == "param" and leaf.block is not None:
                m.setup.append(Assign(Ref(n.value(leaf.name)), Ref(n.value(leaf.param), (span(leaf.block * leaf.size, leaf.size),))))
        for region in self.plan.regions:
            for stage in region.stages:
                for group in stage.groups:
                    self.weights[group.name] = self.stack(group)

    def weight_code(self, group: GemmGroup) -> str:
        """The stacked weight of a group, as code (for the sections not yet statements)."""
        return PythonPrinter().value(self.weights[group.name])

    def member_weight(self, mv: MatVecNode, base: str | None = None) -> str:
        """The rows and columns of its parameter one product uses (of ``base``: the
        parameter's gradient, say)."""
        p = self.g.param(mv.param)
        base = base or self.n.value(mv.param)
        rows = "" if mv.block is None else _slice(mv.block * mv.size, mv.size)
        full_cols = sympy.simplify(mv.cols[0]) == 0 and sympy.simplify(mv.cols[1] - p.shape[1]) == 0
        cols = "" if full_cols else _slice(mv.cols[0], mv.cols[1] - mv.cols[0])
        if not rows and not cols:
            return base
        return f"{base}[{rows or ':'}{', ' + cols if cols else ''}]"

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

    def stack(self, group: GemmGroup) -> Ref:
        """The weight of a group's product: a parameter, rows and columns of one, or the
        members' stacked (concatenated once per call, kept in the cache for backward)."""
        if group.whole_param:
            return Ref(self.n.value(group.whole_param))
        if len(group.members) == 1:
            return self.weight_ref(group.members[0])
        name = self.n.get(("stack", group.name), f"W_stack_{self.n.spelling(group.operand)}")
        self.stacked.add(name)
        parts = tuple(self.weight_ref(mv) for mv in group.members)
        self.m.stacks.append(Assign(Ref(name), Concat(parts, 0), f"stacked: one GEMM for {len(group.members)} products"))
        return Ref(name)

    # -- forward ------------------------------------------------------------------
    def forward(self) -> None:
        emit_forward(self)

    def label(self, node) -> str:
        """The label of the equation a node implements (as in ``symrnn latex``)."""
        return f"eq:{self.g.cell}:{node.name if node.role != 'auxiliary' else node.equation or node.name}"

    # -- backward -----------------------------------------------------------------
    def shared_adjoints(self) -> dict[str, str]:
        """Input-side products whose adjoint provably equals a recurrent product's.

        W_x x and W_h h_prev added into the same pre-activations have the same
        consumers with the same partial derivatives, hence the same adjoint: the
        input side then reads the recurrent GEMM's adjoint buffer instead of
        keeping a copy.  Returns pre-region group name -> loop group name."""
        shared = {}
        loop_groups = [grp for st in self.plan.loop.stages for grp in st.groups]
        for stage in self.plan.pre.stages:
            for pre in stage.groups:
                for rec in loop_groups:
                    if len(pre.members) == len(rec.members) and all(
                        self.same_adjoint(a, b) for a, b in zip(pre.members, rec.members)
                    ):
                        shared[pre.name] = rec.name
                        self.shared_members.update({a.name: b.name for a, b in zip(pre.members, rec.members)})
                        break
                else:
                    if pre.operand != self.g.input.name:
                        continue
                    # member by member (GRU: r and z share, n keeps its own)
                    for a in pre.members:
                        for rec in loop_groups:
                            for b, off in zip(rec.members, rec.offsets):
                                if a.name not in self.member_source and self.same_adjoint(a, b):
                                    self.member_source[a.name] = (rec, off)
                                    self.shared_members[a.name] = b.name
                    if any(a.name in self.member_source for a in pre.members):
                        self.partial_groups[pre.name] = pre
        return shared

    def same_adjoint(self, a: MatVecNode, b: MatVecNode) -> bool:
        consumers_a = {c.name for c in self.g.consumers(a.name)}
        if consumers_a != {c.name for c in self.g.consumers(b.name)} or sympy.simplify(a.size - b.size) != 0:
            return False
        loop = set(self.plan.loop.nodes)
        return consumers_a <= loop and all(
            isinstance(self.g.node(c), Pointwise) and self.d.partial(c, a.name) == self.d.partial(c, b.name)
            for c in consumers_a
        )

    def backward(self) -> None:
        m, g, plan, n = self.m, self.g, self.plan, self.n
        self.shared_groups = self.shared_adjoints()
        for s in g.states:
            m.backward_seed.append(f'{n("adj_seq", s.name)} = _seed(grad_outputs, "{s.name}", (T, B, {dim(s.size)}), dtype)')
        for r in g.readouts:
            m.backward_seed.append(f'{n("adj_seq", r)} = _seed(grad_outputs, "{r}", (T, B, {dim(g.node(r).size)}), dtype)')
            self.acc[r] = [n("adj_seq", r)]
        # adjoint buffers for values that receive contributions from a later region
        order = {"pre": 0, "loop": 1, "post": 2}
        for node in g.nodes:
            if node.name in g.state_names or node.name in g.readouts:
                continue
            mine = order[plan.region_of[node.name]]
            later = any(order[plan.region_of[c.name]] > mine for c in g.consumers(node.name))
            if later and node.name not in self.shared_members:
                m.backward_seed.append(f"{n('adj_seq', node.name)} = np.zeros((T, B, {dim(node.size)}), dtype)")
        m.backward_seed.append(f"{self.d_x} = np.zeros_like(x)")
        for p in g.params:
            m.backward_seed.append(f"{self.grad(p.name)} = np.zeros_like({n.value(p.name)})")

        m.backward_carry = [f"{n('adj_next', s.name)} = np.zeros((B, {dim(s.size)}), dtype)" for s in g.states]
        self.region_backward(plan.post, "all", m.backward_post)
        for s in g.states:
            self.acc.setdefault(s.name, []).extend([f"{n('adj_seq', s.name)}[t]", n("adj_next", s.name)])
        for name in plan.loop.nodes:
            if name not in g.state_names and any(plan.region_of[c.name] == "post" for c in g.consumers(name)):
                self.acc.setdefault(name, []).append(f"{n('adj_seq', name)}[t]")
        self.region_backward(plan.loop, "loop", m.backward_loop)
        self.parameter_sums()
        for name in plan.pre.nodes:
            if name in self.shared_members:
                self.acc[name] = [n("adj", self.shared_members[name])]  # never printed: see gemm_backward
            elif any(plan.region_of[c.name] != "pre" for c in g.consumers(name)):
                self.acc.setdefault(name, []).append(n("adj_seq", name))
        self.region_backward(plan.pre, "all", m.backward_pre)
        self.share_coefficients()
        # initial states and the input
        m.grads = [(p.name, self.grad(p.name)) for p in g.params] + [("x", self.d_x)]
        m.grads += [(f"{s.name}0", n("adj_next", s.name)) for s in g.states]

    def parameter_sums(self) -> None:
        """Gradients of elementwise parameters whose adjoint a buffer stores: one sum per
        buffer over the steps and the batch, shared by every parameter that reads it
        (PyTorch's two biases get the same sum)."""
        totals: dict[str, str] = {}
        for leaf, name in self.deferred_sums:
            name = self.alias.get(name, name)
            p = self.g.param(leaf.param)
            rows = "" if leaf.block is None else f"[{_slice(leaf.block * leaf.size, leaf.size)}]"
            if name not in self.slots:
                raise InternalError(f"adjoint '{name}' of cell '{self.g.cell}' is not stored over the steps")
            buf, cols = self.slots[name]
            grad = self.grad(p.name)
            if p.kind == "scalar":
                self.m.backward_after.append(f"{grad}{rows} += np.sum({buf}{f'[..., {cols}]' if cols else ''})")
                continue
            if buf not in totals:
                totals[buf] = self.n.fresh(f"{buf.removesuffix('_seq')}_sum")
                self.m.backward_after.append(f"{totals[buf]} = np.sum({buf}, axis=(0, 1))  # over the steps and the batch")
            self.m.backward_after.append(f"{grad}{rows} += {totals[buf]}{f'[{cols}]' if cols else ''}")

    def region_backward(self, region: Region, ctx: str, out: list[str]) -> None:
        g = self.g
        self.region_name = region.name
        for k in reversed(range(len(region.stages))):
            self.stage_backward(region, region.stages[k], k, ctx, out)
        if ctx == "loop":
            n = self.n
            bind = [f"{n.value(name)} = {self.bind_code(name)}" for name in self.loop_bindings(out)]
            prev = []
            for s in g.states:
                terms = self.acc.get(s.prev, [])
                carry = n("adj_next", s.name)
                prev.append(f"{carry} = {' + '.join(terms) if terms else f'np.zeros_like({carry})'}")
            out[:] = bind + out + prev

    def loop_bindings(self, lines: list[str]) -> list[str]:
        """Forward values the loop body reads, in graph order."""
        code = "\n".join(line.split("#")[0] for line in lines)  # comments cite labels, not values
        used = set(_words(code))
        names = []
        for s in self.g.states:
            if self.n.value(s.prev) in used:
                names.append(s.prev)
        for node in self.g.nodes:
            if self.n.value(node.name) in used and self.plan.region_of[node.name] == "loop":
                names.append(node.name)
        return names

    def bind_code(self, name: str) -> str:
        g, n = self.g, self.n
        if g.is_leaf(name):
            return f"{n('seq', g.leaf(name).state)}[t]"
        if name in g.state_names:
            return f"{n('seq', name)}[t + 1]"
        if name in self.plan.stored:
            return f"{n('seq', name)}[t]"
        raise InternalError(f"backward of cell '{g.cell}' reads '{name}', which forward does not store")

    def stage_backward(self, region: Region, stage: Stage, k: int, ctx: str, out: list[str]) -> None:
        g, d = self.g, self.d
        self.stage = stage
        final_pw = {n.name for n in stage.pointwise}
        final = [n for n in g.nodes if n.name in final_pw or n.name in {mv.name for mv in stage.matvecs}]
        seen: dict[sympy.Expr, str] = {}  # adjoint expression -> the name that holds it
        nonzero: set[str] = set()
        stmts: list[tuple[str, sympy.Expr | None]] = []  # (line with {} for the expression, expression)
        for node in reversed(final):
            if node.name in self.shared_members and ctx == "all":
                nonzero.add(node.name)  # held by the recurrent GEMM's adjoint buffer
                continue
            terms = [sympy.Symbol(src) for src in self.acc.get(node.name, [])]
            for c, coeff in d.adjoint_terms(node.name):
                if c in final_pw and c in nonzero:
                    terms.append(coeff * self.adjoint(c))
            expr = sympy.Add(*terms)
            if expr == 0:
                continue
            nonzero.add(node.name)
            stmts.append(self.assign(self.n("adj", node.name), expr, ctx, seen, label=f"eq:{g.cell}:adj:{node.name}"))
        # contributions to values outside this stage
        targets = sorted({dep for n in stage.pointwise for dep in n.deps} - {n.name for n in final},
                         key=lambda name: (g.is_leaf(name), self.order(name)))  # values first, then parameters
        for dep in targets:
            expr = sympy.Add(*[d.partial(c.name, dep) * self.adjoint(c.name) for c in stage.pointwise if c.name in nonzero])
            if expr != 0:
                self.route(dep, expr, k, ctx, stmts, seen)
        if ctx == "loop":
            stmts = self.linearize(stmts, stage)
            for group in stage.groups:
                self.loop_adjoint_buffer(group, nonzero)
        self.print_with_cse(stmts, ctx, out)
        for group in stage.groups:
            self.gemm_backward(region, group, ctx, out, nonzero)

    def adjoint(self, name: str) -> sympy.Symbol:
        """The symbol of a value's adjoint at one step."""
        return sympy.Symbol(self.n("adj", name))

    def is_adjoint(self, symbol: sympy.Symbol) -> bool:
        """An adjoint's symbol: its name, or one step of an adjoint buffer (``d_h_seq[t]``)."""
        return self.n.kind(symbol.name.split("[", 1)[0]) in _ADJOINT_KINDS

    def assigned(self, template: str) -> str | None:
        """The adjoint a statement template ``<adjoint> = {}`` assigns, if it is one."""
        lhs, sep, _ = template.partition(" = {}")
        return lhs if sep and self.n.kind(lhs) in _ADJOINT_KINDS else None

    def one_term(self, expr: sympy.Expr) -> bool:
        """One adjoint times a coefficient: substituting it into several users adds no work."""
        return len([s for s in expr.free_symbols if self.is_adjoint(s)]) == 1 and not expr.is_Add

    def linearize(self, stmts: list, stage: Stage) -> list:
        """Leave in the loop only what depends on the incoming adjoints.

        Every adjoint statement is linear in adjoints, with coefficients that
        are functions of stored forward values only.  First, an adjoint used
        once (or defined as one adjoint times a coefficient) is substituted
        into its user, so chains such as d_tanh_c = d_h o, d_c += d_tanh_c (1 -
        tanh_c^2) collapse into one product.  Then each statement is split into
        sum_j d_j * k_j; a coefficient k_j that is more than a number or one
        stored value becomes a buffer computed for a block of steps at once,
        before the loop runs over that block (``backward_coefs``)."""
        keep = {self.n("adj", mv.name) for mv in stage.matvecs}  # written to the GEMM's adjoint buffer
        keep |= {name for names in self.acc.values() for name in names}
        keep |= set(self.alias) | set(self.alias.values())
        uses: dict[str, int] = {}
        for template, expr in stmts:
            names = [s.name for s in expr.free_symbols] if expr is not None else _words(template.split("=", 1)[1])
            for name in names:
                uses[name] = uses.get(name, 0) + 1
        inlined: dict[sympy.Symbol, sympy.Expr] = {}
        kept = []
        for template, expr in stmts:
            if expr is not None:
                expr = expr.xreplace(inlined)
            name = self.assigned(template)
            if name and expr is not None and name not in keep and (uses.get(name, 0) <= 1 or self.one_term(expr)):
                inlined[sympy.Symbol(name)] = expr
                continue
            kept.append((template, expr))
        return [(template, self.split_coefficients(template, expr) if expr is not None else None) for template, expr in kept]

    def split_coefficients(self, template: str, expr: sympy.Expr) -> sympy.Expr:
        """``expr`` = sum_j d_j * k_j with each non-trivial k_j replaced by its buffer."""
        adjoints = sorted((s for s in expr.free_symbols if self.is_adjoint(s)), key=lambda s: s.name)
        terms = [(a, sympy.factor_terms(sympy.diff(expr, a))) for a in adjoints]
        # linear: no coefficient holds an adjoint (so expr is affine in them) and expr is 0 where
        # they are (then expr = sum_j a_j k_j exactly; an expand to check it is exponential in
        # the nesting of the cell's functions)
        if any(k.has(*adjoints) for _, k in terms) or expr.xreplace({a: 0 for a in adjoints}) != 0:
            raise InternalError(f"adjoint statement '{template}' of cell '{self.g.cell}' is not linear in the adjoints: {expr}")
        target = self.assigned(template) or "d_"
        return sympy.Add(*[a * self.coefficient(k, a.name, target) for a, k in terms])

    def coefficient(self, k: sympy.Expr, source: str, target: str) -> sympy.Expr:
        """A symbol for coefficient ``k`` (a buffer over a block of steps), or ``k`` itself when trivial."""
        if k.is_Number or k.is_Symbol or (-k).is_Symbol:
            return k
        if k not in self.coefs:
            src, tgt = source[2:], target[2:]
            name = self.n.fresh(f"d{src}_d{tgt}" if src.isidentifier() and tgt.isidentifier() else "d_coef")
            self.coefs[k] = name
            varies = any(not self.g.is_leaf(s.name) or self.g.leaf(s.name).kind != "param" for s in k.free_symbols)
            if varies:
                self.coef_refs[name] = f"{name}[t - t0]"
                self.block_coefs.append((name, k))  # printed by share_coefficients
            else:  # parameters only: once
                self.coef_refs[name] = name
                self.m.backward_seed.append(f"{name} = {self.code(k, 'all')}")
        return sympy.Symbol(self.coefs[k])

    def share_coefficients(self) -> None:
        """Print the per-block coefficients, their common subexpressions computed once
        (sympy.cse): GRU's r (1 - n^2)(1 - z) appears in three of its four coefficients."""
        replacements, reduced = sympy.cse([k for _, k in self.block_coefs], symbols=self.n.numbered("coef_tmp"), order="none")
        rename = {sym: sympy.Symbol(self.n.fresh("common")) for sym, _ in replacements}
        own = {s.name: s.name for s in rename.values()}  # printed as themselves, not as stored values
        lines = [(rename[sym].name, expr) for sym, expr in replacements] + [(name, k) for (name, _), k in zip(self.block_coefs, reduced)]
        self.m.backward_coefs.extend(f"{name} = {self.code(expr.xreplace(rename), 'block', own)}" for name, expr in lines)

    def print_with_cse(self, stmts: list, ctx: str, out: list[str]) -> None:
        """Print a stage's statements, common subexpressions shared (sympy.cse).

        Each temporary is placed just before the first statement that reads it,
        so it may use the adjoints computed by the statements above."""
        exprs = [e for _, e in stmts if e is not None]
        replacements, reduced = sympy.cse(exprs, symbols=self.temporaries, order="none")
        definition = dict(replacements)
        position = {sym: i for i, (sym, _) in enumerate(replacements)}
        emitted: set[sympy.Symbol] = set()

        def place(expr: sympy.Expr) -> None:
            for sym in sorted(expr.free_symbols & definition.keys(), key=position.get):
                if sym not in emitted:
                    place(definition[sym])
                    emitted.add(sym)
                    out.append(f"{sym.name} = {self.code(definition[sym], ctx)}")

        reduced = iter(reduced)
        for template, expr in stmts:
            if expr is None:
                out.append(template)
                continue
            expr = next(reduced)
            place(expr)
            name = self.assigned(template)
            lhs = template.split(" = {}", 1)[0] if " = {}" in template else ""
            target = lhs if lhs.endswith("]") else None  # a buffer slot (d_W_x_seq[t])
            if name in self.destination:  # an adjoint whose slot in a GEMM's adjoint buffer is known
                target = name
            if ctx == "loop" and target and expr.is_Mul and len(expr.args) == 2:
                # one product, straight into the buffer's slot: no temporary, no copy
                a, b = (self.code(arg, ctx) for arg in expr.args)
                if target == name:
                    self.in_place.add(name)
                    out.append(f"{name} = {self.destination[name]}")
                out.append(f"np.multiply({a}, {b}, out={target}){template.split('{}', 1)[1]}")
                continue
            out.append(template.format(self.code(expr, ctx)))

    def order(self, name: str) -> tuple[int, str]:
        for i, leaf in enumerate(self.g.leaves):
            if leaf.name == name:
                return (i, name)
        return (len(self.g.leaves) + [n.name for n in self.g.nodes].index(name), name)

    def assign(self, name: str, expr: sympy.Expr, ctx: str, seen: dict, label: str = "") -> tuple[str, sympy.Expr | None]:
        """``name = expr``, or an alias when the same expression was computed already."""
        expr = sympy.factor_terms(expr)
        comment = f"  # {label}" if label else ""
        if expr in seen:
            self.alias[name] = seen[expr]
            return (f"{name} = {seen[expr]}{comment}", None)
        seen[expr] = name
        return (f"{name} = {{}}{comment}", expr)

    def route(self, dep: str, expr: sympy.Expr, k: int, ctx: str, out: list[str], seen: dict) -> None:
        """Add a stage's contribution ``expr`` to the adjoint of ``dep`` (outside the stage)."""
        g = self.g
        expr = sympy.factor_terms(expr)
        if expr in seen:  # the very value an adjoint already holds
            expr = sympy.Symbol(seen[expr])
        leaf = g.leaf(dep) if g.is_leaf(dep) else None
        if dep in self.shared_members:
            return  # the recurrent product's adjoint buffer holds this value already
        n = self.n
        stored = {n("adj", mv.name) for mv in self.stage.matvecs}  # written to a buffer over all steps
        if leaf is not None and leaf.kind == "param" and ctx == "loop" and expr.is_Symbol and self.alias.get(expr.name, expr.name) in stored:
            self.deferred_sums.append((leaf, expr.name))  # summed over every step after the loop
            return
        if leaf is not None and leaf.kind == "param" and ctx == "loop" and expr in self.routed and self.only_here(dep):
            self.slots.setdefault(self.routed[expr], (self.routed[expr], None))
            self.deferred_sums.append((leaf, self.routed[expr]))  # the same values as that buffer's
            return
        if leaf is not None and leaf.kind == "param":
            p = g.param(leaf.param)
            rows = "" if leaf.block is None else f"[{_slice(leaf.block * leaf.size, leaf.size)}]"
            axes = "" if p.kind == "scalar" else (", axis=0" if ctx == "loop" else ", axis=(0, 1)")
            out.append((f"{self.grad(p.name)}{rows} += np.sum({{}}{axes})", expr))
        elif leaf is not None and leaf.kind == "input":
            out.append((f"{self.d_x}{'[t]' if ctx == 'loop' else ''} += {{}}", expr))
        elif leaf is not None and leaf.kind == "prev_state":
            name = n("adj_part", dep, k)
            out.append(self.assign(name, expr, ctx, seen))
            self.acc.setdefault(dep, []).append(name)
        else:
            if self.plan.region_of[dep] == self.region_name:
                name = n("adj_from", dep, k)
                out.append(self.assign(name, expr, ctx, seen))
                self.acc.setdefault(dep, []).append(name)
            else:
                if ctx == "loop" and self.only_here(dep):  # this step's whole contribution
                    out.append((f"{n('adj_seq', dep)}[t] = {{}}", expr))
                    self.routed.setdefault(expr, n("adj_seq", dep))
                else:
                    out.append((f"{n('adj_seq', dep)}{'[t]' if ctx == 'loop' else ''} += {{}}", expr))

    def loop_adjoint_buffer(self, group: GemmGroup, nonzero: set[str]) -> tuple[str, bool]:
        """The buffer holding a loop GEMM's output adjoint for every step (for the weight
        gradient after the loop), and whether it is this group's own.  A member adjoint
        that is one product is written into its slot in place (``self.in_place``)."""
        if group.name in self.loop_buffer:
            buf = self.loop_buffer[group.name]
            return buf, self.group_buffers[buf][0] == group.name
        adj = [self.alias.get(self.n("adj", mv.name), self.n("adj", mv.name)) if mv.name in nonzero else None
               for mv in group.members]
        signature = tuple(adj)
        for buf, (_, held) in self.group_buffers.items():
            if held == signature:
                self.loop_buffer[group.name] = buf
                return buf, False
        buf = self.n("gadj_seq", group.name)
        self.loop_buffer[group.name] = buf
        self.group_buffers[buf] = (group.name, signature)
        self.m.backward_seed.append(f"{buf} = np.empty((T, B, {dim(group.rows)}), dtype)")
        for a, mv, off in zip(adj, group.members, group.offsets):
            if a:
                self.slots.setdefault(a, (buf, _slice(off, mv.size) if len(group.members) > 1 else None))
                self.destination.setdefault(a, self.slot(group, mv, off, buf))
        return buf, True

    @staticmethod
    def slot(group: GemmGroup, mv: MatVecNode, offset: sympy.Expr, buf: str) -> str:
        return f"{buf}[t]" if len(group.members) == 1 else f"{buf}[t, :, {_slice(offset, mv.size)}]"

    def only_here(self, name: str) -> bool:
        """Every consumer of ``name`` is a pointwise node of the current stage."""
        here = {n.name for n in self.stage.pointwise}
        return all(c.name in here for c in self.g.consumers(name))

    def gemm_backward(self, region: Region, group: GemmGroup, ctx: str, out: list[str], nonzero: set[str]) -> None:
        g, n = self.g, self.n
        w = self.weight_code(group)
        adj = [n("adj", mv.name) if mv.name in nonzero else None for mv in group.members]
        adj = [self.alias.get(a, a) if a else None for a in adj]
        if all(a is None for a in adj):
            return
        buf = n("gadj_seq", group.name)
        if ctx == "loop":
            buf, new = self.loop_adjoint_buffer(group, nonzero)
            if new:
                for a, mv, off in zip(adj, group.members, group.offsets):
                    slot = self.slot(group, mv, off, buf)
                    if a not in self.in_place or self.destination[a] != slot:  # (two slots may hold one adjoint)
                        out.append(f"{slot} = {a or 0.0}")
            step = f"{buf}[t]"
        elif group.name in self.shared_groups:
            buf = self.loop_buffer[self.shared_groups[group.name]]
            step = buf
        elif group.name in self.partial_groups:
            self.partial_gemms(group, adj)
            return
        else:
            if len(group.members) == 1:
                out.append(f"{buf} = {adj[0]}")
            else:
                parts = ", ".join(a or f"np.zeros_like({self.ref(mv.name, ctx)})" for a, mv in zip(adj, group.members))
                out.append(f"{buf} = np.concatenate([{parts}], axis=-1)")
            step = buf
        # adjoint of the operand: W^T delta
        operand = group.operand
        back = steps_matmul(buf, dim(group.rows), w, dim(g.size(operand)))  # W^T delta, every step
        in_loop = ctx == "loop" and (g.is_leaf(operand) and g.leaf(operand).kind == "prev_state" or self.plan.region_of.get(operand) == "loop")
        if ctx == "loop" and not in_loop:
            self.m.backward_after.append(f"{n('adj_seq', operand)} += {back}  # W^T delta for every step at once")
        elif ctx == "loop":
            name = n("adj_via", operand, group.name)
            out.append(f"{name} = np.dot({step}, {w})")
            self.acc.setdefault(operand, []).append(name)
        else:
            if operand == g.input.name or operand in g.state_names or self.plan.region_of[operand] != self.region_name:
                out.append(f"{n('adj_seq', operand)} += {back}")
            else:
                name = n("adj_via", operand, group.name)
                out.append(f"{name} = {back}")
                self.acc.setdefault(operand, []).append(name)
        # gradient of the weights: one GEMM over every step, after the loop
        rows, cols = dim(group.rows), dim(g.size(operand))
        src = self.ref(operand, "all")
        dW = f"{buf}.reshape(-1, {rows}).T @ {src}.reshape(-1, {cols})"
        lines = self.m.backward_weights
        if group.whole_param:
            lines.append(f"{self.grad(group.whole_param)} += {dW}")
        else:
            lines.append(f"dW_stack = {dW}")
            for mv, off in zip(group.members, group.offsets):
                target = self.member_weight(mv, base=self.grad(mv.param))
                lines.append(f"{target} += dW_stack[{_slice(off, mv.size)}]")

    def partial_gemms(self, group: GemmGroup, adj: list[str | None]) -> None:
        """Input-side GEMMs of a group whose members partly share the loop buffer's slots:
        one product per run of members (shared runs read the loop buffer, no copies)."""
        g = self.g
        runs: list[list] = []  # [source, first offset in source, first row, size]
        for a, mv, off in zip(adj, group.members, group.offsets):
            if mv.name in self.member_source:
                rec, rec_off = self.member_source[mv.name]
                loop_buf = self.loop_buffer[rec.name]
                if len(rec.members) == 1:
                    rec_off = None  # the whole buffer
                if (runs and runs[-1][0] == loop_buf and rec_off is not None and runs[-1][1] is not None
                        and sympy.expand(runs[-1][1] + runs[-1][3] - rec_off) == 0):
                    runs[-1][3] += mv.size
                    continue
                runs.append([loop_buf, rec_off, off, mv.size])
            elif a:
                runs.append([a, None, off, mv.size])
        w, cols = self.weight_code(group), dim(g.size(group.operand))
        for source, src_off, row, size in runs:
            view = source if src_off is None else f"{source}[..., {_slice(src_off, size)}]"
            rows = _slice(row, size)
            self.m.backward_pre.append(f"{self.d_x} += {steps_matmul(view, dim(size), f'{w}[{rows}]', cols)}")
            dW = f"{view}.reshape(-1, {dim(size)}).T @ x.reshape(-1, {cols})"
            if group.whole_param:
                self.m.backward_weights.append(f"{self.grad(group.whole_param)}[{rows}] += {dW}")
                continue
            for mv, off in zip(group.members, group.offsets):  # stacked from several parameters: member by member
                inside = sympy.expand(off - row)
                if inside.is_negative or sympy.expand(row + size - off - mv.size).is_negative:
                    continue
                part = source if src_off is None else f"{source}[..., {_slice(src_off + inside, mv.size)}]"
                dW = f"{part}.reshape(-1, {dim(mv.size)}).T @ x.reshape(-1, {cols})"
                self.m.backward_weights.append(f"{self.member_weight(mv, base=self.grad(mv.param))} += {dW}")

    # -- forward mode (RTRL) ------------------------------------------------------
    def rtrl(self) -> None:
        """The statements of ``_rtrl`` (symrnn.backends.numpy_rtrl)."""
        self.m.rtrl_setup, self.m.rtrl_loop, self.m.rtrl_grads = emit_rtrl(self)

    # -- loss ----------------------------------------------------------------------
    def loss(self) -> None:
        if self.g.loss is not None:
            self.m.loss_value, self.m.loss_grad, self.m.loss_scale = loss_code(self.plan)

