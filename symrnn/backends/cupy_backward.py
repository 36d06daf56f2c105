"""The backward pass of the CuPy module: adjoint kernels, GEMMs and reductions.

Regions in reverse: the readout over every step at once; the loop from step T - 1
down to 0, per stage one fused kernel for every adjoint of the stage (or one kernel
that loops over time when the recurrence has no GEMM), then the GEMM W^T delta; the
input side over every step at once.  Weight gradients are one GEMM per stacked
product after the loop; elementwise parameters' gradients one ``cupy.sum`` per
stored adjoint buffer (deterministic: no atomics).  Which input-side adjoints the
loop's buffers hold is the schedule's decision (symrnn.schedule), as for NumPy.
"""

from __future__ import annotations

import sympy

from ..cuda_printing import dim_code
from ..errors import InternalError
from ..ir import MatVecNode, Reduction
from ..plan import GemmGroup, Stage
from ..schedule import shared_subexpressions
from ..stmt import ALL, ETC, Assign, Call, Comment, Elementwise, Helper, Infix, Key, Loop, Ref, Reshape, Size, Text, Update, empty, span, t_SYM
from .array_module import parameter_sums, weight_gradient
from .cuda_kernels import Kernel, KernelBuilder, Loc

__all__ = ["BackwardEmitter"]


