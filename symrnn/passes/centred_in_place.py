"""Centred in place (NumPy): an array read only centred, ``S - M``, is centred once where it is made.

A layer norm reads its input only centred: forward's ``(rh - mu_r)**2`` and the gates'
``gamma_r*rstd_r*(rh - mu_r)``, backward's ``rh - mu_r`` at every step, ``x_proj - mu_x`` over every
step after its loop; each is a pass over a (B, 4n) (or (T, B, 4n)) array.  Where an array S that
forward writes once (a stored product: ``np.dot(h_prev, R_T, out=h_prev_proj)``) is read, from the
first statement that reads it as ``S - M`` on (M a value of width 1 at the same step: a row's mean)
to the end of backward, only in that form, this pass writes ``S -= M`` before that statement and
reads S wherever ``S - M`` stood.  The values are those of ``S - M``, rounded once either way (a
product around it may come out in another order of its factors: SymPy orders them anew).

What it proves first, else it leaves the module as it is: S has one write (besides its allocation)
and M none after the centring; before the centring, S is read only at the step it is written (in a
loop, the next step's reads come before its centring); after it, every read of S (by any of its
names: views, a stacked view, the cache's names) is one ``S - M`` term pair of a sum, with M at the
same step; no output, gradient, RTRL statement or loss expression reads S; M is proved of width 1
(symrnn.passes.stack_blocks.Shapes), so ``S -= M`` broadcasts as ``S - M`` does.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import sympy

from ..stmt import ALL, ETC, Assign, Call, Do, Elementwise, Helper, OpCall, Ref, Update, refs_read, rewrite_stmt
from .stack_blocks import (_UNIT_REDUCTIONS, BACKWARD_SECTIONS, FORWARD_SECTIONS, Shapes, Views, _alias, module_reads,
                           weighed)

__all__ = ["centre_module"]

_ALLOCATIONS = frozenset({"empty", "zeros", "empty_like", "zeros_like"})


@dataclasses.dataclass(frozen=True)
class _Loc:
    """Where a name's values are: the root array and the item on its first axis (None: all of it)."""

    root: str
    step: object = None


def _binding(s) -> tuple[str, Ref] | None:
    """(name, ref) where ``s`` binds a name to (a part of) an array without a copy."""
    if not (isinstance(s, Assign) and isinstance(s.dst, Ref) and not s.dst.index):
        return None
    value = _alias(s.value)
    return (s.dst.name, value) if value is not None and not value.T else None


def _assigned(stmts: list) -> dict[str, set]:
    """Each name a statement of ``stmts`` binds -> what it is bound to: a ref (another name of an
    array, no copy) or None (an array of its own)."""
    bound: dict[str, set] = {}
    for s in stmts:
        for dst in (s.dst if isinstance(s.dst, tuple) else (s.dst,)) if isinstance(s, Assign) else ():
            if not dst.index:
                got = _binding(s)
                bound.setdefault(dst.name, set()).add(got[1] if got else None)
    return bound


