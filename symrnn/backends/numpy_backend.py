"""NumPy backend: a kernel plan -> the statements of a NumPy module.

Python computes every statement here; ``templates/numpy_module.py.j2`` lays
them out.  Naming, from the math: a value at one step is its own name (``f``),
its array over all steps ``f_seq`` (states: ``h_seq`` holds h^{-1} .. h^{T-1},
the initial state first); the adjoint of ``f`` is ``d_f``; the gradient of
parameter ``W`` is ``d_W``; the RTRL tangent of ``f`` is ``J_f``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import sympy

from ..errors import InternalError
from ..ir import MatVecNode, Pointwise
from ..plan import GemmGroup, KernelPlan, Region, Stage
from ..printing import numpy_code

__all__ = ["emit"]


def dim(expr: sympy.Expr) -> str:
    """A size as Python code in n_in, n_hidden, n_out."""
    return numpy_code(sympy.sympify(expr))


def steps_matmul(a: str, a_cols: str, b: str, rows: str) -> str:
    """``a @ b`` for ``a`` of shape (T, B, a_cols): one GEMM over all T * B rows.

    (NumPy runs a 3-D ``a @ b`` as T separate small products, several times slower.)"""
    return f"({a}.reshape(-1, {a_cols}) @ {b}).reshape(T, B, {rows})"


def _slice(start: sympy.Expr, size: sympy.Expr) -> str:
    lo, hi = dim(start), dim(sympy.expand(start + size))
    return f"{'' if lo == '0' else lo}:{hi}"


@dataclass
class NumpyModule:
    """Plain data for the template."""

    setup: list[str] = field(default_factory=list)  # bind parameters and their row blocks
    stacks: list[str] = field(default_factory=list)  # stacked weights (forward computes, cache keeps)
    forward_pre: list[str] = field(default_factory=list)
    forward_alloc: list[str] = field(default_factory=list)
    forward_loop: list[str] = field(default_factory=list)
    forward_post: list[str] = field(default_factory=list)
    cache_names: list[str] = field(default_factory=list)
    outputs: list[tuple[str, str]] = field(default_factory=list)
    backward_seed: list[str] = field(default_factory=list)
    backward_post: list[str] = field(default_factory=list)
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


def emit(plan: KernelPlan) -> NumpyModule:
    """The statements of the generated module for ``plan``."""
    return _Emitter(plan).run()


class _Emitter:
    def __init__(self, plan: KernelPlan):
        self.plan, self.g, self.d = plan, plan.graph, plan.derivation
        self.m = NumpyModule()
        self.weights: dict[str, str] = {}  # group name -> weight code
        self.alias: dict[str, str] = {}  # adjoint name -> the name holding the same value
        self.acc: dict[str, list[str]] = {}  # value -> names of the arrays its adjoint sums
        self.group_buffers: dict[tuple, str] = {}
        self.region_name = ""
        self.temporaries = sympy.numbered_symbols("d_tmp")  # names of shared subexpressions
        self.stage: Stage | None = None
        self.shared_members: dict[str, str] = {}  # input-side product -> recurrent product, same adjoint
        self.shared_groups: dict[str, str] = {}
        self.loop_buffer: dict[str, str] = {}  # loop group name -> its adjoint buffer
        self.slots: dict[str, str] = {}  # loop adjoint name -> the buffer slice that stores it over all steps
        self.deferred_sums: list = []  # (parameter leaf, adjoint name): sums over stored buffers

    # -- names in each context ----------------------------------------------------
    def ref(self, name: str, ctx: str) -> str:
        """Code for value ``name`` in context ``ctx`` ('loop': one step t; 'all': every step)."""
        g = self.g
        if g.is_leaf(name):
            leaf = g.leaf(name)
            if leaf.kind == "input":
                return "x[t]" if ctx == "loop" else "x"
            if leaf.kind == "prev_state":
                return name if ctx == "loop" else f"{leaf.state}_seq[:-1]"
            return name  # parameters (and their row blocks) are bound once
        region = self.plan.region_of[name]
        if name in g.state_names:
            return name if ctx == "loop" else f"{name}_seq[1:]"
        if ctx == "loop" and region == "loop":
            return name
        return f"{name}_seq[t]" if ctx == "loop" else f"{name}_seq"

    def names(self, ctx: str) -> dict[str, str]:
        table = {leaf.name: self.ref(leaf.name, ctx) for leaf in self.g.leaves if leaf.kind != "target"}
        table.update({n.name: self.ref(n.name, ctx) for n in self.g.nodes})
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
        return self.m

    def setup(self) -> None:
        m, g = self.m, self.g
        for p in g.params:
            m.setup.append(f'{p.name} = p["{p.name}"]')
        for leaf in g.leaves:
            if leaf.kind == "param" and leaf.block is not None:
                m.setup.append(f"{leaf.name} = {leaf.param}[{_slice(leaf.block * leaf.size, leaf.size)}]")
        for region in self.plan.regions:
            for stage in region.stages:
                for group in stage.groups:
                    self.weights[group.name] = self.stack(group)

    def member_weight(self, mv: MatVecNode) -> str:
        p = self.g.param(mv.param)
        rows = "" if mv.block is None else _slice(mv.block * mv.size, mv.size)
        full_cols = sympy.simplify(mv.cols[0]) == 0 and sympy.simplify(mv.cols[1] - p.shape[1]) == 0
        cols = "" if full_cols else _slice(mv.cols[0], mv.cols[1] - mv.cols[0])
        if not rows and not cols:
            return mv.param
        return f"{mv.param}[{rows or ':'}{', ' + cols if cols else ''}]"

    def stack(self, group: GemmGroup) -> str:
        if group.whole_param:
            return group.whole_param
        if len(group.members) == 1:
            return self.member_weight(group.members[0])
        name = f"W_stack_{group.operand}"
        parts = ", ".join(self.member_weight(mv) for mv in group.members)
        self.m.stacks.append(f"{name} = np.concatenate([{parts}], axis=0)  # stacked: one GEMM for {len(group.members)} products")
        return name

    # -- forward ------------------------------------------------------------------
    def gemm_forward(self, group: GemmGroup, ctx: str, out: list[str]) -> None:
        operand = self.ref(group.operand, ctx)
        w = self.weights[group.name]
        suffix = "" if ctx == "loop" else "_seq"
        labels = ", ".join(mv.name for mv in group.members)
        if ctx == "loop":
            product = f"{operand} @ {w}.T"
        else:
            product = steps_matmul(operand, dim(self.g.size(group.operand)), f"{w}.T", dim(group.rows))
        if len(group.members) == 1:
            out.append(f"{group.members[0].name}{suffix} = {product}  # {labels}")
        else:
            out.append(f"{group.name}{suffix} = {product}  # {labels}")
            for mv, off in zip(group.members, group.offsets):
                out.append(f"{mv.name}{suffix} = {group.name}{suffix}[..., {_slice(off, mv.size)}]")
        if ctx == "loop":
            out.extend(f"{mv.name}_seq[t] = {mv.name}" for mv in group.members if mv.name in self.plan.stored)

    def forward(self) -> None:
        m, g, plan = self.m, self.g, self.plan
        # values that do not change over time (computed from parameters only, e.g.
        # sigmoid(b)): broadcast to (T, B, size) like every other value of a region
        constant = {leaf.name for leaf in g.leaves if leaf.kind == "param"}
        for n in g.nodes:
            if isinstance(n, Pointwise) and all(d in constant for d in n.deps):
                constant.add(n.name)
        for ctx, region, out in (("all", plan.pre, m.forward_pre), ("loop", plan.loop, m.forward_loop), ("all", plan.post, m.forward_post)):
            for stage in region.stages:
                for group in stage.groups:
                    self.gemm_forward(group, ctx, out)
                for node in stage.pointwise:
                    rhs = self.code(node.expr, ctx)
                    if ctx == "all" and node.name in constant:
                        out.append(f"{node.name}_seq = np.broadcast_to({rhs}, (T, B, {dim(node.size)}))  # {self.label(node)}")
                    elif ctx == "all":
                        out.append(f"{node.name}_seq = {rhs}  # {self.label(node)}")
                    else:
                        out.append(f"{node.name} = {rhs}  # {self.label(node)}")
                        if node.name in g.state_names:
                            out.append(f"{node.name}_seq[t + 1] = {node.name}")
                        elif node.name in plan.stored:
                            out.append(f"{node.name}_seq[t] = {node.name}")
        for s in g.states:
            m.forward_alloc.append(f"{s.name}_seq = np.empty((T + 1, B, {dim(s.size)}), dtype)")
            m.forward_alloc.append(f'{s.name}_seq[0] = state0["{s.name}"]')
        for name in plan.stored:
            m.forward_alloc.append(f"{name}_seq = np.empty((T, B, {dim(g.node(name).size)}), dtype)")
        if plan.loop.stages:
            m.forward_loop[:0] = [f"{s.prev} = {s.name}_seq[t]" for s in g.states]
        m.outputs = [(s.name, f"{s.name}_seq[1:]") for s in g.states] + [(r, f"{r}_seq") for r in g.readouts]
        # what backward reads
        keep = {s.name + "_seq" for s in g.states} | {n + "_seq" for n in plan.stored}
        for name in self.d.stored_values:
            if not g.is_leaf(name) and plan.region_of[name] != "loop":
                keep.add(name + "_seq")
        keep |= {w for w in self.weights.values() if w.startswith("W_stack_")}
        m.cache_names = sorted(keep)

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
        m, g, plan = self.m, self.g, self.plan
        self.shared_groups = self.shared_adjoints()
        for s in g.states:
            m.backward_seed.append(f'd_{s.name}_seq = _seed(grad_outputs, "{s.name}", (T, B, {dim(s.size)}), dtype)')
        for r in g.readouts:
            m.backward_seed.append(f'd_{r}_seq = _seed(grad_outputs, "{r}", (T, B, {dim(g.node(r).size)}), dtype)')
            self.acc[r] = [f"d_{r}_seq"]
        # adjoint buffers for values that receive contributions from a later region
        order = {"pre": 0, "loop": 1, "post": 2}
        for n in g.nodes:
            if n.name in g.state_names or n.name in g.readouts:
                continue
            mine = order[plan.region_of[n.name]]
            later = any(order[plan.region_of[c.name]] > mine for c in g.consumers(n.name))
            if later and n.name not in self.shared_members:
                m.backward_seed.append(f"d_{n.name}_seq = np.zeros((T, B, {dim(n.size)}), dtype)")
        m.backward_seed.append("d_x_seq = np.zeros_like(x)")
        for p in g.params:
            m.backward_seed.append(f"d_{p.name} = np.zeros_like({p.name})")

        self.region_backward(plan.post, "all", m.backward_post)
        for s in g.states:
            self.acc.setdefault(s.name, []).extend([f"d_{s.name}_seq[t]", f"d_{s.name}_next"])
        for name in plan.loop.nodes:
            if name not in g.state_names and any(plan.region_of[c.name] == "post" for c in g.consumers(name)):
                self.acc.setdefault(name, []).append(f"d_{name}_seq[t]")
        self.region_backward(plan.loop, "loop", m.backward_loop)
        self.parameter_sums()
        for name in plan.pre.nodes:
            if name in self.shared_members:
                self.acc[name] = [f"d_{self.shared_members[name]}"]  # never printed: see gemm_backward
            elif any(plan.region_of[c.name] != "pre" for c in g.consumers(name)):
                self.acc.setdefault(name, []).append(f"d_{name}_seq")
        self.region_backward(plan.pre, "all", m.backward_pre)
        # initial states and the input
        m.grads = [(p.name, f"d_{p.name}") for p in g.params] + [("x", "d_x_seq")]
        m.grads += [(f"{s.name}0", f"d_{s.name}_next") for s in g.states]

    def parameter_sums(self) -> None:
        """Gradients of elementwise parameters whose adjoint a buffer stores: one sum each."""
        for leaf, name in self.deferred_sums:
            name = self.alias.get(name, name)
            p = self.g.param(leaf.param)
            rows = "" if leaf.block is None else f"[{_slice(leaf.block * leaf.size, leaf.size)}]"
            axes = "" if p.kind == "scalar" else ", axis=(0, 1)"
            if name in self.slots:
                self.m.backward_after.append(f"d_{p.name}{rows} += np.sum({self.slots[name]}{axes})")
            else:
                raise InternalError(f"adjoint '{name}' of cell '{self.g.cell}' is not stored over the steps")

    def region_backward(self, region: Region, ctx: str, out: list[str]) -> None:
        g = self.g
        self.region_name = region.name
        for k in reversed(range(len(region.stages))):
            self.stage_backward(region, region.stages[k], k, ctx, out)
        if ctx == "loop":
            bind = [f"{name} = {self.bind_code(name)}" for name in self.loop_bindings(out)]
            prev = []
            for s in g.states:
                terms = self.acc.get(s.prev, [])
                prev.append(f"d_{s.name}_next = {' + '.join(terms) if terms else 'np.zeros_like(d_' + s.name + '_next)'}")
            out[:] = bind + out + prev

    def loop_bindings(self, lines: list[str]) -> list[str]:
        """Forward values the loop body reads, in graph order."""
        code = "\n".join(line.split("#")[0] for line in lines)  # comments cite labels, not values
        used = set(re.findall(r"\b[A-Za-z_][A-Za-z0-9_]*\b", code))
        names = []
        for s in self.g.states:
            if s.prev in used:
                names.append(s.prev)
        for n in self.g.nodes:
            if n.name in used and self.plan.region_of[n.name] == "loop":
                names.append(n.name)
        return names

    def bind_code(self, name: str) -> str:
        g = self.g
        if g.is_leaf(name):
            return f"{g.leaf(name).state}_seq[t]"
        if name in g.state_names:
            return f"{name}_seq[t + 1]"
        if name in self.plan.stored:
            return f"{name}_seq[t]"
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
                    terms.append(coeff * sympy.Symbol(f"d_{c}"))
            expr = sympy.Add(*terms)
            if expr == 0:
                continue
            nonzero.add(node.name)
            stmts.append(self.assign(f"d_{node.name}", expr, ctx, seen, label=f"eq:{g.cell}:adj:{node.name}"))
        # contributions to values outside this stage
        targets = sorted({dep for n in stage.pointwise for dep in n.deps} - {n.name for n in final}, key=self.order)
        for dep in targets:
            expr = sympy.Add(*[d.partial(c.name, dep) * sympy.Symbol(f"d_{c.name}") for c in stage.pointwise if c.name in nonzero])
            if expr != 0:
                self.route(dep, expr, k, ctx, stmts, seen)
        self.print_with_cse(stmts, ctx, out)
        for group in stage.groups:
            self.gemm_backward(region, group, ctx, out, nonzero)

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
        stored = {f"d_{mv.name}" for mv in self.stage.matvecs}  # written to a buffer over all steps
        if leaf is not None and leaf.kind == "param" and ctx == "loop" and expr.is_Symbol and self.alias.get(expr.name, expr.name) in stored:
            self.deferred_sums.append((leaf, expr.name))  # summed over every step after the loop
            return
        if leaf is not None and leaf.kind == "param":
            p = g.param(leaf.param)
            rows = "" if leaf.block is None else f"[{_slice(leaf.block * leaf.size, leaf.size)}]"
            axes = "" if p.kind == "scalar" else (", axis=0" if ctx == "loop" else ", axis=(0, 1)")
            out.append((f"d_{p.name}{rows} += np.sum({{}}{axes})", expr))
        elif leaf is not None and leaf.kind == "input":
            out.append((f"d_x_seq{'[t]' if ctx == 'loop' else ''} += {{}}", expr))
        elif leaf is not None and leaf.kind == "prev_state":
            name = f"d_{dep}_{k}"
            out.append(self.assign(name, expr, ctx, seen))
            self.acc.setdefault(dep, []).append(name)
        else:
            if self.plan.region_of[dep] == self.region_name:
                name = f"d_{dep}_from{k}"
                out.append(self.assign(name, expr, ctx, seen))
                self.acc.setdefault(dep, []).append(name)
            else:
                out.append((f"d_{dep}_seq{'[t]' if ctx == 'loop' else ''} += {{}}", expr))

    def gemm_backward(self, region: Region, group: GemmGroup, ctx: str, out: list[str], nonzero: set[str]) -> None:
        g = self.g
        w = self.weights[group.name]
        adj = [f"d_{mv.name}" if mv.name in nonzero else None for mv in group.members]
        adj = [self.alias.get(a, a) if a else None for a in adj]
        if all(a is None for a in adj):
            return
        signature = (ctx, tuple(adj))
        buf = f"d_{group.name}_seq"
        if ctx == "loop":
            if signature in self.group_buffers:
                buf = self.group_buffers[signature]
                self.loop_buffer[group.name] = buf
            else:
                self.loop_buffer[group.name] = buf
                self.group_buffers[signature] = buf
                self.m.backward_seed.append(f"{buf} = np.empty((T, B, {dim(group.rows)}), dtype)")
                for a, mv, off in zip(adj, group.members, group.offsets):
                    if len(group.members) == 1:
                        out.append(f"{buf}[t] = {a or 0.0}")
                    else:
                        out.append(f"{buf}[t, :, {_slice(off, mv.size)}] = {a or 0.0}")
            for a, mv, off in zip(adj, group.members, group.offsets):
                if a:
                    self.slots.setdefault(a, f"{buf}[..., {_slice(off, mv.size)}]" if len(group.members) > 1 else buf)
            step = f"{buf}[t]"
        elif group.name in self.shared_groups:
            buf = self.loop_buffer[self.shared_groups[group.name]]
            step = buf
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
            target = "d_x_seq" if operand == g.input.name else f"d_{operand}_seq"
            self.m.backward_after.append(f"{target} += {back}  # W^T delta for every step at once")
        elif ctx == "loop":
            name = f"d_{operand}_from_{group.name}"
            out.append(f"{name} = {step} @ {w}")
            self.acc.setdefault(operand, []).append(name)
        else:
            if operand == g.input.name:
                out.append(f"d_x_seq += {back}")
            elif operand in g.state_names or self.plan.region_of[operand] != self.region_name:
                out.append(f"d_{operand}_seq += {back}")
            else:
                name = f"d_{operand}_from_{group.name}"
                out.append(f"{name} = {back}")
                self.acc.setdefault(operand, []).append(name)
        # gradient of the weights: one GEMM over every step, after the loop
        rows, cols = dim(group.rows), dim(g.size(operand))
        src = self.ref(operand, "all")
        dW = f"{buf}.reshape(-1, {rows}).T @ {src}.reshape(-1, {cols})"
        lines = self.m.backward_weights
        if group.whole_param:
            lines.append(f"d_{group.whole_param} += {dW}")
        else:
            lines.append(f"dW_stack = {dW}")
            for mv, off in zip(group.members, group.offsets):
                target = self.member_weight(mv).replace(mv.param, f"d_{mv.param}", 1)
                lines.append(f"{target} += dW_stack[{_slice(off, mv.size)}]")

    # -- forward mode (RTRL) ------------------------------------------------------
    def rtrl(self) -> None:
        """Tangents of every value w.r.t. every parameter, initial state and input entry.

        Directions are stacked on a leading axis of length K: the parameters in
        declaration order, then each initial state, then x (T * n_in entries).
        ``J_q`` has shape (K, B, size of q)."""
        m, g, d = self.m, self.g, self.d
        prev = "0"
        for p in g.params:
            m.rtrl_setup.append(f"o_{p.name} = {prev}")
            prev = f"o_{p.name} + {p.name}.size"
        for s in g.states:
            m.rtrl_setup.append(f"o_{s.name}0 = {prev}")
            prev = f"o_{s.name}0 + {dim(s.size)}"
        m.rtrl_setup.append(f"o_x = {prev}")
        m.rtrl_setup.append("K = o_x + T * n_in")
        for s in g.states:
            m.rtrl_setup.append(f'{s.name} = state0["{s.name}"]')
            m.rtrl_setup.append(f"J_{s.name} = np.zeros((K, B, {dim(s.size)}), dtype)")
            m.rtrl_setup.append(f"_add_diagonal(J_{s.name}, o_{s.name}0, 1.0)  # d{s.name}^(-1)/d{s.name}0 = I")
        loop = m.rtrl_loop
        for s in g.states:
            loop.append(f"{s.prev}, J_{s.prev} = {s.name}, J_{s.name}")
        names = {n.name: n.name for n in g.nodes}
        names[g.input.name] = "x[t]"
        x_slab = "o_x + t * n_in"
        for node in g.nodes:
            loop.append(f"# {node.name}  {self.label(node)}")
            if isinstance(node, Pointwise):
                loop.append(f"{node.name} = {self.code(node.expr, 'loop', names)}")
                tangent, direct = [], []
                for dep, coeff in d.tangent_terms(node.name):
                    leaf = g.leaf(dep) if g.is_leaf(dep) else None
                    c = self.code(coeff, "loop", names)
                    if leaf is None or leaf.kind == "prev_state":
                        tangent.append(f"J_{dep}" if coeff == 1 else f"({c}) * J_{dep}")
                    elif leaf.kind == "input":
                        direct.append(f"_add_diagonal(J_{node.name}, {x_slab}, {c})")
                    elif g.param(leaf.param).kind == "scalar":
                        direct.append(f"J_{node.name}[o_{leaf.param}] += {c}")
                    else:
                        row0 = dim(leaf.block * leaf.size) if leaf.block else "0"
                        off = f"o_{leaf.param}" + ("" if row0 == "0" else f" + {row0}")
                        direct.append(f"_add_diagonal(J_{node.name}, {off}, {c})")
                if not tangent:
                    rhs = f"np.zeros((K, B, {dim(node.size)}), dtype)"
                elif len(tangent) == 1 and tangent[0].startswith("J_") and direct:
                    rhs = f"{tangent[0]}.copy()"
                else:
                    rhs = " + ".join(tangent)
                loop.append(f"J_{node.name} = {rhs}")
                loop.extend(direct)
            else:
                w = self.member_weight(node)
                operand = names.get(node.operand, node.operand)
                loop.append(f"{node.name} = {operand} @ {w}.T")
                if node.operand == g.input.name:
                    loop.append(f"J_{node.name} = np.zeros((K, B, {dim(node.size)}), dtype)")
                    loop.append(f"J_{node.name}[{x_slab}:{x_slab} + n_in] += {w}.T[:, None, :]")
                else:
                    loop.append(f"J_{node.name} = J_{node.operand} @ {w}.T")
                row0 = dim(node.block * node.size) if node.block else "0"
                loop.append(f"_add_matrix(J_{node.name}, o_{node.param}, {node.param}.shape, {row0}, {dim(node.cols[0])}, {operand})")
        loop.append("cot = cotangent(t, {" + ", ".join(f'"{o}": {o}' for o in g.outputs) + "})")
        for o in g.outputs:
            loop.append(f'if "{o}" in cot:')
            loop.append(f'    G += np.einsum("kbn,bn->kb", J_{o}, cot["{o}"])')
        m.rtrl_grads = [(p.name, f"G[o_{p.name}:o_{p.name} + {p.name}.size].sum(axis=1).reshape({p.name}.shape)") for p in g.params]
        m.rtrl_grads.append(("x", "G[o_x:].reshape(T, n_in, B).transpose(0, 2, 1)"))
        m.rtrl_grads += [(f"{s.name}0", f"G[o_{s.name}0:o_{s.name}0 + {dim(s.size)}].T") for s in g.states]

    # -- loss ----------------------------------------------------------------------
    def loss(self) -> None:
        loss = self.g.loss
        if loss is None:
            return
        extra = sorted({s.name for s in loss.expr.free_symbols} - {loss.target, loss.target_of})
        if extra:
            raise InternalError(f"the loss of cell '{self.g.cell}' reads {extra}; only '{loss.target_of}' and the target are supported")
        table = {loss.target_of: "y", loss.target: "target"}
        self.m.loss_value = numpy_code(loss.expr, table)
        grad = dict(self.d.loss_partials)[loss.target_of]
        self.m.loss_grad = numpy_code(grad, table)
        self.m.loss_scale = "1.0 / T" if loss.reduction == "mean" else "1.0"
