"""Block stacking (NumPy): one statement on a stacked array where the derivation wrote one per block.

A cell written by blocks (haste's layer-normalized LSTM: four gates, each with its rows of W, R,
gamma_x, gamma_r and b; symrnn.spec's ``blocks``) is derived node by node, so its module computes
what is one computation on the stacked (B, 4n) arrays as four statements on (B, n) views:

    d_tmp6 = d_tmp5*gamma_r_1    ...    d_tmp15 = d_tmp14*gamma_r_3

Each of those NumPy calls pays its dispatch and a pass over a quarter of the data.  This pass finds
the blocks of a *stack*: K views of equal width w of one array's unit axis at offsets 0, w, ..,
(K - 1) w (a stacked product's views ``rh_g = h_prev_proj[:, n:2n]``, a parameter's row blocks
``gamma_r_1 = gamma_r[n:2n]``, a stacked adjoint ``d_wx_g_seq[t]``), and rewrites

* **K statements that are one statement on the blocks** (the same expression, block k's views in
  statement k, every other operand the same and proved of width 1: a row's mean, its inverse
  standard deviation, a number) into one statement on the stacked views, where the first of them
  was (or else the last, when they cannot all move there); each block's name becomes a view of
  the result (``d_tmp6 = d_tmp12_stack[..., n:2n]``).  A statement that adds into, or writes,
  block k of an array (``d_wx_g_seq[t] += ...``, ``d_gamma_r[n:2n] += _sum_rows(...)``,
  ``d_h_prev_proj_seq[t, :, n:2n] = d_rh_g``) stacks into the blocks' span;
* **K different statements whose values two groups of such statements or more read as blocks**
  (a sigmoid's derivative on three gates, tanh's on the fourth) into writes into the blocks of one
  new (B, K w) array, when each value is proved to be (B, w) (:class:`Shapes`), so that their
  readers stack (with one group only, the copies would cost what stacking it saves);
* **a mean (or sum) over the units of a sum of K terms, one per block** (``_mean_units(d_tmp10 *
  d_tmp12 + ... + d_tmp7 * d_tmp9)``) into K times the mean of the stacked term (a sum: the sum);
* **K in-place calls whose operands are one expression on the blocks** (the gates' pre-activations
  under sigmoid and tanh) into that expression once on the stacked views, each call reading its
  block of the result;
* **K reductions over the units of the K blocks that one statement reads, and nothing else, as one
  sum with one coefficient** (``mu_r = mean_rh_i/4 + ... + mean_rh_o/4``, a layer norm over all
  gates written as the mean of the gates' means) into one reduction of the stacked view
  (``mu_r[...] = _mean_units(h_prev_proj)``): the K means' sum is K times the stacked mean.

Then what it stacked is written where it goes: a stacked value that is only copied into a part of
an array is computed there, and a sum or product written into a block of a stack it made is its
ufunc's ``out=`` (no temporary copied); and a sum over the rows of a product with a row's value
(``_sum_rows(a*b*rstd_r)``) is that sum weighted by the value (``_sum_rows_by(a*b, rstd_r)``).

Nothing is stacked that is not proved the same computation: a statement with a reduction over the
units of a block (a block's own mean), blocks of two different numbers, a transposed or otherwise
indexed block, a shared operand not proved of width 1, a statement that cannot move to where the
stacked one goes (something between reads what it writes or writes what it reads) is left as it
is.  Switched off (``stack_blocks``, symrnn.passes), every block keeps its own statements.

Measured (benchmarks/layer_norm_cpu.py, benchmarks/RESULTS.md's layer-norm section): layer_norm_lstm's
module at T=100, B=32, I=H=256 took 1.41-1.43x lstm's time with the pass in three runs (float32;
float64 1.30-1.36x) against 1.61x (1.52x) on the benchmark's run before it; one interleaved run of
both modules (12 rounds, float32): 1.63x -> 1.44x.  With the sums of block means, the writes into
buffers, the weighted and vecdot sums, and centred_in_place: 1.25-1.29x in three runs of four
(1.36x in the fourth, on a loaded host; float64 1.21-1.27x); with input_side_in_loop too, 1.21x
(float64 1.18x) on a quieter host.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import sympy

from ..reductions import Reduce
from .unit_products import WEIGHTED_ROWS
from ..stmt import ALL, ETC, Assign, Call, Do, Elementwise, Helper, OpCall, Ref, Reshape, Size, Span, Text, Update, rewrite_stmt

__all__ = ["Shapes", "Slot", "Views", "stack_blocks", "weighed"]

#: helpers that reduce over the unit axis (kept as an axis of 1) -> the factor of the stacked one
#: (a sum of K blocks' sums is the stacked sum; the mean of K blocks' sum is K times the stacked mean)
_UNIT_REDUCTIONS = {"_sum_units": 1, "_mean_units": None}
#: the helper that sums over the batch rows (unit by unit: it stacks as the units do)
_ROW_SUM = "_sum_rows"
_VALUE = sympy.Symbol("\x02value")  # a statement whose value is a ref, as an expression



@dataclass(frozen=True)
class Slot:
    """The part ``lo:lo + width`` of the unit (last) axis of ``base[lead]`` (``lead``: the index
    items before it; ``()`` for a vector's own span)."""

    base: str
    lead: tuple
    lo: sympy.Expr
    width: sympy.Expr

    @property
    def block(self) -> int | None:
        """k where this is block k of width ``width`` (lo = k width), else None."""
        k = sympy.simplify(self.lo / self.width)
        return int(k) if k.is_Integer and k >= 0 else None

    @property
    def stack(self) -> tuple:
        return (self.base, self.lead, self.width)

    def stacked(self, blocks: int) -> Ref:
        """The view of blocks 0 .. ``blocks`` - 1."""
        return Ref(self.base, (*self.lead, Span(sympy.Integer(0), sympy.expand(blocks * self.width))))

    def overlaps(self, other: "Slot") -> bool:
        if self.base != other.base:
            return False
        if self.stack == other.stack and self.block is not None and other.block is not None:
            return self.block == other.block
        return True  # not proved apart


def _is_span(item) -> bool:
    return isinstance(item, Span) and item.lo is not None and item.hi is not None


def _in_block_order(pairs):
    """The items of (block, item) pairs in block order, where the blocks are 0 .. K - 1 (K >= 2),
    each once; else None."""
    by_block = dict(pairs)
    if len(pairs) < 2 or len(by_block) != len(pairs) or set(by_block) != set(range(len(pairs))):
        return None
    return [by_block[k] for k in range(len(pairs))]


def _part(v: Elementwise, expr: sympy.Expr) -> Elementwise:
    """A subexpression of ``v`` with the refs of its symbols."""
    refs = dict(v.refs)
    return Elementwise(expr, tuple((s.name, refs[s.name]) for s in expr.free_symbols if s.name in refs))


def _block(name: str, lead: tuple, k: int, width: sympy.Expr) -> tuple[Ref, Slot]:
    """Block k of array ``name`` (of width ``width``, on its last axis after ``lead``): its view and slot."""
    lo = sympy.expand(k * width)
    return Ref(name, (*lead, Span(lo, sympy.expand(lo + width)))), Slot(name, lead, lo, width)


def _value_of(stmt):
    """(the statement's value as an elementwise expression, the row-sum helper around it or None)."""
    value = stmt.value
    wrap = None
    if isinstance(value, Helper) and value.func == _ROW_SUM and len(value.args) == 1 and not value.kwargs:
        wrap, value = _ROW_SUM, value.args[0]
    if isinstance(value, Ref):
        value = Elementwise(_VALUE, ((_VALUE.name, value),))
    return (value, wrap) if isinstance(value, Elementwise) else (None, None)


def _alias(value):
    """The ref a value is another name of (``u = R_0_h_prev_sum``: no copy), or None."""
    if isinstance(value, Elementwise) and value.expr.is_Symbol:
        value = dict(value.refs).get(value.expr.name, Ref(value.expr.name))
    return value if isinstance(value, Ref) else None


class Views:
    """Which names are blocks of a stack: each ``X = Y[..., lo:hi]`` (or ``X = Y[t]`` of such a
    view, ``X = v[lo:hi]`` of a vector ``v``) of the sections, for a name assigned once there."""

    def __init__(self, sections: Iterable[list], vectors: frozenset[str]):
        self.vectors = vectors
        stmts = [s for section in sections for s in section]
        counts: dict[str, int] = {}
        for s in stmts:  # bindings (writing into an array does not rebind its name)
            for dst in (s.dst if isinstance(s.dst, tuple) else (s.dst,)) if isinstance(s, Assign) else ():
                if not dst.index:
                    counts[dst.name] = counts.get(dst.name, 0) + 1
        self.slots: dict[str, Slot] = {}
        for s in stmts:
            if isinstance(s, Assign) and isinstance(s.dst, Ref) and not s.dst.index and counts[s.dst.name] == 1:
                slot = self.of(_alias(s.value))
                if slot is not None and slot.block is not None and counts.get(slot.base, 0) <= 1:
                    self.slots[s.dst.name] = slot  # (a view of an array bound again would be of the old one)

    def of(self, ref: Ref) -> Slot | None:
        """The slot ``ref`` is, or None."""
        if not isinstance(ref, Ref) or ref.T:
            return None
        if ref.name in self.slots:
            slot = self.slots[ref.name]
            if not ref.index:
                return slot
            if slot.lead == (ETC,) and all(isinstance(i, sympy.Basic) for i in ref.index):
                return Slot(slot.base, (*ref.index, ETC), slot.lo, slot.width)
            return None
        if ref.index and _is_span(ref.index[-1]) and not any(isinstance(i, Span) for i in ref.index[:-1]):
            lead = tuple(ref.index[:-1])
            if not lead and ref.name not in self.vectors:
                return None  # a span of a matrix's rows is not its unit axis
            span = ref.index[-1]
            return Slot(ref.name, lead, span.lo, sympy.expand(span.hi - span.lo))
        return None

    def region(self, name: str):
        """What a name's array is part of: (root array, its slot there or None: all of it)."""
        slot, seen = None, set()
        while name in self.slots and name not in seen:
            seen.add(name)
            slot = self.slots[name]
            name = slot.base
        return name, slot


class Shapes:
    """(rank, last-axis size) of the names of the sections, where proved: allocations, parameters
    (``known``), views, NumPy's broadcasting of an elementwise expression (the one size that is
    not 1), a reduction over the units (1).  A name bound twice with two shapes has none."""

    def __init__(self, known: dict, views: Views):
        self.shapes: dict = dict(known)
        self.known = frozenset(known)  # bound from the parameters (``p["W"]``): their shapes stand
        self.views = views

    def scan(self, stmts: Iterable) -> None:
        for s in stmts:
            if isinstance(s, Assign) and isinstance(s.dst, Ref) and not s.dst.index and s.dst.name not in self.known:
                shape, name = self.value(s.value), s.dst.name
                if name in self.shapes and self.shapes[name] != shape:
                    shape = None
                self.shapes[name] = shape

    def ref(self, ref: Ref):
        """The shape of ``name[index]``: a position removes its axis, a span of the last axis sets
        its size; None where the last axis is indexed away or a span's size is not known."""
        if ref.T or self.shapes.get(ref.name) is None:
            return None
        rank, size = self.shapes[ref.name]
        index = ref.index
        if ETC in index:
            last = index[-1] if index[-1] is not ETC else None  # the item of the last axis, if any
        else:
            last = index[-1] if index and len(index) == rank else None
        if isinstance(last, Span):
            if not _is_span(last):
                return None
            size = sympy.expand(last.hi - last.lo)
        elif isinstance(last, sympy.Basic):
            return None  # the last axis indexed away
        rank -= sum(isinstance(i, sympy.Basic) for i in index)
        return (rank, size) if rank >= 0 else None

    def value(self, v):
        if isinstance(v, Ref):
            slot = self.views.of(v)
            if slot is not None and v.name in self.views.slots:
                base = self.shapes.get(slot.base)
                if base is None:
                    return None
                rank = base[0] - sum(isinstance(i, sympy.Basic) for i in slot.lead)
                return (rank, slot.width) if rank >= 1 else None
            return self.ref(v)
        if isinstance(v, Call) and v.func in ("empty", "zeros") and v.args and isinstance(v.args[0], tuple):
            return self.literal(v.args[0])
        if isinstance(v, Call) and v.func in ("empty_like", "zeros_like") and v.args and isinstance(v.args[0], Ref):
            return self.ref(v.args[0])
        if isinstance(v, Reshape):
            return (3 if v.steps else 2, v.cols) if not v.T else None
        if isinstance(v, Helper) and v.func == "_seed" and len(v.args) >= 3 and isinstance(v.args[2], tuple):
            return self.literal(v.args[2])
        if isinstance(v, Helper) and v.func in _UNIT_REDUCTIONS and len(v.args) in (1, 2):  # (of a, or of a * b)
            inner = self.value(v.args[0])
            return (inner[0], sympy.Integer(1)) if inner else None
        if isinstance(v, Elementwise):
            return self.elementwise(v)
        return None

    @staticmethod
    def literal(shape: tuple):
        last = shape[-1] if shape else None
        if isinstance(last, Size):
            return (len(shape), sympy.sympify(last.expr))
        if isinstance(last, sympy.Basic):
            return (len(shape), last)
        return None

    def operand(self, name: str, refs: dict):
        return self.value(refs[name]) if name in refs else self.shapes.get(name)

    def elementwise(self, v: Elementwise):
        if v.expr.atoms(Reduce):
            return None
        refs = dict(v.refs)
        shapes = [self.operand(s.name, refs) for s in v.expr.free_symbols]
        if any(s is None for s in shapes):
            return None
        if not shapes:
            return (0, sympy.Integer(1))
        sizes = {size for _, size in shapes if size != 1}
        if len(sizes) > 1:
            return None
        return (max(rank for rank, _ in shapes), sizes.pop() if sizes else sympy.Integer(1))

    def width_one(self, name: str, refs: dict) -> bool:
        shape = self.operand(name, refs)
        return shape is not None and shape[1] == 1

    def width_one_expr(self, v: Elementwise) -> bool:
        shape = self.elementwise(v)
        return shape is not None and shape[1] == 1


class _Stacker:
    """The pass over one section (its statements in order)."""

    def __init__(self, stmts: list, views: Views, shapes: Shapes, fresh: Callable[[str], str], bindings: set,
                 outside: frozenset[str] = frozenset()):
        self.stmts = list(stmts)
        self.views, self.shapes, self.fresh = views, shapes, fresh
        self.bindings = bindings  # the views of a stack this pass binds a block's name to
        self.outside = outside  # the names something outside this section reads
        self.made: set[str] = set()  # the arrays this pass made (stacked values, new stacks)

    def run(self) -> list:
        while (self.stack_once() or self.produce_once() or self.reduce_once() or self.operands_once()
               or self.sums_once()):
            pass
        self.into_buffers()
        self.fold_products()
        self.stmts = [rewrite_stmt(s, lambda v: weighed(v, self.shapes)) for s in self.stmts]
        return self.stmts

    # -- the stacked values written where they go ----------------------------------------------
    def read_anywhere(self, name: str, but: int | None = None) -> bool:
        """Whether a statement (other than number ``but``), or something outside the section,
        reads ``name`` or a view of it; a block's view this pass bound is a read only where its
        name is read."""
        names = {name} | {n for n in self.views.slots if self.views.region(n)[0] == name}
        if names & self.outside:
            return True
        for k, st in enumerate(self.stmts):
            if k == but or not st.reads & names:
                continue
            if st in self.bindings and not self.read_anywhere(st.dst.name):
                continue
            return True
        return False

    def into_buffers(self) -> None:
        """A stacked value copied into a part of an array and read nowhere else (``d_rh_i_stack = ...;
        d_h_prev_proj_seq[t] = d_rh_i_stack``) computed into that part; a sum or a product written
        into a part of an array (a block of a stack this pass made) computed there by its ufunc
        (``np.multiply(d_g, 1 - g**2, out=d_tmp11_stack[:, n:2n])``), not into a temporary then copied."""
        for i in reversed(range(len(self.stmts))):
            s = self.stmts[i]
            if not (isinstance(s, Assign) and isinstance(s.dst, Ref) and not s.dst.index and s.dst.name in self.made
                    and isinstance(s.value, Elementwise)):
                continue
            j = i + 1  # the next statement but the blocks' views of it that nothing reads
            while j < len(self.stmts) and self.stmts[j] in self.bindings and not self.read_anywhere(self.stmts[j].dst.name):
                j += 1
            copy = self.stmts[j] if j < len(self.stmts) else None
            if (isinstance(copy, Assign) and isinstance(copy.dst, Ref) and copy.dst.index
                    and copy.value == Ref(s.dst.name) and not self.read_anywhere(s.dst.name, j)):
                views = [st for st in self.stmts[i + 1:j] if not (isinstance(st.value, Ref) and st.value.name == s.dst.name)]
                self.stmts[i:j + 1] = [_into(copy.dst, s.value, s.comment), *views]  # (X's own views go with it)
        self.stmts = [_into(s.dst, s.value, s.comment)
                      if isinstance(s, Assign) and isinstance(s.dst, Ref) and s.dst.index and s.dst.name in self.made
                      and isinstance(s.value, Elementwise) else s for s in self.stmts]

    def fold_products(self) -> None:
        """A product (or a square) that only a sum or mean over its units reads (``mean_in_var_r =
        rc**2; var_r = _mean_units(mean_in_var_r)``) read as its factors by that reduction instead
        (``_mean_units(rc**2)``, which :func:`weighed` then computes without the product)."""
        for i in reversed(range(len(self.stmts))):
            s = self.stmts[i]
            if not (isinstance(s, Assign) and isinstance(s.dst, Ref) and not s.dst.index and isinstance(s.value, Elementwise)
                    and (s.value.expr.is_Mul or (s.value.expr.is_Pow and s.value.expr.exp == 2))):
                continue
            name = s.dst.name
            views = [j for j, st in enumerate(self.stmts) if st in self.bindings and _alias(st.value) is not None
                     and _alias(st.value).name == name and not self.read_anywhere(st.dst.name)]  # (unread)
            readers = [j for j, st in enumerate(self.stmts) if name in st.reads and j not in views]
            if len(readers) != 1 or self.read_anywhere(name, readers[0]):
                continue
            j = readers[0]
            kept, self.stmts = self.stmts, [st for k, st in enumerate(self.stmts) if k not in views]
            movable = self.movable([i], j - 1 - sum(k < j for k in views))  # (i: before every view of it)
            self.stmts = kept
            if not movable:
                continue

            def inline(v, name=name, value=s.value):
                if (isinstance(v, Helper) and v.func in _UNIT_REDUCTIONS and len(v.args) == 1
                        and _alias(v.args[0]) == Ref(name)):
                    return Helper(v.func, (value,))
                return v

            folded = rewrite_stmt(self.stmts[j], inline)
            if name not in folded.reads:
                self.stmts[j] = folded
                self.stmts = [st for k, st in enumerate(self.stmts) if k != i and k not in views]

    # -- a statement as block k of a stacked one ----------------------------------------------
    def abstract(self, v: Elementwise, wild: bool):
        """(the expression with each block's symbol replaced by its stack's placeholder, the other
        symbols with their refs, the block, the locals of the blocks' width replaced by ``?``
        when ``wild``); None when the expression reads no block, blocks of two numbers, or a
        reduction."""
        if v.expr.atoms(Reduce):
            return None  # a reduction over the units of a block is not one over the stack
        refs = dict(v.refs)
        subs, blocks, others, wilds = {}, set(), [], []
        for s in sorted(v.expr.free_symbols, key=lambda s: s.name):
            value = refs.get(s.name, Ref(s.name))
            if not isinstance(value, Ref):
                return None  # a reduction (or a call) inside: not a statement on units
            slot = self.views.of(value)
            if slot is not None and slot.block is not None:
                subs[s] = sympy.Symbol("\x00" + repr(slot.stack))
                blocks.add(slot.block)
            elif wild and not value.index and not self.shapes.width_one(s.name, refs):
                subs[s] = sympy.Symbol("\x01?")
                wilds.append(value.name)
            else:
                others.append((s.name, refs.get(s.name)))
        if len(blocks) != 1:
            return None
        return v.expr.xreplace(subs), tuple(others), blocks.pop(), tuple(wilds)

    def site(self, i: int, wild: bool):
        """(key, block, wild names) of statement i as block k of a stacked statement, or None."""
        s = self.stmts[i]
        if isinstance(s, Assign) and isinstance(s.dst, Ref):
            kind = "="
        elif isinstance(s, Update):
            kind = s.op + "="
        else:
            return None
        if kind == "=" and not s.dst.index and s.dst.name in self.views.slots:
            return None  # a block's view of a stack
        value, wrap = _value_of(s)
        got = None if value is None else self.abstract(value, wild)
        if got is None:
            return None
        expr, others, block, wilds = got
        if s.dst.index or kind != "=":
            slot = self.views.of(s.dst)
            if slot is None or slot.block != block:
                return None
            target = slot.stack
        else:
            target = None  # a new value: a view of the stacked one
        return (kind, wrap, target, sympy.srepr(expr), others, len(wilds)), block, wilds

    def groups(self, wild: bool):
        """The K sites of one stacked statement, in block order (and their wild names)."""
        sites: dict = {}
        for i in range(len(self.stmts)):
            got = self.site(i, wild)
            if got is not None:
                key, block, wilds = got
                sites.setdefault(key, []).append((i, block, wilds))
        for members in sites.values():
            ordered = _in_block_order([(block, (i, wilds)) for i, block, wilds in members])
            if ordered is not None:
                yield ordered

    # -- stacking K statements ---------------------------------------------------------------------
    def stack_once(self) -> bool:
        return any(self.place([i for i, _ in members]) for members in self.groups(wild=False))

    def regions(self, names) -> list:
        return [self.views.region(n) for n in names]

    def written(self, stmt) -> list:
        """What a statement writes: a block it writes into as that block, else the whole array."""
        dst = getattr(stmt, "dst", None)
        if isinstance(dst, Ref) and dst.index:
            slot = self.views.of(dst)
            if slot is not None:
                root, above = self.views.region(dst.name)
                return [(root, slot if above is None else None)]
        return self.regions(stmt.writes)

    def conflict(self, a: list, b: list) -> bool:
        for root_a, slot_a in a:
            for root_b, slot_b in b:
                if root_a == root_b and (slot_a is None or slot_b is None or slot_a.overlaps(slot_b)):
                    return True
        return False

    def movable(self, positions: list[int], to: int) -> bool:
        """Whether each statement at ``positions`` can move to position ``to`` (the first of them
        or the last): nothing it passes reads what it writes, or writes what it reads or writes;
        none of them reads what another writes."""
        members = [self.stmts[p] for p in positions]
        written = set().union(*(m.writes for m in members))
        if any(m.reads & (written - m.writes) for m in members):
            return False
        for p, m in zip(positions, members):
            reads, writes = self.regions(m.reads - m.writes), self.written(m)
            for j in range(min(p, to), max(p, to) + 1):
                if j in positions:
                    continue
                other = self.stmts[j]
                if (self.conflict(self.regions(other.reads - other.writes), writes)
                        or self.conflict(self.written(other), reads + writes)):
                    return False
        return True

    def stacked(self, slot: Slot, blocks: int) -> Ref:
        """The view of a stack's blocks 0 .. ``blocks`` - 1: the array itself (``base[lead]``) where
        they are all of its last axis."""
        shape = self.shapes.shapes.get(slot.base)
        if shape is not None and slot.lo == 0 and sympy.expand(shape[1] - blocks * slot.width) == 0:
            lead = list(slot.lead)
            while lead and lead[-1] in (ALL, ETC):
                lead.pop()
            return Ref(slot.base, tuple(lead))
        return slot.stacked(blocks)

    def stacked_value(self, value: Elementwise, blocks: int) -> Elementwise | None:
        """``value`` (block 0's) on the stacked views of its blocks; None when an operand shared by
        the blocks is not proved of width 1 (it would not broadcast over the stack)."""
        refs = dict(value.refs)
        subs, new_refs = {}, {}
        for s in value.expr.free_symbols:
            ref = refs.get(s.name, Ref(s.name))
            slot = self.views.of(ref)
            if slot is not None and slot.block is not None:
                stacked = self.stacked(slot, blocks)
                name = _view_name(stacked)
                subs[s] = sympy.Symbol(name)
                new_refs[name] = stacked
            elif not self.shapes.width_one(s.name, refs):
                return None
            elif s.name in refs:
                new_refs[s.name] = refs[s.name]
        return Elementwise(value.expr.xreplace(subs), tuple(sorted(new_refs.items())))

    def place(self, positions: list[int]) -> bool:
        """Stack the K statements at ``positions`` (block order) where the first of them is, or
        else the last, if they can move there."""
        at = next((to for to in (min(positions), max(positions)) if self.movable(positions, to)), None)
        if at is None:
            return False
        stmts, blocks = self.stmts, len(positions)
        first = stmts[positions[0]]
        value, wrap = _value_of(first)
        stacked = self.stacked_value(value, blocks)
        if stacked is None:
            return False
        if stacked.expr.is_Symbol and stacked.expr.name in dict(stacked.refs):
            merged = dict(stacked.refs)[stacked.expr.name]  # a view: as a ref
        else:
            merged = stacked
        if wrap:
            merged = Helper(wrap, (merged,))
        out: list = []
        if first.dst.index or isinstance(first, Update):
            dst = self.stacked(self.views.of(first.dst), blocks)
            out.append(dataclasses.replace(first, dst=dst, value=merged))
        else:
            name = self.fresh(first.dst.name + "_stack")
            self.made.add(name)
            out.append(Assign(Ref(name), merged, first.comment))
            self.shapes.shapes[name] = self.shapes.value(merged)
            width = self.width_of(positions[0])
            for k, p in enumerate(positions):
                member = stmts[p]
                view, self.views.slots[member.dst.name] = _block(name, (ETC,), k, width)
                out.append(Assign(member.dst, view, member.comment))
                self.bindings.add(out[-1])
        self.stmts = ([s for j, s in enumerate(stmts[:at]) if j not in positions] + out
                      + [s for j, s in enumerate(stmts[at + 1:], at + 1) if j not in positions])
        return True

    # -- K different values as the blocks of one new array --------------------------------------
    def produce_once(self) -> bool:
        """K statements that would stack if K values, each from its own statement, were the blocks
        of one array (one such value in each): write those values into the blocks of a new (B, K w)
        array, where two such groups of statements or more would stack (the writes into the new
        array cost about one of them)."""
        readers: dict[tuple, list] = {}
        for members in self.groups(wild=True):
            wilds = [w for _, w in members]
            if all(len(w) == 1 for w in wilds):
                readers.setdefault(tuple(w[0] for w in wilds), []).append(members[0][0])
        for names, groups in readers.items():
            width = self.width_of(groups[0])
            if len(groups) >= 2 and width is not None and self.make_stack(list(names), width):
                return True
        return False

    def width_of(self, i: int):
        return self.width_in(_value_of(self.stmts[i])[0])

    def width_in(self, value: Elementwise):
        """The width of the blocks an expression reads."""
        refs = dict(value.refs)
        for s in value.expr.free_symbols:
            slot = self.views.of(refs.get(s.name, Ref(s.name)))
            if slot is not None and slot.block is not None:
                return slot.width
        return None

    def make_stack(self, names: list[str], width: sympy.Expr) -> bool:
        if len(set(names)) != len(names) or any(n in self.views.slots for n in names):
            return False
        where: dict[str, int] = {}
        for j, s in enumerate(self.stmts):
            if names_written := s.writes & set(names):
                if not (isinstance(s, Assign) and isinstance(s.dst, Ref) and not s.dst.index) or set(where) & names_written:
                    return False
                where[s.dst.name] = j
        if len(where) != len(names):
            return False
        for n in names:
            shape = self.shapes.shapes.get(n)
            if shape is None or shape[0] != 2 or sympy.expand(shape[1] - width) != 0:
                return False  # not proved (B, w)
        first = min(where.values())
        if any(set(names) & self.stmts[j].reads for j in range(first)):
            return False  # read before it is computed (carried from the step before)
        blocks = len(names)
        stack = self.fresh(names[0] + "_stack")
        self.made.add(stack)
        at = {j: n for n, j in where.items()}
        out = []
        for j, s in enumerate(self.stmts):
            if j == first:
                out.append(Assign(Ref(stack), Call("empty", ((Text("B"), Size(sympy.expand(blocks * width))), Text("dtype")))))
            if j in at:
                part, self.views.slots[s.dst.name] = _block(stack, (ALL,), names.index(at[j]), width)
                out.append(Assign(part, s.value, s.comment))
                out.append(Assign(s.dst, part))
                self.bindings.add(out[-1])
            else:
                out.append(s)
        self.shapes.shapes[stack] = (2, sympy.expand(blocks * width))
        self.stmts = out
        return True

    # -- the operands of K different statements -------------------------------------------------
    def operands_once(self) -> bool:
        """K in-place calls (an op's first, ``out=``) whose operands are one expression on blocks
        0 .. K - 1 (the gates' pre-activations under sigmoid and tanh): that expression once on the
        stacked views, before the first of them, and each call reads its block of the result."""
        sites: dict = {}
        for i, s in enumerate(self.stmts):
            if isinstance(s, OpCall) and isinstance(s.a, Elementwise) and not s.a.expr.is_Symbol:
                got = self.abstract(s.a, wild=False)
                if got is not None:
                    expr, others, block, _ = got
                    sites.setdefault((sympy.srepr(expr), others), []).append((i, block))
        for members in sites.values():
            positions = _in_block_order([(block, i) for i, block in members])
            if positions is None:
                continue
            blocks, first = len(positions), min(positions)
            operands = [self.stmts[p].a for p in positions]
            if any(self.conflict(self.written(self.stmts[j]), self.regions(Assign(Ref("_"), a).reads))
                   for p, a in zip(positions, operands) for j in range(first, p)):
                continue  # an operand's values change before its call
            stacked = self.stacked_value(operands[0], blocks)
            width = self.width_in(operands[0])
            if stacked is None or width is None:
                continue
            name = self.fresh(self.stmts[positions[0]].out.name + "_pre_stack")
            self.shapes.shapes[name] = self.shapes.value(stacked)
            for k, p in enumerate(positions):
                self.stmts[p] = dataclasses.replace(self.stmts[p], a=_block(name, (ETC,), k, width)[0])
            users = ", ".join(self.stmts[p].out.name for p in positions)
            self.stmts.insert(first, Assign(Ref(name), stacked, f"the operands of {users}, stacked"))
            return True
        return False

    # -- a reduction of the sum of K blocks' terms ----------------------------------------------
    def reduce_once(self) -> bool:
        for j, s in enumerate(self.stmts):
            value = getattr(s, "value", None)
            if not isinstance(value, Elementwise):
                continue
            for name, ref in value.refs:
                if not (isinstance(ref, Helper) and ref.func in _UNIT_REDUCTIONS and len(ref.args) == 1 and not ref.kwargs
                        and isinstance(ref.args[0], Elementwise) and ref.args[0].expr.is_Add):
                    continue
                got = self.stacked_sum(ref.args[0])
                if got is None:
                    continue
                inner, blocks = got
                factor = blocks if _UNIT_REDUCTIONS[ref.func] is None else 1
                symbol = sympy.Symbol(name)
                expr = value.expr.xreplace({symbol: factor * symbol})
                refs = tuple((n, Helper(ref.func, (inner,)) if n == name else r) for n, r in value.refs)
                self.stmts[j] = dataclasses.replace(s, value=Elementwise(expr, refs))
                return True
        return False

    def stacked_sum(self, v: Elementwise):
        """(the stacked term, K) where ``v`` is the sum of K terms that are one term on blocks 0 .. K - 1."""
        pairs, keys = [], set()
        for term in v.expr.args:
            got = self.abstract(_part(v, term), wild=False)
            if got is None:
                return None
            expr, others, block, _ = got
            keys.add((sympy.srepr(expr), others))
            pairs.append((block, term))
        terms = _in_block_order(pairs)
        if len(keys) != 1 or terms is None:
            return None
        stacked = self.stacked_value(_part(v, terms[0]), len(terms))
        return (stacked, len(terms)) if stacked is not None else None


    # -- the sum of K blocks' reductions --------------------------------------------------------
    def block_reduction(self, s):
        """(helper, slot) where ``s`` is ``name = _mean_units(block)`` (or ``_sum_units``) of a
        stack's block, else None."""
        if not (isinstance(s, Assign) and isinstance(s.dst, Ref) and not s.dst.index and isinstance(s.value, Helper)
                and s.value.func in _UNIT_REDUCTIONS and len(s.value.args) == 1 and not s.value.kwargs):
            return None
        slot = self.views.of(_alias(s.value.args[0]))
        return (s.value.func, slot) if slot is not None and slot.block is not None else None

    def sums_once(self) -> bool:
        """K reductions over the units of blocks 0 .. K - 1 of a stack (``mean_rh_i = _mean_units(rh_i)``
        ...) that one statement reads, and nothing else, in one sum with the same coefficient
        (``mu_r = mean_rh_i/4 + ... + mean_rh_o/4``): one reduction of the stack instead (the K
        means' sum is K times the stacked mean, the K sums' the stacked sum)."""
        groups: dict = {}
        for i, s in enumerate(self.stmts):
            got = self.block_reduction(s)
            if got is not None:
                func, slot = got
                groups.setdefault((func, slot.stack), []).append((slot.block, i))
        for (func, _), members in groups.items():
            positions = _in_block_order(members)
            if positions is None:
                continue
            names = [self.stmts[p].dst.name for p in positions]
            readers = [j for j, s in enumerate(self.stmts) if s.reads & set(names)]
            if set(names) & self.outside or len(readers) != 1:
                continue
            j = readers[0]
            at = next((to for to in (min(positions), max(positions)) if self.movable(positions, to)), None)
            slot = self.views.of(_alias(self.stmts[positions[0]].value.args[0]))
            name = self.fresh(f"{func.strip('_').split('_')[0]}_{slot.base.removesuffix('_stack')}")
            factor = len(positions) if _UNIT_REDUCTIONS[func] is None else 1
            reader = None if at is None else _one_sum(self.stmts[j], names, sympy.Symbol(name), factor)
            if reader is None:
                continue
            value = Helper(func, (self.stacked(slot, len(positions)),))
            merged = Assign(Ref(name), value, self.stmts[positions[0]].comment)
            if _alias(reader.value) == Ref(name) and self.movable(positions, j - 1):
                reader, at = dataclasses.replace(reader, value=value), None  # the reader is that reduction
            else:
                self.shapes.shapes[name] = self.shapes.value(value)
            self.stmts[j] = reader
            self.stmts = [merged if k == at else s for k, s in enumerate(self.stmts) if k not in positions or k == at]
            return True
        return False


def _width(shapes: Shapes, v: Elementwise):
    shape = shapes.elementwise(v)
    return None if shape is None else shape[1]


def weighed(v, shapes: Shapes):
    """A sum over the rows of a product with a (B, 1) column w (``_sum_rows(a*b*rstd_r)``) as that
    sum weighted by w (``_sum_rows_by(a*b, rstd_r)``: a product with w); a sum or mean over the units
    of a product of two arrays of that width, or of a square (``_mean_units(d_tmp10*d_tmp12)``),
    with the two as its arguments (``_mean_units(d_tmp10, d_tmp12)``: np.vecdot, the product not
    formed); any other value as it is."""
    if not (isinstance(v, Helper) and len(v.args) == 1 and not v.kwargs and isinstance(v.args[0], Elementwise)):
        return v
    arg = v.args[0]
    expr, refs = arg.expr, dict(arg.refs)
    if v.func == _ROW_SUM and expr.is_Mul:
        for factor in sorted(expr.args, key=sympy.default_sort_key):
            rest = expr / factor
            if (factor.is_Symbol and shapes.operand(factor.name, refs) == (2, 1)
                    and rest.free_symbols and not shapes.width_one_expr(_part(arg, rest))):
                return Helper(WEIGHTED_ROWS, (_part(arg, rest), _part(arg, factor)))
    if v.func in _UNIT_REDUCTIONS and (expr.is_Mul or (expr.is_Pow and expr.exp == 2)):
        width = _width(shapes, arg)
        # (a square's base, or one factor, an array's name: a compound one would be computed twice, or as the product)
        pairs = ([(expr.base, expr.base)] if expr.is_Pow else
                 [(expr / f, f) for f in sorted(expr.args, key=sympy.default_sort_key)])
        for a, b in pairs:
            if not b.is_Symbol:
                continue
            if width is not None and width != 1 and _width(shapes, _part(arg, a)) == width == _width(shapes, _part(arg, b)):
                return Helper(v.func, (_part(arg, a), _part(arg, b)))
    return v


def _into(dst: Ref, value: Elementwise, comment: str):
    """``dst = value`` as its ufunc writing into ``dst`` where ``value`` is a sum or a product."""
    ufunc = {sympy.Add: "add", sympy.Mul: "multiply"}.get(type(value.expr))
    if ufunc is None or value.expr.atoms(Reduce):
        return Assign(dst, value, comment)
    first, rest = value.expr.args[0], value.expr.func(*value.expr.args[1:])
    return Do(Call(ufunc, (_part(value, first), _part(value, rest)), (("out", dst),)), dst, comment)


def _one_sum(stmt, names: list[str], merged: sympy.Symbol, factor: int):
    """``stmt`` (an assignment of an expression, or ``add(a, b, out=...)``) with the sum
    c (m_0 + ... + m_{K-1}) of the values named ``names`` replaced by c ``factor`` ``merged``;
    None where it does not read them only so (each once, linearly, with one coefficient)."""
    if isinstance(stmt, (Assign, Update)) and isinstance(stmt.value, Elementwise):
        parts = [stmt.value]
    elif (isinstance(stmt, Do) and isinstance(stmt.call, Call) and stmt.call.func == "add" and len(stmt.call.args) == 2
          and all(isinstance(a, Elementwise) for a in stmt.call.args)):
        parts = list(stmt.call.args)
    else:
        return None
    marks = [sympy.Dummy(n) for n in names]
    marked = []
    for part in parts:
        subs, refs = {}, []
        for sym_name, ref in part.refs:
            if isinstance(ref, Ref) and not ref.index and ref.name in names:
                subs[sympy.Symbol(sym_name)] = marks[names.index(ref.name)]
            else:
                refs.append((sym_name, ref))
        if any(s.name in names and s.name not in dict(part.refs) for s in part.expr.free_symbols):
            subs.update({s: marks[names.index(s.name)] for s in part.expr.free_symbols if s.name in names})
        marked.append((part.expr.xreplace(subs), refs))
    total = sympy.Add(*(e for e, _ in marked))
    coeffs = {sympy.diff(total, m) for m in marks}
    if len(coeffs) != 1 or not next(iter(coeffs)).is_Number or (total - next(iter(coeffs)) * sympy.Add(*marks)).has(*marks):
        return None
    new = [Elementwise(e.xreplace({marks[0]: factor * merged, **{m: 0 for m in marks[1:]}}),
                       tuple(sorted([*refs, *([(merged.name, Ref(merged.name))] if e.has(marks[0]) else [])])))
           for e, refs in marked]
    if len(new) == 1:
        return dataclasses.replace(stmt, value=new[0])
    kept = [v for v in new if v.expr != 0]
    if len(kept) == 2:
        return dataclasses.replace(stmt, call=dataclasses.replace(stmt.call, args=tuple(new)))
    out = stmt.out
    return Assign(Ref(out.name, out.index or (ETC,)), kept[0] if kept else Elementwise(sympy.Integer(0)), stmt.comment)


def _view_name(ref: Ref) -> str:
    """The symbol standing for a stacked view in an expression (printed through its ref)."""
    items = [f"{i.lo}:{i.hi}" if isinstance(i, Span) else str(i) for i in ref.index]
    return f"{ref.name}[{', '.join(items)}]"


def stack_blocks(stmts: list, views: Views, shapes: Shapes, fresh: Callable[[str], str], bindings: set,
                 outside: frozenset[str] = frozenset()) -> list:
    """``stmts`` (one section of a function: a loop's body, the statements before or after it)
    with the statements of a stack's blocks stacked (the module docstring); ``shapes`` must
    have scanned the sections before it; ``bindings`` gets the blocks' views it binds; ``outside``:
    the names something outside the section reads."""
    shapes.scan(stmts)
    return _Stacker(stmts, views, shapes, fresh, bindings, outside).run()


#: the sections of the module's forward function and of its backward function (RTRL's is a third,
#: which reads neither's names; backward reads forward's arrays by the cache's names)
#: (the sections of each in the order they run: forward_hold at the end of each step)
FORWARD_SECTIONS = ("setup", "stacks", "forward_pre", "forward_alloc", "forward_loop", "forward_hold", "forward_post")
BACKWARD_SECTIONS = ("backward_seed", "backward_carry", "backward_post", "backward_coefs", "backward_loop",
                     "backward_after", "backward_pre", "backward_weights")
_FUNCTIONS = (FORWARD_SECTIONS, ("setup", *BACKWARD_SECTIONS))


def table_reads(*tables) -> set[str]:
    """The names the values of (key, value) tables read (a module's outputs, final states, gradients)."""
    return set().union(*(Assign(Ref("_"), value).reads for table in tables for _, value in table))


def module_reads(m) -> set[str]:
    """The names the module ``m``'s outputs, final states, gradients and loss expressions read."""
    read = table_reads(m.outputs, m.finals, m.grads, m.rtrl_grads)
    for text in (value for value in vars(m).values() if isinstance(value, str)):
        read |= set(re.findall(r"[A-Za-z_]\w*", text))
    return read


def _read_outside(m, section: str) -> frozenset[str]:
    """The names that the rest of ``section``'s function reads: its other sections, and forward's
    cache and outputs, or backward's gradients."""
    forward, backward = _FUNCTIONS
    others = [n for n in (forward if section in forward else backward) if n != section]
    read = set().union(*(s.reads for n in others for s in getattr(m, n)))
    read |= table_reads(m.outputs, m.finals) | set(m.cache_names) if section in forward else table_reads(m.grads)
    return frozenset(read)


def stack_module(m, known: dict, vectors: frozenset[str], fresh: Callable[[str], str]) -> None:
    """Run the pass over the NumPy module ``m``'s forward and backward (symrnn.backends.numpy_backend's
    sections); ``known``: the parameters' (and their gradients') shapes, ``vectors``: the names of
    1-D ones.  A stack that forward made and backward reads through its cached views (a stacked
    product's) joins the cache; a block's view that nothing reads any more is not bound."""
    bindings: set = set()
    forward = [m.setup, m.stacks, m.forward_pre, m.forward_alloc, m.forward_loop, m.forward_post]
    views = Views(forward, vectors)
    shapes = Shapes(known, views)
    shapes.scan([*m.setup, *m.stacks])
    m.forward_pre = stack_blocks(m.forward_pre, views, shapes, fresh, bindings, _read_outside(m, "forward_pre"))
    shapes.scan(m.forward_alloc)
    m.forward_loop = stack_blocks(m.forward_loop, views, shapes, fresh, bindings, _read_outside(m, "forward_loop"))
    cached = set(m.cache_names)
    forward_stmts = [s for section in (m.setup, m.stacks, m.forward_pre, m.forward_alloc, m.forward_loop, m.forward_post)
                     for s in section]
    kept = [s for s in forward_stmts if isinstance(s, Assign) and isinstance(s.dst, Ref) and s.dst.name in cached]
    views = Views([m.setup, kept, *_backward(m)], vectors)
    shapes = Shapes(known, views)
    shapes.scan(forward_stmts)
    shapes.scan([*m.backward_seed, *m.backward_carry, *m.backward_post, *m.backward_coefs])
    m.backward_loop = stack_blocks(m.backward_loop, views, shapes, fresh, bindings, _read_outside(m, "backward_loop"))
    m.backward_pre = stack_blocks(m.backward_pre, views, shapes, fresh, bindings, _read_outside(m, "backward_pre"))
    backward = _backward(m)
    in_backward = set().union(*(s.writes for section in backward for s in section), (s.dst.name for s in m.setup))
    in_forward = set().union(*(s.writes for s in forward_stmts))
    read = set().union(*(s.reads for section in backward for s in section))
    m.cache_names = sorted(cached | ((read & in_forward) - in_backward))
    _unbind_unread(m, bindings)


def _backward(m) -> list[list]:
    """backward's sections, in the order the template lays them out."""
    return [m.backward_seed, m.backward_carry, m.backward_post, m.backward_coefs, m.backward_loop, m.backward_after,
            m.backward_pre]


def _unbind_unread(m, bindings: set) -> None:
    """Leave out the views of blocks (``bindings``) whose names nothing of the module reads: no
    statement, output, gradient, cache entry or loss expression."""
    sections = [name for name, value in vars(m).items() if isinstance(value, list) and all(hasattr(s, "reads") for s in value)]
    read = set(m.cache_names).union(*(s.reads for name in sections for s in getattr(m, name))) | module_reads(m)
    for name in sections:
        setattr(m, name, [s for s in getattr(m, name) if s not in bindings or s.dst.name in read])