class _Names:
    """What each name of one section is (a view of an array, or an array of its own), as the
    sections of its function bind it (a name bound to two different things is *ambiguous*: it
    may be any of them).  Backward's names are its own arrays, whatever forward called its arrays,
    except the cache's (``shared``), which are forward's (``forward``: forward's names)."""

    def __init__(self, module: dict[str, set], stmts: list, forward: "_Names | None" = None,
                 shared: frozenset[str] = frozenset()):
        self.forward, self.shared = forward, shared
        bound = dict(module)
        for name, values in _assigned(stmts).items():
            bound[name] = bound.get(name, set()) | values
        self.bound = bound
        self.ambiguous = {name for name, values in bound.items() if len(values) > 1}
        self.bindings = {name: next(iter(values)) for name, values in bound.items()
                         if len(values) == 1 and next(iter(values)) is not None}
        #: a name of this section that is another value negated (sympy.cse's ``d_tmp20 = -mu_x``) -> its ref
        self.negated: dict[str, Ref] = {}
        for s in stmts:
            if (isinstance(s, Assign) and isinstance(s.dst, Ref) and not s.dst.index and s.dst.name not in self.ambiguous
                    and isinstance(s.value, Elementwise) and s.value.expr.could_extract_minus_sign()
                    and (-s.value.expr).is_Symbol):
                name = (-s.value.expr).name
                self.negated[s.dst.name] = dict(s.value.refs).get(name, Ref(name))

    def _forwards(self, name: str) -> bool:
        """Whether ``name`` is forward's (backward reads it from the cache)."""
        return self.forward is not None and name not in self.bound and name in self.shared

    def _own(self, name: str) -> str:
        return name if self.forward is None else "\x04backward:" + name

    def loc(self, ref, seen=()) -> _Loc | None:
        """The location of ``ref`` (a computed value's: no array's); None where a name on the way
        is ambiguous."""
        if not isinstance(ref, Ref):
            return _Loc("")
        if self._forwards(ref.name):
            return self.forward.loc(ref)
        if ref.name in self.ambiguous or ref.name in seen:
            return None
        first = ref.index[0] if ref.index and ref.index[0] not in (ETC, ALL) else None
        if ref.name not in self.bindings:
            return _Loc(self._own(ref.name), first)
        inner = self.loc(self.bindings[ref.name], (*seen, ref.name))
        if inner is None:
            return None
        return inner if inner.step is not None or first is None else _Loc(inner.root, first)

    def root(self, name: str) -> str | None:
        loc = self.loc(Ref(name))
        return None if loc is None else loc.root

    def may_be(self, name: str, root: str, seen=()) -> bool:
        """Whether ``name`` may be (a part of) forward's array ``root``: is, or is bound to it in
        one of its bindings."""
        if self._forwards(name):
            return self.forward.may_be(name, root)
        if self._own(name) == root:
            return True
        if name in seen:
            return False
        return any(isinstance(v, Ref) and self.may_be(v.name, root, (*seen, name)) for v in self.bound.get(name, ()))


def _map_stmt(s, fn: Callable):
    """``s`` with ``fn`` applied to each elementwise expression it computes."""
    return rewrite_stmt(s, lambda v: fn(v) if isinstance(v, Elementwise) else v)


class _Candidate:
    """One array S and the value M it is read centred by."""

    def __init__(self, root: str, mean: str):
        self.root, self.mean = root, mean
        self.first = None  # (the M symbol's ref) at the first centred read

    def mark(self, names: _Names, v: Elementwise, marks: dict) -> Elementwise:
        """``v`` with each term pair ``s - m`` (s of S, m of M at s's step) of a sum replaced by a mark."""
        refs = dict(v.refs)

        def loc(sym):
            return names.loc(refs.get(sym.name, Ref(sym.name)))

        def minus(term):
            """(the ref of M that ``term`` is minus, its location), or None."""
            if term.is_Mul and len(term.args) == 2 and term.args[0] == -1 and term.args[1].is_Symbol:
                ref = refs.get(term.args[1].name, Ref(term.args[1].name))
            elif term.is_Symbol and term.name not in refs and term.name in names.negated:
                ref = names.negated[term.name]
            else:
                return None
            at = names.loc(ref)
            return (ref, at) if at is not None and at.root == self.mean else None

        def pairs(e):
            s_terms = [a for a in e.args if a.is_Symbol and (loc(a) or _Loc("")).root == self.root]
            m_terms = [(a, minus(a)) for a in e.args if minus(a) is not None]
            if len(s_terms) != 1 or len(m_terms) != 1 or loc(s_terms[0]).step != m_terms[0][1][1].step:
                return None
            return s_terms[0], m_terms[0][0], m_terms[0][1][0]

        def centred(e):
            s, m, ref = pairs(e)
            mark = sympy.Symbol(f"\x03centred{len(marks)}")
            marks[mark] = s
            if self.first is None:
                self.first = ref
            return sympy.Add(*(a for a in e.args if a not in (s, m)), mark)

        return Elementwise(v.expr.replace(lambda e: e.is_Add and pairs(e) is not None, centred), v.refs)

    def scan(self, names: _Names, s):
        """(the statement with its centred reads marked, the marks, whether it reads S otherwise);
        a binding (another name of an array) reads nothing."""
        if _binding(s) is not None:
            return s, {}, False
        marks: dict = {}
        marked = _map_stmt(s, lambda v: self.mark(names, v, marks))
        other = any(names.may_be(n, self.root) for n in marked.reads - {m.name for m in marks})
        return marked, marks, other

    @staticmethod
    def unmark(stmt, marks: dict):
        def fn(v):
            expr = v.expr.xreplace(marks)
            free = {s.name for s in expr.free_symbols}
            return Elementwise(expr, tuple((n, r) for n, r in v.refs if n in free))
        return _map_stmt(stmt, fn)


