"""The backward pass of the NumPy module (BPTT), as statements (symrnn.stmt).

Regions in reverse (``post``, the ``loop`` from step T - 1 down to 0, ``pre``),
stages in reverse within each: a stage's adjoints from the contributions its
consumers made (:attr:`Backward.acc`), then what it passes on to the values it
reads, then the adjoint GEMMs of its products.  In the loop, only what depends
on the incoming adjoints stays: every adjoint is linear in the adjoints, and its
coefficients (stored forward values only) are computed for a block of steps at
once before the loop runs over that block.  Weight gradients are one GEMM over
every step after the loop, from buffers that hold a GEMM's output adjoint for
every step.

An adjoint statement is first a :class:`Pending` (a destination, an expression
in symbols, how it is added), so that substitution, the split into coefficients
and common subexpressions work on SymPy expressions; :meth:`Backward.print_with_cse`
turns them into statements.  A symbol of an adjoint is the name it prints as:
``d_f``, or one step of a buffer, ``d_h_seq[t]`` (:meth:`Backward.sym`, which
records the buffer's ref, so what a statement reads stays known).
"""

from __future__ import annotations

from dataclasses import dataclass

import sympy

from ..errors import InternalError
from ..cell import DIMS
from ..ir import MatVecNode, Reduction
from ..plan import GemmGroup, Region, Stage
from ..reductions import mean, sum_units
from ..passes.hoist_coefficients import CoefficientHoisting
from ..passes.unit_products import ROWS, UNITS
from ..passes.unit_sums import UnitSums
from ..schedule import shared_subexpressions
from ..stmt import ALL, Assign, Call, Concat, Do, ETC, Helper, Index, Infix, Key, MatMul, Ref, Reshape, Size, Text, Update, empty, span, t_SYM
from .array_module import derived_gradient, parameter_sums, weight_gradient
from .python_printer import PythonPrinter

__all__ = ["Backward", "Pending", "emit_backward"]

#: the kinds of name (symrnn.naming) that hold adjoints
ADJOINT_KINDS = frozenset({"adj", "adj_part", "adj_from", "adj_via", "adj_next", "adj_seq", "gadj_seq"})

_SUM_AXES = {"scalar": None, "loop": Text("0"), "all": Text("(0, 1)")}


@dataclass(frozen=True)
class Pending:
    """An adjoint statement before printing: ``dst = expr`` (``op`` "="), ``dst += expr``
    (``op`` "+"), or with ``total`` ``dst += sum(expr)`` over the axes ``axes`` (None:
    all of them); ``alias``: ``dst = alias``, the same value computed already."""

    dst: Ref
    expr: sympy.Expr | None
    op: str = "="
    total: bool = False
    axes: Text | None = None
    alias: str = ""
    comment: str = ""
    units: bool = False  # dst (one value per row) takes expr's mean over the units

    def with_expr(self, expr: sympy.Expr) -> "Pending":
        return Pending(self.dst, expr, self.op, self.total, self.axes, self.alias, self.comment, self.units)


def emit_backward(e) -> None:
    """The sections of ``backward`` (seeds, the loop, the sums and GEMMs after it) into ``e.m``."""
    Backward(e).run()


def empty_steps(size: sympy.Expr, fill: str = "empty") -> Call:
    """``np.empty((T, B, size), dtype)`` (or zeros)."""
    return empty(Text("T"), Text("B"), Size(size), fill=fill)


def steps_matmul(a, a_cols: sympy.Expr, b, rows: sympy.Expr) -> Reshape:
    """``a @ b`` for ``a`` of shape (T, B, a_cols): one GEMM over all T * B rows.

    (NumPy runs a 3-D ``a @ b`` as T separate small products, several times slower.)"""
    return Reshape(MatMul(Reshape(a, a_cols), b), rows, steps=True)


def weight_gradient_gemm(a, rows: sympy.Expr, b, cols: sympy.Expr) -> MatMul:
    """``sum_t a[t]^T b[t]``: one GEMM over every step."""
    return MatMul(Reshape(a, rows, T=True), Reshape(b, cols))


def rows_of(w: Ref, rows) -> Ref | Index:
    """Rows ``rows`` of the weight ``w`` (itself maybe rows and columns of a parameter)."""
    return Index(w, (rows,)) if w.index or w.T else w[rows]