class BackwardEmitter:
    """Adjoint kernels, GEMMs and reductions of ``backward``."""

    def __init__(self, e):
        self.e, self.g, self.d, self.plan = e, e.g, e.d, e.plan
        self.py, self.c = e.py, e.c
        self.lines = e.m.backward
        self.acc: dict[str, list[tuple[str, Loc]]] = {}  # value -> (C local, location) of contributions to its adjoint
        #: (gradient, stored adjoint, its width, columns, scalar?): reduced after the loop; width None:
        #: an accumulator the kernels have summed over the rows and steps already (Dialect.accumulates)
        self.sums: list[tuple] = []
        self.dx_terms: list = []
        self.weight_lines: list = []
        self.next_sources: dict[str, list[str]] = {}  # state -> arrays carried to the step before
        self.direct_sources: list[tuple[str, sympy.Expr]] = []  # (array, its size) written per step, carried
        self.step_fresh: list = []
        # input-side group -> the loop adjoint buffer holding the same values (symrnn.schedule)
        self.pre_alias = {pre: self.py("gadj_seq", rec) for pre, rec in e.schedule.shared_groups.items()}
        self.member_exprs: dict[str, sympy.Expr] = {}
        self.loop_lines: list = []
        self.gemm_sources: list[tuple[str, sympy.Expr]] = []  # (array, its size): W^T delta, carried
        self.time_carry: set[str] = set()  # states whose adjoint a time-loop kernel carries in a register
        self.weight: dict[str, sympy.Expr] = {}  # acc local -> the factor it enters its adjoint with (a reduction's)
        self.after: list = []  # statements after the stage kernel just built: its reductions' sums over units
        self.into_pre: dict[str, list[str]] = {}  # input-side product -> the readout's arrays of its adjoint

    def run(self) -> None:
        g, e, py, c = self.g, self.e, self.py, self.c
        L = self.lines
        for s in g.states:
            L.append(self.seed(s.name, s.size))
            self.acc.setdefault(s.name, []).append((c("adj_out", s.name), Loc(Ref(py("adj_seq", s.name)), ld=s.size, seq=True)))
        for r in g.readouts:
            size = g.node(r).size
            L.append(self.seed(r, size))
            self.acc.setdefault(r, []).append((c("adj_out", r), Loc(Ref(py("adj_seq", r)), ld=size, seq=True)))
        for p in g.params:
            L.append(Assign(Ref(py("adj", p.name)), Call("zeros_like", (Ref(py.value(p.name)),))))
        for stage in self.plan.pre.stages:  # before the readout: it may write a product of the input alone (D x)
            for group in stage.groups:
                if group.name not in self.pre_alias:
                    L.append(Assign(Ref(py("gadj_seq", group.name)), empty(Text("T"), Text("B"), Size(group.rows))))
        self.post()
        self.member_adjoints()
        self.loop()
        self.pre()
        if self.sums:
            summed = any(width is None for _, _, width, _, _ in self.sums)
            L.append(Comment("gradients of elementwise parameters: deterministic sums over the stored adjoints"
                             + (" (the _acc arrays: summed by the kernels as they ran)" if summed else "")))
            L.extend(self.sum_lines())
        if self.weight_lines:
            L.append(Comment("weight gradients: one GEMM over every step per stacked product"))
            L.extend(self.weight_lines)
        d_x = Ref(py("adj", g.input.name))
        L.append(Assign(d_x, self.total(self.dx_terms, Call("zeros_like", (Ref("x"),)))))
        e.m.grads = [(p.name, Ref(py("adj", p.name))) for p in g.params] + [("x", d_x)]
        e.m.grads += [(f"{s.name}0", Ref(py("grad0", s.name))) for s in g.states]

    def seed(self, output: str, size: sympy.Expr) -> Assign:
        shape = (Text("T"), Text("B"), Size(size))
        return Assign(Ref(self.py("adj_seq", output)), Helper("_seed", (Text("grad_outputs"), Key(output), shape, Text("dtype"))))

    @staticmethod
    def total(terms: list, zero):
        """``a + b + ...`` in this order, ``zero`` when there is none."""
        return zero if not terms else terms[0] if len(terms) == 1 else Infix("+", tuple(terms))

    def sum_lines(self) -> list:
        """One reduction over the batch and the steps per stored adjoint buffer (cupy.sum:
        no atomics), then each parameter's gradient from its columns (array_module.parameter_sums);
        an accumulator is its sum already."""
        sums = [(target, src, part, scalar) for target, src, _, part, scalar in self.sums]
        widths = {src: width for _, src, width, _, _ in self.sums}
        return parameter_sums(sums, self.py, lambda v: Call("sum", (v,)),
                              lambda v: Call("sum", (Reshape(v, widths[v.name]),), (("axis", Text("0")),)),
                              summed=frozenset(src for src, width in widths.items() if width is None))

    # -- symbolic adjoints of one stage ----------------------------------------------
    def stage_adjoints(self, stage: Stage) -> tuple[list[tuple[str, sympy.Expr]], dict[str, sympy.Expr]]:
        """In-stage adjoints (reverse order, in acc locals and d_ symbols) and
        contributions to values outside the stage."""
        g, d = self.g, self.d
        pw = {n.name for n in stage.pointwise}
        own = {mv.name for mv in stage.matvecs} | {r.name for r in stage.reductions}
        nodes = [n for n in g.nodes if n.name in pw or n.name in own]
        adj = []
        for node in reversed(nodes):
            terms = [self.weight.get(local, 1) * sympy.Symbol(local) for local, _ in self.acc.get(node.name, [])]
            for c in stage.pointwise:
                p = d.partial(c.name, node.name)
                if p != 0:
                    terms.append(p * self.adjoint(c.name))
            adj.append((node.name, sympy.factor_terms(sympy.Add(*terms))))
        inside = pw | own
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
        inside = {n.name for n in stage.pointwise}  # a product another stage also reads has more in its buffer
        for mv in stage.matvecs:
            if self.member_exprs.get(mv.name) == expr and all(c.name in inside for c in self.g.consumers(mv.name)):
                return mv.name
        for pre in self.plan.pre.stages:
            for group in pre.groups:
                if group.name in self.pre_alias:
                    continue
                for mv in group.members:
                    if self.pre_expr(mv, stage) == expr:
                        return mv.name
        return None

    def pre_expr(self, mv: MatVecNode, stage: Stage) -> sympy.Expr | None:
        cons = {c.name for c in self.g.consumers(mv.name)}
        if not cons <= {n.name for n in stage.pointwise}:
            return None
        return sympy.factor_terms(sympy.Add(*[self.d.partial(c.name, mv.name) * self.adjoint(c.name) for c in stage.pointwise]))

    # -- one stage kernel ------------------------------------------------------------
    def stage_kernel(self, stage: Stage, k: int, mode: str, region: str = "loop") -> Kernel:
        c = self.c
        size = (stage.pointwise or stage.reductions or stage.matvecs)[0].size  # its products' width may differ (wider_member)
        named = stage.pointwise or (*stage.reductions, *stage.matvecs)
        doc = f"backward, {region} stage {k}: adjoints of " + ", ".join(n.name for n in reversed(named))
        kernel = Kernel(f"{self.g.cell}_backward_{region}{k}", doc, dim_code(size), size, mode, reverse=True)
        b = KernelBuilder(kernel, c, self.e.dialect)
        dl = self.e.dialect
        adj, outside = self.stage_adjoints(stage)
        stmts: list[tuple[str, sympy.Expr | None]] = []  # (C line with {} for the expression, expression)
        carry_lines: list = []
        members = {mv.name for mv in stage.matvecs}
        width = self.e.fixed(size)
        for name, expr in adj:
            if expr == 0:
                continue
            if name in members and self.e.fixed(self.g.node(name).size) != width:
                line = self.wider_member(name, expr, mode)  # before the kernel's launch (in the loop: this step's)
                (self.step_fresh if mode == "step" else self.lines).extend([line] if line else [])
                continue
            for local, loc in self.acc.get(name, []):
                if c.kind(local) == "adj_next" and mode == "time":
                    continue  # carried in a register
                b.load(local, loc)
            if name in {r.name for r in stage.reductions}:
                stmts.append((dl.decl(c('adj', name), "{}"), expr))
                stmts.append((b.store_line(self.reduction_adjoint(self.g.node(name), mode), c("adj", name)), None))
            elif name in members:
                group, off = self.plan.group_of(name)
                buf = Loc(Ref(self.py("gadj_seq", group.name)), ld=group.rows, off=off, seq=True)
                stmts.append((dl.decl(c('adj', name), "{}"), expr))
                stmts.append((b.store_line(buf, c("adj", name)), None))
            else:
                label = f"eq:{self.g.cell}:adj:{name}"
                stmts.append((dl.decl(c('adj', name), "{}", label), expr))
        for dep, expr in outside.items():
            self.route(dep, expr, adj, stage, k, mode, region, b, stmts, carry_lines)
        kernel.body = self.print_with_cse(stmts + carry_lines, b, "step" if mode == "step" else mode)
        self.e.m.kernels.append(b.finish())
        return kernel

    def wider_member(self, name: str, expr: sympy.Expr, mode: str):
        """The adjoint of a product of another width than its stage kernel's units (a readout
        that is a bare product, ``V @ h``, beside a readout of the hidden width; an input-side
        product beside a value of the input's width; ``U @ h_prev`` in the loop stage of
        ``a = tanh(V @ h_prev)``): no value of the stage reads it (one that did would have its
        width), so its adjoint is its sources' (a reduction's partial included), summed into its
        slot of the group's adjoint buffer on the host, in the loop this step's; None where what
        the loop's kernels wrote in the slot is all of it.  Inside the kernel, whose threads are
        the stage's units, it was indexed out of its bounds."""
        size = self.g.node(name).size
        group, off = self.plan.group_of(name)
        slot_name = self.py("gadj_seq", group.name)
        terms = self.acc.get(name, [])
        in_slot = [(local, loc) for local, loc in terms if loc.py.name == slot_name]  # the loop's part, there already
        others = [(local, loc) for local, loc in terms if loc.py.name != slot_name]
        here = sympy.Add(*[sympy.Symbol(local) for local, _ in in_slot])
        rest = expr.subs({sympy.Symbol(local): 0 for local, _ in in_slot})
        values = sorted(s.name for s in expr.free_symbols if s.name in self.e.c_names)  # read by a reduction's partial

        def on_host(loc: Loc) -> bool:  # (T, B, size) or this step's (B, size); (..., 1): a reduction's adjoint summed
            return (loc.off == 0 and loc.shift == 0 and not (loc.seq and loc.py.index)
                    and (loc.kind == "rowval" or loc.kind == "row" and loc.ld == size))

        known = {sympy.Symbol(local) for local, _ in terms} | {sympy.Symbol(v) for v in values}
        if not (mode in ("all", "step") and len(in_slot) <= 1 and all(loc.off == off and loc.ld == group.rows for _, loc in in_slot)
                and all(on_host(loc) for _, loc in others) and expr.free_symbols <= known and sympy.expand(expr - rest - here) == 0):
            raise self.e.unsupported(f"the adjoint of '{name}', a product of another width than its stage's values, is not supported yet")
        if rest == 0:
            return None
        step = (t_SYM,) if mode == "step" else ()  # in the loop: this step's part of every array over the steps
        columns = (ALL if step else ETC, span(off, size)) if len(group.members) > 1 else ()  # its part of a stacked buffer
        slot = Ref(slot_name, step + columns)
        sources = tuple((local, Ref(loc.py.name, step) if loc.seq else loc.py) for local, loc in others)
        value = Elementwise(rest, sources + tuple((v, self.e.array(v, mode)) for v in values))
        if in_slot:
            return Update(slot, "+", value, f"d_{name}: its sources besides the loop's")
        return Assign(slot, value, f"d_{name}: its sources")

    def route(self, dep: str, expr: sympy.Expr, adj: list, stage: Stage, k: int, mode: str, region: str,
              b: KernelBuilder, stmts: list, carry_lines: list) -> None:
        """Where a stage kernel sends its contribution ``expr`` to the adjoint of ``dep``."""
        g, py, c = self.g, self.py, self.c
        size = stage.pointwise[0].size
        leaf = g.leaf(dep) if g.is_leaf(dep) else None
        members = {mv.name for mv in stage.matvecs}

        def fresh_seq(name: str, width) -> Loc:
            self.lines.append(Assign(Ref(name), empty(Text("T"), Text("B"), Size(width))))
            return Loc(Ref(name), ld=width, seq=True)

        if leaf is not None and leaf.kind == "param":
            inside = {n.name for n in stage.pointwise}  # a product another stage also reads has more in its buffer
            slot = next((n for n, ex in adj if n in members and ex == expr
                         and all(c.name in inside for c in g.consumers(n))), None)
            if slot is None and region == "loop":
                slot = self.loop_slot(expr, stage)
            p = g.param(leaf.param)
            target = Ref(py("adj", p.name)) if leaf.block is None else Ref(py("adj", p.name), (span(leaf.block * leaf.size, leaf.size),))
            if slot is not None:
                group, off = self.plan.group_of(slot)
                src, width = self.pre_alias.get(group.name, py("gadj_seq", group.name)), group.rows
                part = None if len(group.members) == 1 else span(off, g.node(slot).size)
            elif self.e.dialect.accumulates:  # summed over the rows and steps as the kernel runs
                src, width, part = py("adj_stage_acc", dep, f"{region}{k}"), None, None
                self.lines.append(Assign(Ref(src), empty(Size(size), fill="zeros")))
                stmts.append((b.store_line(Loc(Ref(src), kind="acc"), "{}"), expr))
            else:
                src, width, part = py("adj_stage_seq", dep, f"{region}{k}"), size, None
                stmts.append((b.store_line(fresh_seq(src, size), "{}"), expr))
            self.sums.append((target, src, width, part, p.kind == "scalar"))
        elif leaf is not None and leaf.kind == "input":
            src = py("adj_stage_seq", dep, f"{region}{k}")
            self.lines.append(Assign(Ref(src), Call("empty_like", (Ref("x"),))))
            stmts.append((b.store_line(Loc(Ref(src), ld=leaf.size, seq=True), "{}"), expr))
            self.dx_terms.append(Ref(src))
        elif leaf is not None and leaf.kind == "prev_state":
            name = py("adj_part", dep, k)
            if mode == "time":
                carry_lines.append((self.e.dialect.assign(c('adj_next', leaf.state), "{}"), expr))
                self.time_carry.add(leaf.state)
            else:
                stmts.append((b.store_line(Loc(Ref(name), ld=leaf.size), "{}"), expr))
                self.direct_sources.append((name, leaf.size))
                self.next_sources.setdefault(leaf.state, []).append(name)
        elif self.plan.region_of[dep] == "pre" and (region == "pre" or not isinstance(g.node(dep), MatVecNode)):
            loc = fresh_seq(py("adj_stage_seq", dep, f"{region}{k}"), g.size(dep))
            stmts.append((b.store_line(loc, "{}"), expr))
            self.acc.setdefault(dep, []).append((c("adj_stage", dep, f"{region}{k}"), loc))
        elif self.plan.region_of[dep] == "pre" and region == "post" and not self.only_here(dep, stage):
            # a product of the input alone that the readout reads (D x) and something else too:
            # the readout's part in an array of its own, added to the product's adjoint (pre)
            name = py("adj_post_seq", dep, f"post{k}")
            stmts.append((b.store_line(fresh_seq(name, g.size(dep)), "{}"), expr))
            self.into_pre.setdefault(dep, []).append(name)
        elif self.plan.region_of[dep] == "pre":  # a product of the input alone: its slot of the group's adjoint
            group, off = self.plan.group_of(dep)
            if group.name not in self.pre_alias:
                loc = Loc(Ref(py("gadj_seq", group.name)), ld=group.rows, off=off, seq=True)
                stmts.append((b.store_line(loc, "{}"), expr))
        elif self.plan.region_of[dep] == "loop" and region == "loop":
            name, local = py("adj_from", dep, k), c("adj_from", dep, k)  # the local first: its pointer yields
            self.step_fresh.append(Assign(Ref(name), empty(Text("B"), Size(g.size(dep)))))
            stmts.append((b.store_line(Loc(Ref(name), ld=g.size(dep)), "{}"), expr))
            self.acc.setdefault(dep, []).append((local, Loc(Ref(name), ld=g.size(dep))))
        elif region == "post":
            name = py("adj_post_seq", dep, f"post{k}")
            fresh_seq(name, g.size(dep))
            stmts.append((b.store_line(Loc(Ref(name), ld=g.size(dep)), "{}"), expr))
            self.acc.setdefault(dep, []).append((c("adj_post", dep, f"post{k}"), Loc(Ref(name), ld=g.size(dep), seq=True)))
        else:
            raise InternalError(f"backward of cell '{g.cell}': no route for the adjoint of '{dep}'")

    def only_here(self, name: str, stage: Stage) -> bool:
        """Whether ``stage``'s pointwise nodes are all that read ``name`` (its adjoint is theirs alone)."""
        return {c.name for c in self.g.consumers(name)} <= {n.name for n in stage.pointwise}

    def readout_parts(self, stage: Stage) -> list:
        """The readout's parts of the adjoints of ``stage``'s products (D x read by the readout
        and by another node): added to what the loop or the input side wrote in their slots,
        or their slots' only values."""
        out = []
        for group in stage.groups:
            for mv, off in zip(group.members, group.offsets):
                parts = [Ref(name) for name in self.into_pre.get(mv.name, [])]
                if not parts:
                    continue
                slot = Ref(self.py("gadj_seq", group.name), (ETC, span(off, mv.size)) if len(group.members) > 1 else ())
                total = self.total(parts, None)
                if all(self.plan.region_of[c.name] == "post" for c in self.g.consumers(mv.name)):
                    out.append(Assign(slot, total, f"d_{mv.name}: the readout's parts"))
                else:
                    out.append(Update(slot, "+", total, f"d_{mv.name}: the readout's parts"))
        return out

    def reduction_adjoint(self, node: Reduction, mode: str) -> Loc:
        """Where a stage kernel stores a reduction's adjoint; its sum over units (times the
        reduction's weight, symrnn.reductions) becomes a source of the operand's adjoint, one
        value per row (``self.after``: run after the kernel)."""
        py, c = self.py, self.c
        axis = (("axis", Text("-1")), ("keepdims", Text("True")))
        if mode == "step":
            array = py("adj", node.name)
            self.step_fresh.append(Assign(Ref(array), empty(Text("B"), Size(node.size))))
            loc = Loc(Ref(array), ld=node.size)
        else:
            array = py("adj_seq", node.name)
            self.lines.append(Assign(Ref(array), empty(Text("T"), Text("B"), Size(node.size))))
            loc = Loc(Ref(array), ld=node.size, seq=True)
        total = py("adj_sum", node.name)
        self.after.append(Assign(Ref(total), Call("sum", (Ref(array),), axis), f"sum over the units of d_{node.name}"))
        w = node.weight()
        inside = w.free_symbols & {sympy.Symbol(node.operand), sympy.Symbol(node.name)}
        if not inside and w != 1:  # a constant weight (the mean's 1/n): once per row, here
            self.after.append(Assign(Ref(total), Elementwise(w * sympy.Symbol(total), ((total, Ref(total)),))))
        local = c("adj_sum", node.name)
        if inside:
            self.weight[local] = w  # logsumexp's softmax: per unit, in the operand's kernel
        # (T, B, 1) where the reduction's kernel ran over every step: a step's kernel reads its step
        self.acc.setdefault(node.operand, []).append((local, Loc(Ref(total), kind="rowval", seq=mode != "step")))
        return loc

    def take_after(self) -> list:
        out, self.after = self.after, []
        return out

    def print_with_cse(self, stmts, b: KernelBuilder, ctx: str) -> list[str]:
        """C lines of a kernel: loads of what it reads, then the statements with
        common subexpressions shared (symrnn.schedule.shared_subexpressions)."""
        code = self.e.ccode
        out: list[str] = []

        placed = shared_subexpressions([ex for _, ex in stmts if ex is not None], self.c.numbered("tmp", scoped=True))
        temporaries = {sym for before, _ in placed for sym, _ in before}

        def need(expr):  # load every value of the step graph the expression reads
            for s in sorted(expr.free_symbols, key=lambda s: s.name):
                if s in temporaries or s.name not in self.e.c_names or self.c.value(s.name) in b.loaded:
                    continue  # a temporary, an adjoint (a local of this kernel), or loaded already
                b.load(self.c.value(s.name), self.e.loc(s.name, ctx))

        placed = iter(placed)
        for template, expr in stmts:
            if expr is None:
                out.append(template)
                continue
            before, expr = next(placed)
            need(expr)
            for sym, definition in before:
                need(definition)
                out.append(self.e.dialect.decl(sym.name, code(definition)))
            out.append(template.format(code(expr)))
        return b.loads + out

    # -- regions -----------------------------------------------------------------------
    def post(self) -> None:
        e, py = self.e, self.py
        for k in reversed(range(len(self.plan.post.stages))):
            stage = self.plan.post.stages[k]
            self.lines.append(Comment("readout, every step at once"))
            gather = stage.reductions or any(len(self.acc.get(mv.name, [])) != 1 or any(
                local in self.weight for local, _ in self.acc.get(mv.name, [])) for mv in stage.matvecs)
            if stage.pointwise or gather:
                for mv in stage.matvecs:
                    group, _ = self.plan.group_of(mv.name)
                    self.lines.append(Assign(Ref(py("gadj_seq", group.name)), empty(Text("T"), Text("B"), Size(group.rows))))
                self.lines.append(e.launch(self.stage_kernel(stage, k, "all", "post"), "T * B"))
                self.lines.extend(self.take_after())
            for group in stage.groups:
                if not (stage.pointwise or gather):
                    srcs = [self.acc.get(mv.name, []) for mv in group.members]
                    if len(group.members) != 1 or len(srcs[0]) != 1:
                        raise e.unsupported("a readout product with several adjoint sources is not supported yet")
                    self.lines.append(Assign(Ref(py("gadj_seq", group.name)), srcs[0][0][1].py))
                self.gemm_back(group, "all")

    def gemm_back(self, group: GemmGroup, ctx: str) -> None:
        """W^T delta for the operand, and the weight gradient (after the loop)."""
        g, e, py, c = self.g, self.e, self.py, self.c
        w = e.weights[group.name]
        operand = group.operand
        rows, cols = group.rows, g.size(operand)
        buf = self.pre_alias.get(group.name, py("gadj_seq", group.name))
        if ctx == "step":
            leaf = g.leaf(operand) if g.is_leaf(operand) else None
            name = py("adj_via", operand, group.name)
            self.loop_lines.append(Assign(Ref(name), Call("matmul", (Ref(buf, (t_SYM,)), w)), "W^T delta"))
            if leaf is not None and leaf.kind == "prev_state":
                self.next_sources.setdefault(leaf.state, []).append(name)
                self.gemm_sources.append((name, cols))
            else:
                self.acc.setdefault(operand, []).append((c("adj_via", operand, group.name), Loc(Ref(name), ld=cols)))
        else:
            back = Reshape(Call("matmul", (Reshape(Ref(buf), rows), w)), cols, steps=True)
            if operand == g.input.name:
                self.dx_terms.append(back)
            else:
                name = py("adj_via_seq", operand, group.name)
                self.lines.append(Assign(Ref(name), back, "W^T delta, every step"))
                self.acc.setdefault(operand, []).append((c("adj_via", operand, group.name), Loc(Ref(name), ld=cols, seq=True)))
        src = e.widened(operand, e.array(operand, "all"), "all")  # a product: its columns of its group's buffer
        dW = Call("matmul", (Reshape(Ref(buf), rows, T=True), Reshape(src, cols)))
        self.weight_lines.extend(weight_gradient(g, py, group, lambda param: py("adj", param), dW))

    def loop(self) -> None:
        g, e, plan, py = self.g, self.e, self.plan, self.py
        for stage in plan.loop.stages:
            for group in stage.groups:
                self.lines.append(Assign(Ref(py("gadj_seq", group.name)), empty(Text("T"), Text("B"), Size(group.rows))))
        if not plan.loop.stages:
            for s in g.states:
                self.lines.append(Assign(Ref(py("grad0", s.name)), empty(Text("B"), Size(s.size), fill="zeros")))
            return
        if e.time_mode:
            self.time_loop()
            return
        # sources carried from step t + 1 to step t: named now, filled by the kernels
        for s in g.states:
            for source in self.planned_sources(s.name):
                self.acc[s.name].append((self.c("next", source), Loc(Ref(py("next", source)), ld=s.size)))
        for k in reversed(range(len(plan.loop.stages))):
            stage = plan.loop.stages[k]
            kernel = self.stage_kernel(stage, k, "step")
            self.loop_lines.extend(self.step_fresh)
            self.step_fresh = []
            self.loop_lines.append(e.launch(kernel, "B", step="t"))
            self.loop_lines.extend(self.take_after())
            for group in stage.groups:
                self.gemm_back(group, "step")
        carried = [name for name, _ in self.direct_sources] + [name for name, _ in self.gemm_sources]
        head = [Assign(Ref(py("next", name)), Ref(name)) for name in carried]
        head += [Assign(Ref(name), empty(Text("B"), Size(size))) for name, size in self.direct_sources]
        for name, size in self.direct_sources + self.gemm_sources:
            self.lines.append(Assign(Ref(name), empty(Text("B"), Size(size), fill="zeros")))
        self.lines.append(Loop("t", Text("T"), tuple(head + self.loop_lines), reverse=True))
        for s in g.states:
            srcs = [Ref(name) for name in self.next_sources.get(s.name, [])]
            self.lines.append(Assign(Ref(py("grad0", s.name)), self.total(srcs, empty(Text("B"), Size(s.size), fill="zeros"))))

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
        dl = e.dialect
        kernel.body += [dl.assign(c('adj_next', s.name), dl.zero()) for s in g.states if s.name not in self.time_carry]
        kernel.prologue = [dl.var(c('adj_next', s.name), dl.zero(), "from step t + 1") for s in g.states]
        for s in g.states:
            array = py("grad0", s.name)
            self.lines.append(Assign(Ref(array), empty(Text("B"), Size(s.size))))
            ptr = c.get(("ptr", Ref(array)), f"{array}_ptr")
            kernel.params.append(("{}*", ptr))
            kernel.py_args.append(Ref(array))
            b_out.append(dl.store(ptr, f"row_ * {dim_code(s.size)} + unit_", c('adj_next', s.name)))
        kernel.epilogue = b_out
        self.lines.append(Comment("the whole recurrence backward: one kernel that loops over time, one thread per (batch, unit)"))
        self.lines.append(e.launch(kernel, "B", "T"))

    def pre(self) -> None:
        g = self.g
        for k in reversed(range(len(self.plan.pre.stages))):
            stage = self.plan.pre.stages[k]
            if stage.pointwise or stage.reductions or any(self.acc.get(mv.name) for mv in stage.matvecs):
                self.lines.append(Comment("input side, every step at once"))
                for group in stage.groups:
                    if group.name in self.pre_alias:
                        continue
                    for mv, off in zip(group.members, group.offsets):
                        if any(self.plan.region_of[c.name] == "loop" for c in g.consumers(mv.name)):
                            # the loop's kernels wrote their part of this adjoint here; this kernel adds the rest
                            loc = Loc(Ref(self.py("gadj_seq", group.name)), ld=group.rows, off=off)
                            self.acc.setdefault(mv.name, []).append((self.c("adj_loop", mv.name), loc))
                self.lines.append(self.e.launch(self.stage_kernel(stage, k, "all", "pre"), "T * B"))
                self.lines.extend(self.take_after())
            self.lines.extend(self.readout_parts(stage))
            for group in stage.groups:
                self.gemm_back(group, "all")