def _sections(m) -> list[str]:
    return [name for name, value in vars(m).items() if isinstance(value, list) and value
            and all(hasattr(s, "reads") for s in value)]


_FORWARD, _BACKWARD = FORWARD_SECTIONS, BACKWARD_SECTIONS


def centre_module(m, known: dict, vectors: frozenset[str]) -> None:
    """Run the pass over the NumPy module ``m`` (symrnn.backends.numpy_backend's sections);
    ``known``: the parameters' (and their gradients') shapes, ``vectors``: the names of 1-D ones.
    RTRL's sections are a function of their own, which reads none of forward's arrays."""
    forward = [m.setup, m.stacks, m.forward_pre, m.forward_alloc, m.forward_loop, m.forward_post]
    shapes = Shapes(known, Views(forward, vectors))
    shapes.scan([s for section in forward for s in section])
    assigned = _assigned([s for section in forward for s in section])
    reduced = {s.dst.name for section in forward for s in section  # one value a row (of whatever rank)
               if isinstance(s, Assign) and isinstance(s.dst, Ref) and not s.dst.index and isinstance(s.value, Helper)
               and s.value.func in _UNIT_REDUCTIONS and len(assigned[s.dst.name]) == 1}
    widths = (shapes, frozenset(reduced))
    sections = _sections(m)
    if any(n not in _FORWARD + _BACKWARD and not n.startswith("rtrl_") for n in sections):
        return  # a section this pass does not know
    order = [n for n in _FORWARD + _BACKWARD if n in sections]
    for candidate in _candidates(m, _names(m, order)):
        got = _centred(m, _names(m, order), candidate, order, widths)
        for section, stmts in (got or {}).items():
            setattr(m, section, stmts)


def _names(m, order: list[str]) -> dict[str, _Names]:
    """Each section's names: forward's as forward binds them; backward's as backward does, the
    cache's as forward does (backward reads forward's arrays by the names it caches them under)."""
    def merged(sections) -> dict[str, set]:
        out: dict[str, set] = {}
        for section in sections:
            for name, values in _assigned(getattr(m, section)).items():
                out.setdefault(name, set()).update(values)
        return out

    forward = merged(n for n in order if n in _FORWARD)
    backward = merged(["setup", *(n for n in order if n in _BACKWARD)])
    whole = _Names(forward, [])
    shared = frozenset(m.cache_names)
    return {n: _Names(forward, getattr(m, n)) if n in _FORWARD else _Names(backward, getattr(m, n), whole, shared)
            for n in order}