class Backward:
    def __init__(self, emitter):
        e = self.e = emitter
        self.g, self.d, self.plan, self.n, self.m = e.g, e.d, e.plan, e.n, e.m
        self.alias: dict[str, str] = {}  # adjoint name -> the name holding the same value
        self.acc: dict[str, list[Ref]] = {}  # value -> the arrays its adjoint sums
        self.sym_refs: dict[str, Ref] = {}  # symbol name -> the array it stands for (one step of a buffer)
        self.group_buffers: dict[str, tuple[str, tuple]] = {}  # loop adjoint buffer -> (owner group, adjoints of its slots)
        self.destination: dict[str, Ref] = {}  # loop adjoint -> its slot in an adjoint buffer
        self.in_place: set[str] = set()  # loop adjoints computed directly into their slot
        self.region_name = ""
        self.temporaries = self.n.numbered("d_tmp")  # names of shared subexpressions
        # the region's temporaries of forward values only, in the order they were defined:
        # (definition, temporary), read again by the stages after (passes: shared_temporaries)
        self.region_temps: list[tuple[sympy.Expr, sympy.Symbol]] = []
        self.adjoint_temps: set[sympy.Symbol] = set()  # temporaries that read an adjoint
        self.stage: Stage | None = None
        s = e.schedule  # which input-side adjoints the loop's buffers hold (symrnn.schedule)
        self.shared_members, self.shared_groups, self.member_source = s.shared_members, s.shared_groups, s.member_source
        self.partial_groups = set(s.partial_groups)
        self.compact_adjoints: set[str] = set()  # input-side values whose loop contributions are means (compact_adjoint)
        # names of adjoint arrays (and temporaries) holding one value per row, (..., 1): uniform
        # values' adjoints as their means over the units (passes: compact_unit_adjoints)
        self.compact_names: set[str] = set()
        self.stacked: dict[str, str] = {}  # an input-side product's adjoint buffer -> the group's it is a view of
        self.stacked_of: dict[str, str] = {}  # the product -> that view
        self.in_stack: dict[str, str] = {}  # a pre-region adjoint held by such a view -> the view
        self.routed: dict[sympy.Expr, str] = {}  # a step's whole contribution to an input-side buffer -> the buffer
        self.loop_buffer: dict[str, str] = {}  # loop group name -> its adjoint buffer
        self.slots: dict[str, tuple] = {}  # loop adjoint -> (buffer over all steps, its columns there: a Span or None)
        self.deferred_sums: list = []  # (parameter leaf, adjoint name): sums over stored buffers
        self.unit_sums: dict[tuple, str] = {}  # (region, adjoint held) -> its sum over the units
        self.unit_shares: dict[tuple, str] = {}  # (region, a reduction's share, width) -> the name holding it
        self.hoisting = CoefficientHoisting(self)  # the coefficients of the recursion, per block of steps
        self.unit = UnitSums(self)  # values and adjoints the same at every unit (passes/unit_sums.py)

    # -- symbols and values ----------------------------------------------------------
    def sym(self, ref: Ref) -> sympy.Symbol:
        """The symbol of an adjoint array (its printed name: ``d_h_seq[t]``)."""
        if not ref.index:
            return sympy.Symbol(ref.name)
        name = PythonPrinter().value(ref)
        self.sym_refs[name] = ref
        return sympy.Symbol(name)

    def adjoint(self, name: str) -> sympy.Symbol:
        """The symbol of a value's adjoint at one step (of the name that holds it, where two
        adjoints are one value: their terms then combine)."""
        adj = self.n("adj", name)
        return sympy.Symbol(self.alias.get(adj, adj) if "shared_unit_sums" in self.e.passes else adj)

    def ew(self, expr: sympy.Expr, ctx: str, extra: dict | None = None):
        """``expr`` as an elementwise value: graph values, adjoint buffers and, in the loop,
        the coefficients at step t."""
        table = {**self.sym_refs, **(self.hoisting.coef_refs if ctx == "loop" else {}), **(extra or {})}
        return self.e.ew(expr, ctx, table)

    def is_adjoint(self, symbol: sympy.Symbol) -> bool:
        """An adjoint's symbol: its name, or one step of an adjoint buffer (``d_h_seq[t]``)."""
        return self.n.kind(symbol.name.split("[", 1)[0]) in ADJOINT_KINDS

    def assigned(self, p: Pending) -> str | None:
        """The adjoint a pending statement ``<adjoint> = ...`` assigns, if it is one."""
        name = p.dst.name
        return name if p.op == "=" and not p.dst.index and self.n.kind(name) in ADJOINT_KINDS else None

    def grad_ref(self, param: str, rows=None) -> Ref:
        """A parameter's gradient (its rows ``rows``)."""
        grad = Ref(self.e.grad(param))
        return grad if rows is None else grad[rows]

    @property
    def d_x(self) -> Ref:
        return Ref(self.e.d_x)

    # -- the function --------------------------------------------------------------
    def run(self) -> None:
        m, g, plan, n = self.m, self.g, self.plan, self.n
        for s in g.states:
            m.backward_seed.append(self.seed(s.name, s.size))
        for r in g.readouts:
            m.backward_seed.append(self.seed(r, g.node(r).size))
            self.acc[r] = [Ref(n("adj_seq", r))]
        # adjoint buffers for values that receive contributions from a later region
        order = {"pre": 0, "loop": 1, "post": 2}
        later = set()
        for node in g.nodes:
            if node.name in g.state_names or node.name in g.readouts:
                continue
            mine = order[plan.region_of[node.name]]
            if any(order[plan.region_of[c.name]] > mine for c in g.consumers(node.name)) and node.name not in self.shared_members:
                later.add(node.name)
        views = self.stack_input_adjoints(later)
        self.compact_adjoints = {name for name in later if self.compact_adjoint(name)}
        for node in g.nodes:
            if node.name in later and n("adj_seq", node.name) not in self.stacked:
                width = sympy.Integer(1) if node.name in self.compact_adjoints else node.size
                m.backward_seed.append(Assign(Ref(n("adj_seq", node.name)), empty_steps(width, "zeros")))
        m.backward_seed.extend(views)
        m.backward_seed.append(Assign(self.d_x, Call("zeros_like", (Ref("x"),))))
        for p in g.params:
            m.backward_seed.append(Assign(self.grad_ref(p.name), Call("zeros_like", (Ref(n.value(p.name)),))))

        m.backward_carry = [Assign(Ref(n("adj_next", s.name)), Call("zeros", ((Text("B"), Size(s.size)), Text("dtype"))))
                            for s in g.states]
        self.region_backward(plan.post, "all", m.backward_post)
        for s in g.states:
            self.acc.setdefault(s.name, []).extend([Ref(n("adj_seq", s.name), (t_SYM,)), Ref(n("adj_next", s.name))])
        for name in plan.loop.nodes:
            if name not in g.state_names and any(plan.region_of[c.name] == "post" for c in g.consumers(name)):
                self.acc.setdefault(name, []).append(Ref(n("adj_seq", name), (t_SYM,)))
        self.region_backward(plan.loop, "loop", m.backward_loop)
        self.parameter_sums()
        for name in plan.pre.nodes:
            if name in self.shared_members:
                self.acc[name] = [Ref(n("adj", self.shared_members[name]))]  # never printed: see gemm_backward
            elif any(plan.region_of[c.name] != "pre" for c in g.consumers(name)):
                self.acc.setdefault(name, []).append(Ref(n("adj_seq", name)))
                if name in self.compact_adjoints and "compact_unit_adjoints" in self.e.passes:
                    self.compact_names.add(n("adj_seq", name))  # (T, B, 1), read as it is
                elif name in self.compact_adjoints:  # read at the full width (a view)
                    self.sym_refs[n("adj_seq", name)] = Call("broadcast_to", (
                        Ref(n("adj_seq", name)), (Text("T"), Text("B"), Size(g.node(name).size))))
        self.region_backward(plan.pre, "all", m.backward_pre)
        read = set().union(*(st.reads for st in (*m.backward_pre, *m.backward_after, *m.backward_weights)))
        m.backward_pre[:] = [st for st in m.backward_pre  # names of stacked adjoints nothing reads
                             if not (isinstance(st, Assign) and st.dst.name in self.in_stack and st.dst.name not in read)]
        self.hoisting.share()
        # initial states and the input
        m.grads = [(p.name, self.grad_ref(p.name)) for p in g.params] + [("x", self.d_x)]
        m.grads += [(f"{s.name}0", Ref(n("adj_next", s.name))) for s in g.states]

    def compact_adjoint(self, name: str) -> bool:
        """A value of the input side kept as one value per row (a layer norm's mean or inverse
        standard deviation, symrnn.backends.numpy_backend.uniform_values) that only the loop reads
        besides the input side: the loop stores each step's contribution to its adjoint as the
        mean over the units, (T, B, 1), and the input side reads that broadcast to the full
        width.  Exact: a value the same at every unit affects the loss only through the sum
        over units of its adjoint (every reduction passes back its adjoint's sum), which
        n times the mean is.  With the ``in_place`` pass (else the full-width buffer)."""
        if "in_place" not in self.e.passes or name not in self.e.compact or self.plan.region_of[name] != "pre":
            return False
        return all(self.plan.region_of[c.name] in ("pre", "loop") for c in self.g.consumers(name))

    def assign_compact(self, name: str, expr: sympy.Expr, seen: dict, label: str = "") -> Pending:
        """``name`` = the mean over the units of ``expr``, one value per row, (..., 1): the
        adjoint (or a part of it) of a uniform value (a mean, a variance, an inverse standard
        deviation: the same at every unit; passes: compact_unit_adjoints).  Exact, as
        compact_adjoint's buffers: such a value affects the loss only through the sum over
        units of its adjoint; what it passes on (to other uniform values, to a reduction's
        operand, to a scalar parameter) is linear in that adjoint with coefficients the same
        at every unit, so the mean carries the sum (n times it: reduction_backward,
        units_held).  A layer norm's chain from rstd to the variance's share is then one
        value per row instead of one per unit.  ``seen`` keeps it apart from the names that
        hold an expression itself (a statement reading that expression per unit, a vector
        parameter's sum, must not read its mean); the same mean twice is one name."""
        expr = sympy.factor_terms(expr)
        key = ("units", expr)
        if key in seen or expr in seen:  # the mean computed already, or the expression itself
            held = seen.get(key, seen.get(expr))
            self.alias[name] = held
            if held in self.compact_names:
                self.compact_names.add(name)
            return Pending(Ref(name), None, alias=held, comment=label)
        seen[key] = name
        self.compact_names.add(name)
        return Pending(Ref(name), expr, comment=label, units=True)

    def units_held(self, node, dep: str, term: sympy.Expr) -> sympy.Expr:
        """``term``, the contribution of pointwise ``node`` to the adjoint of ``dep``, times
        the number of units it stands for where it is one value per row (is_compact: a
        compact adjoint times a coefficient the same at every unit) and ``dep`` a scalar
        parameter, whose gradient sums the contribution at every unit."""
        g = self.g
        if not g.is_leaf(dep) or g.leaf(dep).kind != "param" or g.param(g.leaf(dep).param).kind != "scalar":
            return term
        return term * node.size if self.is_compact(term) else term

    def is_compact(self, expr: sympy.Expr) -> bool:
        """Every array ``expr`` reads is one value per row (or a scalar): so is its value."""
        g = self.g
        for s in expr.free_symbols:
            if s.name in self.compact_names or s.name.split("[", 1)[0] in self.compact_names:
                continue
            if s.name in DIMS or s.name in self.e.compact:  # a forward value kept as (..., 1)
                continue
            if g.is_leaf(s.name) and g.leaf(s.name).size is None:  # a scalar
                continue
            definition = self.hoisting.definition(s.name)  # a coefficient of the recursion (its buffer)
            if definition is not None and self.is_compact(definition):
                continue
            return False
        return True

    def compact_value(self, expr: sympy.Expr, ctx: str):
        """The mean over the units of ``expr``, (..., 1): each term's factors that are one
        value per row (is_compact) taken out of the mean of the rest, the terms with the
        same such factors under one mean."""
        groups: dict[sympy.Expr, list[sympy.Expr]] = {}
        for term in sympy.Add.make_args(expr):
            parts = {True: [], False: []}
            for f in sympy.Mul.make_args(term):
                parts[self.is_compact(f)].append(f)
            groups.setdefault(sympy.Mul(*parts[True]), []).append(sympy.Mul(*parts[False]))
        extra, parts = {}, []
        for outside, inside in groups.items():
            per_unit = sympy.Add(*inside)
            if self.is_compact(per_unit):  # nothing per unit (a number)
                parts.append(outside * per_unit)
                continue
            placeholder = sympy.Symbol(f"_mean{len(extra)}")
            value = self.ew(per_unit, ctx)
            extra[placeholder.name] = (Helper(UNITS[mean], (value,)) if "unit_products" in self.e.passes
                                       else Call("mean", (value,), (("axis", Text("-1")), ("keepdims", Text("True")))))
            parts.append(outside * placeholder)
        return self.ew(sympy.Add(*parts), ctx, extra)

    @staticmethod
    def steps(ctx: str) -> tuple:
        return (Text("B"),) if ctx == "loop" else (Text("T"), Text("B"))

    def note_compact(self, p: Pending, node=None) -> Pending:
        """Record the adjoint (or adjoint part) ``p`` assigns as one value per row where every
        term of it is (a reduction's share alone, compact_unit_adjoints: the same value at
        every unit, broadcast by what reads it), unless it is a product's (a GEMM's input:
        full_width)."""
        if "compact_unit_adjoints" not in self.e.passes or isinstance(node, MatVecNode):
            return p
        if (p.alias in self.compact_names) if p.expr is None else (not p.units and self.is_compact(p.expr)):
            self.compact_names.add(p.dst.name)
        return p

    def full_width(self, name: str | None, expr: sympy.Expr, value, ctx: str):
        """``value`` (of ``expr``), the adjoint ``name`` of a matrix-vector product (the
        input of an adjoint GEMM), at the product's width where every term of it is one value
        per row (a reduction's share alone, compact_unit_adjoints); a read-only view."""
        owner = self.n.owner(name) if name else None
        if "compact_unit_adjoints" not in self.e.passes or not owner or owner[0] != "adj" \
                or not isinstance(self.g.node(owner[1]), MatVecNode) or not self.is_compact(expr):
            return value
        return Call("broadcast_to", (value, (*self.steps(ctx), Size(self.g.size(owner[1])))))

    def stack_input_adjoints(self, later: set[str]) -> list:
        """An input-side GEMM of several products whose adjoints all receive contributions
        from a later region (the loop) keeps them in one (T, B, rows) buffer, the one its
        adjoint GEMM reads; each product's buffer is a view of it (``self.stacked``).  With the
        ``in_place`` pass, the pre region then adds the rest of each adjoint into its view
        (print_with_cse) and the GEMM reads the buffer without concatenating the slots."""
        if "in_place" not in self.e.passes:
            return []
        views = []
        for group in (grp for st in self.plan.pre.stages for grp in st.groups):
            if len(group.members) < 2 or group.name in self.shared_groups or group.name in self.partial_groups \
                    or not all(mv.name in later for mv in group.members):
                continue
            buf = self.n("gadj_seq", group.name)
            self.m.backward_seed.append(Assign(Ref(buf), empty_steps(group.rows, "zeros"), ", ".join(
                mv.name for mv in group.members)))
            for mv, off in zip(group.members, group.offsets):
                self.stacked[self.n("adj_seq", mv.name)] = buf
                self.stacked_of[mv.name] = self.n("adj_seq", mv.name)
                views.append(Assign(Ref(self.n("adj_seq", mv.name)), Ref(buf, (ETC, span(off, mv.size)))))
        return views

    def seed(self, output: str, size: sympy.Expr) -> Assign:
        """The adjoint of an output over every step, from the caller's ``grad_outputs``."""
        shape = (Text("T"), Text("B"), Size(size))
        return Assign(Ref(self.n("adj_seq", output)), Helper("_seed", (Text("grad_outputs"), Key(output), shape, Text("dtype"))))

    # -- sums over the steps ----------------------------------------------------------
    def parameter_sums(self) -> None:
        """Gradients of elementwise parameters whose adjoint a buffer stores
        (array_module.parameter_sums)."""
        sums = []
        for leaf, name in self.deferred_sums:
            name = self.alias.get(name, name)
            p = self.g.param(leaf.param)
            rows = None if leaf.block is None else span(leaf.block * leaf.size, leaf.size)
            if name not in self.slots:
                raise InternalError(f"adjoint '{name}' of cell '{self.g.cell}' is not stored over the steps")
            buf, cols = self.slots[name]
            sums.append((self.grad_ref(p.name, rows), buf, cols, p.kind == "scalar"))
        self.m.backward_after.extend(parameter_sums(
            sums, self.n, lambda v: Call("sum", (v,)), lambda v: Call("sum", (v,), (("axis", _SUM_AXES["all"]),)),
            "over the steps and the batch"))

    # -- regions and stages ---------------------------------------------------------------
    def region_backward(self, region: Region, ctx: str, out: list) -> None:
        g, n = self.g, self.n
        self.region_name = region.name
        self.region_temps, self.adjoint_temps = [], set()  # (shared_temporaries: per region)
        for k in reversed(range(len(region.stages))):
            self.stage_backward(region.stages[k], k, ctx, out)
        if ctx == "loop":
            bind = [Assign(Ref(n.value(name)), self.bound(name)) for name in self.loop_bindings(out)]
            prev = []
            for s in g.states:
                terms = tuple(self.acc.get(s.prev, []))
                carry = Ref(n("adj_next", s.name))
                value = Infix("+", terms) if len(terms) > 1 else terms[0] if terms else Call("zeros_like", (carry,))
                if terms and all(t.name in self.compact_names for t in terms):  # one value per row: d_h0's width
                    value = Call("broadcast_to", (value, (*self.steps("loop"), Size(s.size))))
                prev.append(Assign(carry, value))
            out[:] = bind + out + prev

    def loop_bindings(self, stmts: list) -> list[str]:
        """Forward values the loop body reads, in graph order."""
        used = set().union(*(s.reads for s in stmts))
        names = [s.prev for s in self.g.states if self.n.value(s.prev) in used]
        names += [node.name for node in self.g.nodes
                  if self.n.value(node.name) in used and self.plan.region_of[node.name] == "loop"]
        return names

    def bound(self, name: str) -> Ref:
        """Where the loop reads forward value ``name`` at step t."""
        g, n = self.g, self.n
        if g.is_leaf(name):
            return Ref(n("seq", g.leaf(name).state), (t_SYM,))
        if name in g.state_names:
            return Ref(n("seq", name), (t_SYM + 1,))
        if name in self.plan.stored:
            return Ref(n("seq", name), (t_SYM,))
        raise InternalError(f"backward of cell '{g.cell}' reads '{name}', which forward does not store")

    def stage_backward(self, stage: Stage, k: int, ctx: str, out: list) -> None:
        g, d = self.g, self.d
        self.stage = stage
        final_pw = {n.name for n in stage.pointwise}
        own = {mv.name for mv in stage.matvecs} | {r.name for r in stage.reductions}
        final = [n for n in g.nodes if n.name in final_pw or n.name in own]
        seen: dict[sympy.Expr, str] = {}  # adjoint expression -> the name that holds it
        nonzero: set[str] = set()
        pending: list[Pending] = []
        for node in reversed(final):
            if node.name in self.shared_members and ctx == "all":
                nonzero.add(node.name)  # held by the recurrent GEMM's adjoint buffer
                continue
            terms = [self.sym(src) for src in self.acc.get(node.name, [])]
            for c, coeff in d.adjoint_terms(node.name):
                if c in final_pw and c in nonzero:
                    terms.append(coeff * self.adjoint(c))
            expr = sympy.Add(*terms)
            if "zero_unit_sums" in self.e.passes and self.unit.is_uniform(node.name):
                expr = self.unit.drop_zero_sums(expr)  # terms whose sum over units is 0
            if expr == 0:
                continue
            nonzero.add(node.name)
            compact = "compact_unit_adjoints" in self.e.passes and node.name in self.e.uniform and node.name not in g.state_names
            pending.append(self.note_compact((self.assign_compact if compact else self.assign)(
                self.n("adj", node.name), expr, seen, label=f"eq:{g.cell}:adj:{node.name}"), node))
            self.unit.note(self.n("adj", node.name), expr)
        # contributions to values outside this stage
        targets = sorted({dep for n in stage.pointwise for dep in n.deps} - {n.name for n in final},
                         key=lambda name: (g.is_leaf(name), self.order(name)))  # values first, then parameters
        for dep in targets:
            expr = sympy.Add(*[self.units_held(c, dep, d.partial(c.name, dep) * self.adjoint(c.name))
                               for c in stage.pointwise if c.name in nonzero])
            if expr != 0:
                self.route(dep, expr, k, ctx, pending, seen)
        if ctx == "loop" and "hoist_coefficients" in self.e.passes:
            pending = self.hoisting.linearize(pending, stage)
        if ctx == "loop":
            for group in stage.groups:
                self.loop_adjoint_buffer(group, nonzero)
        self.print_with_cse(pending, ctx, out)
        for node in stage.reductions:
            self.reduction_backward(node, k, ctx, out, nonzero)
        for group in stage.groups:
            self.gemm_backward(group, ctx, out, nonzero)

    def reduction_backward(self, node: Reduction, k: int, ctx: str, out: list, nonzero: set[str]) -> None:
        """A reduction's adjoint passed to its operand: d_a += weight * sum_k d_r[k], the sum
        over units kept as a (..., 1) axis (symrnn.reductions: weight 1/n for the mean)."""
        if node.name not in nonzero:
            return
        adj = self.n("adj", node.name)
        held = self.alias.get(adj, adj)
        total = self.unit_sums.get((self.region_name, held)) if "shared_unit_sums" in self.e.passes else None
        if held in self.compact_names:  # the adjoint's mean over the units (assign_compact): n times it
            total, share = held, node.weight() * node.size * sympy.Symbol(held)
        else:
            if total is None:  # reductions whose adjoints are one value (d_r2 = d_r1) sum it once
                total = self.unit_sums[(self.region_name, held)] = self.n("adj_sum", node.name)
                axis = (("axis", Text("-1")), ("keepdims", Text("True")))
                value = (Helper(UNITS[sum_units], (Ref(held),)) if "unit_products" in self.e.passes
                         else Call("sum", (Ref(held),), axis))
                out.append(Assign(Ref(total), value, f"sum over the units of {held}"))
            share = node.weight() * sympy.Symbol(total)
        if self.plan.region_of[node.operand] == self.region_name:  # an earlier stage: its own name
            # the same at every unit: the weight reads no per-unit value (a mean's 1/n; logsumexp's
            # softmax of an operand that is itself uniform, stored (B, 1), is 1/n at every unit)
            uniform = all(s.name in (total, *DIMS) or s.name in self.e.uniform for s in share.free_symbols)
            key = (self.region_name, share, node.size)
            if uniform and key in self.unit_shares and "shared_unit_sums" in self.e.passes:  # computed already
                self.acc.setdefault(node.operand, []).append(Ref(self.unit_shares[key]))
                return
            name = self.n("adj_via", node.operand, node.name)
            value = self.ew(share, ctx)
            if uniform and "compact_unit_adjoints" in self.e.passes and self.is_compact(share):
                self.compact_names.add(name)  # one value per row: whatever adds it broadcasts it (full_width)
                self.unit_shares[key] = name
                self.unit.uniform_adjoints.add(name)
            elif uniform:  # a view at the operand's width
                value = Call("broadcast_to", (value, (*self.steps(ctx), Size(node.size))))
                self.unit_shares[key] = name
                self.unit.uniform_adjoints.add(name)
            out.append(Assign(Ref(name), value))
            self.acc.setdefault(node.operand, []).append(Ref(name))
            return
        pending: list[Pending] = []  # a buffer of an earlier region
        self.route(node.operand, share, k, ctx, pending, {})
        self.print_with_cse(pending, ctx, out)

    def order(self, name: str) -> tuple[int, str]:
        for i, leaf in enumerate(self.g.leaves):
            if leaf.name == name:
                return (i, name)
        return (len(self.g.leaves) + [n.name for n in self.g.nodes].index(name), name)

    def assign(self, name: str, expr: sympy.Expr, seen: dict, label: str = "") -> Pending:
        """``name = expr``, or an alias when the same expression was computed already."""
        expr = sympy.factor_terms(expr)
        if expr in seen:
            self.alias[name] = seen[expr]
            return Pending(Ref(name), None, alias=seen[expr], comment=label)
        seen[expr] = name
        return Pending(Ref(name), expr, comment=label)

    def route(self, dep: str, expr: sympy.Expr, k: int, ctx: str, out: list, seen: dict) -> None:
        """Add a stage's contribution ``expr`` to the adjoint of ``dep`` (outside the stage)."""
        g, n = self.g, self.n
        expr = sympy.factor_terms(expr)
        if expr in seen:  # the very value an adjoint already holds
            expr = sympy.Symbol(seen[expr])
        leaf = g.leaf(dep) if g.is_leaf(dep) else None
        if dep in self.shared_members:
            return  # the recurrent product's adjoint buffer holds this value already
        stored = {n("adj", mv.name) for mv in self.stage.matvecs}  # written to a buffer over all steps
        param = leaf is not None and leaf.kind == "param"
        if param and ctx == "loop" and expr.is_Symbol and self.alias.get(expr.name, expr.name) in stored:
            self.deferred_sums.append((leaf, expr.name))  # summed over every step after the loop
            return
        if param and ctx == "loop" and expr in self.routed and self.only_here(dep):
            self.slots.setdefault(self.routed[expr], (self.routed[expr], None))
            self.deferred_sums.append((leaf, self.routed[expr]))  # the same values as that buffer's
            return
        step = (t_SYM,) if ctx == "loop" else ()
        if param:
            p = g.param(leaf.param)
            rows = None if leaf.block is None else span(leaf.block * leaf.size, leaf.size)
            axes = None if p.kind == "scalar" else _SUM_AXES[ctx]
            out.append(Pending(self.grad_ref(p.name, rows), expr, "+", total=True, axes=axes))
        elif leaf is not None and leaf.kind == "input":
            out.append(Pending(Ref(self.d_x.name, step), expr, "+"))
        elif leaf is not None and leaf.kind == "prev_state":
            name = n("adj_part", dep, k)
            out.append(self.note_compact(self.assign(name, expr, seen)))
            self.acc.setdefault(dep, []).append(Ref(name))
        elif self.plan.region_of[dep] == self.region_name:
            name = n("adj_from", dep, k)
            compact = "compact_unit_adjoints" in self.e.passes and dep in self.e.uniform  # a part of a compact adjoint
            out.append(self.note_compact((self.assign_compact if compact else self.assign)(name, expr, seen)))
            self.acc.setdefault(dep, []).append(Ref(name))
        elif ctx == "loop" and dep in self.compact_adjoints:  # its mean over the units (compact_adjoint)
            out.append(Pending(Ref(n("adj_seq", dep), step), expr, "=" if self.only_here(dep) else "+", units=True))
        elif ctx == "loop" and self.only_here(dep):  # this step's whole contribution
            out.append(Pending(Ref(n("adj_seq", dep), step), expr))
            self.routed.setdefault(expr, n("adj_seq", dep))
        else:
            out.append(Pending(Ref(n("adj_seq", dep), step), expr, "+"))

    def only_here(self, name: str) -> bool:
        """Every consumer of ``name`` is a pointwise node of the current stage."""
        here = {n.name for n in self.stage.pointwise}
        return all(c.name in here for c in self.g.consumers(name))

    def print_with_cse(self, pending: list[Pending], ctx: str, out: list) -> None:
        """A stage's statements, common subexpressions shared (sympy.cse).

        Each temporary is placed just before the first statement that reads it,
        so it may use the adjoints computed by the statements above."""
        exprs = [self.reuse_temporaries(p.expr) for p in pending if p.expr is not None]
        placed = iter(shared_subexpressions(exprs, self.temporaries))
        for p in pending:
            if p.expr is None:
                out.append(Assign(p.dst, Ref(p.alias), p.comment))
                continue
            before, expr = next(placed)
            out.extend(Assign(Ref(sym.name), self.ew(definition, ctx)) for sym, definition in before)
            if "compact_unit_adjoints" in self.e.passes:
                self.compact_names.update(sym.name for sym, definition in before if self.is_compact(definition))
            self.note_temporaries(before)
            name = self.assigned(p)
            view = self.stacked_view(name, expr, exprs) if ctx == "all" and name else None
            if view is not None:  # the rest of the adjoint added into the view that holds its loop part
                rest = expr - sympy.Symbol(view)
                if rest != 0:
                    out.append(Update(Ref(view), "+", self.ew(rest, ctx), p.comment))
                out.append(Assign(p.dst, Ref(view), "" if rest != 0 else p.comment))
                self.in_stack[name] = view
                continue
            in_slot = name in self.destination  # an adjoint whose slot in a GEMM's adjoint buffer is known
            target = p.dst if in_slot or (p.op == "=" and p.dst.index) else None  # or a buffer slot (d_W_x_seq[t])
            if ctx == "loop" and target is not None and expr.is_Mul and len(expr.args) == 2 and "in_place" in self.e.passes \
                    and not p.units:
                # one product, straight into the buffer's slot: no temporary, no copy
                if in_slot:
                    self.in_place.add(name)
                    out.append(Assign(p.dst, self.destination[name]))
                a, b = (self.ew(arg, ctx) for arg in expr.args)
                out.append(Do(Call("multiply", (a, b), (("out", target),)), target, p.comment))
                continue
            if p.units:  # one value per row: the mean over the units
                value = self.compact_value(expr, ctx)
            else:
                value = self.full_width(name, expr, self.ew(expr, ctx), ctx)
            if p.total and ctx == "loop" and p.axes == _SUM_AXES["loop"] and "unit_products" in self.e.passes:
                value = Helper(ROWS, (value,))  # over the batch rows: a product with ones
            elif p.total:
                value = Call("sum", (value,), (("axis", p.axes),) if p.axes is not None else ())
            out.append(Assign(p.dst, value, p.comment) if p.op == "=" else Update(p.dst, p.op, value, p.comment))

    def stacked_view(self, name: str, expr: sympy.Expr, exprs: list) -> str | None:
        """The view of a stacked input-side adjoint buffer (stack_input_adjoints) that the
        adjoint ``name`` may be computed into: ``expr`` is that view plus other terms, and no
        other statement of the stage reads the view (it then holds the whole adjoint)."""
        owner = self.n.owner(name)
        view = self.stacked_of.get(owner[1]) if owner and owner[0] == "adj" else None
        if view is None or sympy.Symbol(view) not in sympy.Add.make_args(expr):
            return None
        return view if sum(1 for other in exprs if sympy.Symbol(view) in other.free_symbols) == 1 else None

    def reuse_temporaries(self, expr: sympy.Expr) -> sympy.Expr:
        """``expr`` reading the temporaries an earlier stage of this region defined for its
        subexpressions of forward values (the centred ``rh - mu`` of a layer norm, which the
        variance's adjoint and the gains' read in different stages), instead of computing them again."""
        if "shared_temporaries" not in self.e.passes:
            return expr
        for definition, sym in self.region_temps:  # in order: a later definition reads the earlier ones
            expr = expr.xreplace({definition: sym})
        return expr

    def note_temporaries(self, defined: list) -> None:
        """Keep the temporaries of forward values only for the stages after: the loop body's
        (or an all-steps region's) forward values do not change within it, adjoints may (``+=``)."""
        for sym, definition in defined:
            if any(self.is_adjoint(s) or s in self.adjoint_temps for s in definition.free_symbols):
                self.adjoint_temps.add(sym)
            else:
                self.region_temps.append((definition, sym))

    # -- GEMMs -------------------------------------------------------------------------
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
        self.m.backward_seed.append(Assign(Ref(buf), empty_steps(group.rows)))
        for a, mv, off in zip(adj, group.members, group.offsets):
            if a:
                self.slots.setdefault(a, (buf, span(off, mv.size) if len(group.members) > 1 else None))
                self.destination.setdefault(a, self.slot(group, mv, off, buf))
        return buf, True

    @staticmethod
    def slot(group: GemmGroup, mv: MatVecNode, offset: sympy.Expr, buf: str) -> Ref:
        return Ref(buf, (t_SYM,)) if len(group.members) == 1 else Ref(buf, (t_SYM, ALL, span(offset, mv.size)))

    def gemm_backward(self, group: GemmGroup, ctx: str, out: list, nonzero: set[str]) -> None:
        g, n, e = self.g, self.n, self.e
        w = e.weights[group.name]
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
                        out.append(Assign(slot, Ref(a) if a else Text("0.0")))
            step = Ref(buf, (t_SYM,))
        elif group.name in self.shared_groups:
            buf = self.loop_buffer[self.shared_groups[group.name]]
            step = Ref(buf)
        elif group.name in self.partial_groups:
            self.partial_gemms(group, adj)
            return
        else:
            if len(group.members) == 1:
                out.append(Assign(Ref(buf), Ref(adj[0])))
            elif all(self.stacked.get(self.in_stack.get(a, "")) == buf for a in adj):
                pass  # the slots of its adjoint buffer hold the members' adjoints (stack_input_adjoints)
            else:
                parts = tuple(Ref(a) if a else Call("zeros_like", (e.ref_of(mv.name, ctx),)) for a, mv in zip(adj, group.members))
                out.append(Assign(Ref(buf), Concat(parts, -1)))
            step = Ref(buf)
        # adjoint of the operand: W^T delta
        operand = group.operand
        back = steps_matmul(Ref(buf), group.rows, w, g.size(operand))  # W^T delta, every step
        in_loop = ctx == "loop" and (g.is_leaf(operand) and g.leaf(operand).kind == "prev_state" or self.plan.region_of.get(operand) == "loop")
        if ctx == "loop" and not in_loop:
            self.m.backward_after.append(Update(Ref(n("adj_seq", operand)), "+", back, "W^T delta for every step at once"))
        elif ctx == "loop":
            name = n("adj_via", operand, group.name)
            out.append(Assign(Ref(name), Call("dot", (step, w))))
            self.acc.setdefault(operand, []).append(Ref(name))
        elif operand == g.input.name or operand in g.state_names or self.plan.region_of[operand] != self.region_name:
            out.append(Update(Ref(n("adj_seq", operand)), "+", back))
        else:
            name = n("adj_via", operand, group.name)
            out.append(Assign(Ref(name), back))
            self.acc.setdefault(operand, []).append(Ref(name))
        # gradient of the weights: one GEMM over every step, after the loop
        dW = weight_gradient_gemm(Ref(buf), group.rows, e.ref_of(operand, "all"), g.size(operand))
        self.m.backward_weights.extend(weight_gradient(g, n, group, e.grad, dW))

    def partial_gemms(self, group: GemmGroup, adj: list[str | None]) -> None:
        """Input-side GEMMs of a group whose members partly share the loop buffer's slots:
        one product per run of members (shared runs read the loop buffer, no copies)."""
        e, x = self.e, Ref("x")
        runs: list[list] = []  # [source, first offset in source, first row, size]
        for a, mv, off in zip(adj, group.members, group.offsets):
            if mv.name in self.member_source:
                rec, rec_off = self.member_source[mv.name]
                loop_buf = self.loop_buffer[rec]
                if len(self.plan.groups[rec].members) == 1:
                    rec_off = None  # the whole buffer
                if (runs and runs[-1][0] == loop_buf and rec_off is not None and runs[-1][1] is not None
                        and sympy.expand(runs[-1][1] + runs[-1][3] - rec_off) == 0):
                    runs[-1][3] += mv.size
                    continue
                runs.append([loop_buf, rec_off, off, mv.size])
            elif a:
                runs.append([a, None, off, mv.size])
        w, cols = e.weights[group.name], self.g.size(group.operand)

        def view(source: str, start, size) -> Ref:
            return Ref(source) if start is None else Ref(source, (ETC, span(start, size)))

        for source, src_off, row, size in runs:
            rows = span(row, size)
            self.m.backward_pre.append(Update(self.d_x, "+", steps_matmul(view(source, src_off, size), size, rows_of(w, rows), cols)))
            if group.whole_param:
                dW = weight_gradient_gemm(view(source, src_off, size), size, x, cols)
                self.m.backward_weights.append(Update(self.grad_ref(group.whole_param, rows), "+", dW))
                continue
            for mv, off in zip(group.members, group.offsets):  # stacked from several parameters: member by member
                inside = sympy.expand(off - row)
                if inside.is_negative or sympy.expand(row + size - off - mv.size).is_negative:
                    continue
                part = view(source, None if src_off is None else src_off + inside, mv.size)
                if self.g.is_derived(mv.param):
                    self.m.backward_weights.append(Assign(Ref("dW_stack"), weight_gradient_gemm(part, mv.size, x, cols)))
                    self.m.backward_weights.extend(derived_gradient(self.g, mv, e.grad, Ref("dW_stack")))
                    continue
                target = e.weight_ref(mv, base=e.grad(mv.param))
                if mv.transpose:  # d(W^T) = delta^T x, so dW += x^T delta
                    self.m.backward_weights.append(Update(target.t, "+", weight_gradient_gemm(x, cols, part, mv.size)))
                    continue
                dW = weight_gradient_gemm(part, mv.size, x, cols)
                self.m.backward_weights.append(Update(target, "+", dW))