def _candidates(m, names: dict) -> list[_Candidate]:
    """(S, M) for each array written by a stored product's GEMM or an assignment in forward's
    loop or before it, and each M some statement subtracts from it."""
    found = []
    for section in ("forward_pre", "forward_loop"):
        if section not in names:
            continue
        n = names[section]
        for s in getattr(m, section):
            for v in _elementwise(s):
                refs = dict(v.refs)
                for e in sympy.preorder_traversal(v.expr):
                    if not e.is_Add:
                        continue
                    roots = {a: n.root(refs.get(a.name, Ref(a.name)).name) for a in e.args if a.is_Symbol}
                    means = [a.args[1] for a in e.args if a.is_Mul and a.args[0] == -1 and len(a.args) == 2
                             and a.args[1].is_Symbol]
                    for root in roots.values():
                        for mean in means:
                            mroot = n.root(refs.get(mean.name, Ref(mean.name)).name)
                            key = (root, mroot)
                            if root and mroot and key not in {(c.root, c.mean) for c in found}:
                                found.append(_Candidate(root, mroot))
    return found


def _elementwise(s):
    out = []
    _map_stmt(s, lambda v: out.append(v) or v)
    return out


def _centred(m, names: dict, c: _Candidate, order: list[str], widths) -> dict | None:
    """The rewritten sections for candidate ``c``, or None where it is not proved."""
    writes = [(sec, i) for sec in order for i, s in enumerate(getattr(m, sec))
              if any(names[sec].root(w) == c.root for w in s.writes) and _binding(s) is None
              and not (isinstance(s, Assign) and isinstance(s.value, Call) and s.value.func in _ALLOCATIONS)]
    if len(writes) != 1 or writes[0][0] not in ("forward_pre", "forward_loop"):
        return None
    home, at = writes[0]
    home_stmts = getattr(m, home)
    written = home_stmts[at]
    dst = written.out if isinstance(written, (Do, OpCall)) else written.dst
    if not isinstance(dst, Ref) or names[home].loc(dst) is None:
        return None
    step = names[home].loc(dst).step
    if home == "forward_loop" and step not in (sympy.Symbol("t"), None):
        return None  # (None: an array of the step's own)
    new: dict[str, list] = {}
    started = False
    for sec in order:
        stmts = getattr(m, sec)
        n = names[sec]
        out = []
        for i, s in enumerate(stmts):
            if sec == home and i == at:
                out.append(s)
                continue
            c.first = None
            marked, marks, other = c.scan(n, s)
            mean_written = any(n.root(w) == c.mean for w in s.writes) and _binding(s) is None
            if not started:
                if marks and sec == home and i > at and not other:
                    first = c.first
                    if not _width_one(*widths, first):
                        return None
                    out.append(Update(dst, "-", first))
                    started = True
                elif marks or (other and not (sec == home and i > at and _same_step(n, s, c, step))):
                    return None
            elif other or mean_written:
                return None
            # (a sum over the units of what is now a product of arrays: without forming it)
            out.append(rewrite_stmt(c.unmark(marked, marks), lambda v: weighed(v, widths[0])) if marks else s)
        new[sec] = out
    if not started or _read_elsewhere(m, names, c, order):
        return None
    return {sec: stmts for sec, stmts in new.items() if stmts != getattr(m, sec)}


def _same_step(names: _Names, s, c: _Candidate, step) -> bool:
    """Whether every ref of S that ``s`` reads is at ``step`` (a statement before the centring in forward's loop)."""
    for ref in refs_read(s):
        loc = names.loc(ref)
        if loc is None or (loc.root == c.root and loc.step != step):
            return False
    return True


def _width_one(shapes, reduced: frozenset[str], first: Ref) -> bool:
    """Whether ``first`` is proved of width 1: its shape's last axis, or a reduction over the units
    (``reduced``: the names bound once, to one)."""
    shape = shapes.value(first)
    if shape is not None:
        return shape[1] == 1
    return not first.index and first.name in reduced


def _read_elsewhere(m, names: dict, c: _Candidate, order: list[str]) -> bool:
    """Whether an output, final state, gradient or loss expression reads S."""
    read = module_reads(m)
    return any(names[n].may_be(name, c.root) for n in (order[0], order[-1]) for name in read)
