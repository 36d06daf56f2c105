"""``symrnn verify``: check the claims of a hand derivation against the derived gradients.

For every claim of a claims file (:mod:`symrnn.claims`, ``docs/claims-format.md``):

1. **the truth.**  On a few seeded random instances (small sizes, a few steps, one
   sequence), every per-step quantity a claim can name is computed from the derivation
   objects: values from the step graph, adjoints from :meth:`Derivation.adjoint_terms`,
   sensitivities from the local partials and the matrix rules.  Before any claim is judged,
   these are checked against the generated NumPy module of the cell (its forward, its
   BPTT gradients and its RTRL gradients, themselves tested against finite differences):
   a disagreement is an internal error, never a verdict.
2. **the derived formula** of the claim's left side is written in the claims language
   (by the chain rule on the cell's equations) and itself checked against the truth.
3. **symbolic**: both sides are rewritten to one normal form (current values, derivatives and
   adjoints replaced by their definitions, σ' written through σ) and the difference
   expanded; 0 decides the claim correct, symbolically.
4. **numeric**: otherwise both sides are evaluated at every step of every instance; the
   claim is correct if they agree to rounding, else wrong, with a witness: the first step
   at which they differ, the entry, both values.  The terms that differ are found by
   matching the terms of both sides, expanded, by value.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import sympy

from .claims import TIME, Claim, ClaimsFile, Entry, Prime, Q, claim_text
from .errors import InternalError
from .ops import OPS

from .chainrule import Deriver
from .truth import Evaluator, Instance, ShapeMismatch, _T, _align

__all__ = ["Verdict", "Report", "verify", "verify_file", "claim_text", "format_report", "markdown_report", "markdown_page"]

#: relative agreement that counts as equal (float64 evaluation of two formulas)
RTOL = 1e-9



# -- verdicts ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Witness:
    instance: int  # the seed
    step: int | None  # in the claims file's numbering; None: a whole-sequence quantity
    entry: str
    claimed: float
    derived: float

    @property
    def difference(self) -> float:
        return abs(self.claimed - self.derived)


@dataclass(frozen=True)
class Verdict:
    claim: Claim
    correct: bool
    method: str  # "symbolic" or "numeric"
    derived: str = ""  # the derived formula (claims language), "" if none is written
    reason: str = ""  # why a claim is wrong without a witness (sizes that do not fit)
    witness: Witness | None = None
    only_claim: tuple[str, ...] = ()  # terms of the claim the derivation does not have
    only_derived: tuple[str, ...] = ()  # terms of the derivation the claim does not have


@dataclass(frozen=True)
class SizeVerdict:
    claim: object
    correct: bool
    derived: str


@dataclass(frozen=True)
class Report:
    file: ClaimsFile
    verdicts: tuple[Verdict, ...]
    sizes: tuple[SizeVerdict, ...]
    instances: str

    @property
    def wrong(self) -> int:
        return sum(not v.correct for v in self.verdicts) + sum(not s.correct for s in self.sizes)


def verify_file(path) -> Report:
    from .claims import load_claims

    return verify(load_claims(path))


def verify(claims: ClaimsFile) -> Report:
    from .pipeline import build, load_module, module_name, render_numpy

    plan = build(claims.cell)
    module = load_module(render_numpy(plan), module_name(plan.graph.cell))
    instances = [Instance(plan, module, seed, claims.steps, claims.zero_states) for seed in claims.seeds]
    deriver = Deriver(plan.graph, plan.derivation)
    checker = _Checker(claims, plan, instances, deriver)
    verdicts = tuple(checker.check(c) for c in claims.claims)
    sizes = tuple(_size_verdict(s, plan.graph) for s in claims.sizes)
    inst = instances[0]
    described = (f"{len(instances)} random instance(s) (seeds {', '.join(map(str, claims.seeds))}) of {claims.steps} steps, "
                 + ", ".join(f"{k} = {v}" for k, v in inst.sizes.items())
                 + (", initial states 0" if claims.zero_states else ", random initial states"))
    return Report(claims, verdicts, sizes, described)


def _size_verdict(s, g) -> SizeVerdict:
    true = g.size(s.name)
    return SizeVerdict(s, sympy.expand(true - s.size) == 0, sympy.sstr(true))


class _Checker:
    def __init__(self, claims: ClaimsFile, plan, instances: list[Instance], deriver: Deriver):
        self.claims, self.plan, self.instances, self.deriver = claims, plan, instances, deriver
        self.g = plan.graph
        self.printer = dict(names=_names_of(claims), first_step=claims.first_step, states=self.g.state_names)

    def text(self, e) -> str:
        return claim_text(e, **self.printer)

    def times(self, scope: str) -> list[int | None]:
        T = self.claims.steps
        return {"steps": list(range(T)), "first": [0], "last": [T - 1], "initial": [-1], "total": [None]}[scope]

    def specialize(self, e: sympy.Expr, now) -> sympy.Expr:
        """``e`` at the step ``now`` (a scope's fixed step, or TIME), with what is known to be 0
        replaced by 0: sensitivities before the first step, initial states where the file says
        so, every value and adjoint beyond the last step."""
        if now != TIME:
            e = e.xreplace({TIME: now}) if e.has(TIME) else e
        T, g = self.claims.steps, self.g
        zeros = {}
        for a in e.atoms(Q):
            if a.time.has(TIME) or a.kind in ("grad", "loss", "steps"):
                continue
            k = int(a.time)
            if k >= T or (k < 0 and a.kind in ("sens", "lsens", "lossp", "losst", "pre", "preadj")):
                zeros[a] = sympy.Integer(0)
            elif k < 0 and a.kind == "val" and (k < -1 or a.qname not in g.state_names or self.claims.zero_states):
                zeros[a] = sympy.Integer(0)
            elif k < 0 and a.kind == "adj" and (k < -1 or a.qname not in g.state_names):
                zeros[a] = sympy.Integer(0)
        return e.xreplace(zeros) if zeros else e

    def derived_expr(self, claim: Claim):
        try:
            d = self.deriver.derived(claim.lhs, self.plan.derivation)
        except InternalError:
            return None
        if claim.scope == "initial" and d is not None:  # before the first step: states are data
            core = claim.lhs.args[0] if isinstance(claim.lhs, Entry) else claim.lhs
            if core.kind in ("val", "sens"):
                return None
        return d

    def evaluate(self, expr, inst: Instance, times, ranges) -> list:
        ev = Evaluator(inst, ranges)
        return [ev.ev(expr, t) for t in times]

    def ranges(self, claim: Claim, inst: Instance) -> dict[str, int]:
        ev = Evaluator(inst)
        ev.dry = True
        t0 = self.times(claim.scope)[0]
        ev.ev(claim.lhs, t0)
        ev.ev(claim.rhs, t0)
        return ev.ranges

    def check(self, claim: Claim) -> Verdict:
        times = self.times(claim.scope)
        derived = self.derived_expr(claim)
        derived_text = self.text(derived) if derived is not None else ""
        try:
            ranges = self.ranges(claim, self.instances[0])
        except ShapeMismatch as exc:
            return Verdict(claim, False, "numeric", derived_text, reason=str(exc))
        # the derived formula agrees with the truth (a check of the deriver, not of the claim)
        if derived is not None:
            for inst in self.instances:
                try:
                    lhs = self.evaluate(claim.lhs, inst, times, ranges)
                    d = [_summed(claim.lhs, l, r) for l, r in zip(lhs, self.evaluate(derived, inst, times, ranges))]
                    bad = _first_difference(lhs, d)
                except ShapeMismatch:
                    bad = True
                if bad:
                    derived, derived_text = None, ""
                    break
        now = {"first": sympy.Integer(0), "last": sympy.Integer(self.claims.steps - 1),
               "initial": sympy.Integer(-1)}.get(claim.scope, TIME)
        rhs_s = self.specialize(claim.rhs, now)
        if derived is not None:
            derived = self.specialize(derived, now)
            derived_text = self.text(derived)
        method = "symbolic" if derived is not None and _symbolic_equal(rhs_s, derived, self.deriver, now) else "numeric"
        witness, reason = None, ""
        for inst in self.instances:
            try:
                lhs = self.evaluate(claim.lhs, inst, times, ranges)
                rhs = [_summed(claim.lhs, l, r) for l, r in
                       zip(lhs, self.evaluate(claim.rhs, inst, times, ranges))]
                for l, r in zip(lhs, rhs):
                    _fits(l, r)
            except ShapeMismatch as exc:
                reason = str(exc)
                break
            found = _first_difference(lhs, rhs)
            if found:
                k, entry, cl, de = found
                t = times[k]
                witness = Witness(inst.seed, None if t is None else t + self.claims.first_step, entry, cl, de)
                break
        correct = witness is None and not reason
        if correct:
            return Verdict(claim, True, method, derived_text)
        if method == "symbolic":
            raise InternalError("a claim is symbolically equal to the derived formula but differs numerically")
        only_c, only_d = ((), ())
        if derived is not None:
            only_c, only_d = self.differing_terms(claim, derived, times, ranges)
        return Verdict(claim, False, "numeric", derived_text, reason, witness, only_c, only_d)

    def differing_terms(self, claim: Claim, derived, times, ranges) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """The terms of each side that match no term of the other, by value: sums are split into
        terms; where one term is left on each side and both are products, common factors
        (equal by value) are cancelled and what is left is compared again."""
        inst = self.instances[0]

        def values(e):
            try:
                return self.evaluate(e, inst, times, ranges)
            except ShapeMismatch:
                return None

        def same(a, b) -> bool:
            va, vb = values(a), values(b)
            if va is None or vb is None:
                return False
            try:
                return not _first_difference(va, vb)
            except ShapeMismatch:
                return False

        def unmatched(xs, ys):
            used, left = set(), []
            for x in xs:
                k = next((k for k, y in enumerate(ys) if k not in used and same(x, y)), None)
                if k is None:
                    left.append(x)
                else:
                    used.add(k)
            return left, [y for k, y in enumerate(ys) if k not in used]

        def diff(c, d, depth=0):
            cs, ds = list(sympy.Add.make_args(c)), list(sympy.Add.make_args(d))
            if len(cs) > 30 or len(ds) > 30:
                return [c], [d]
            lc, ld = unmatched(cs, ds)
            if depth < 4 and len(lc) == 1 and len(ld) == 1 and isinstance(lc[0], sympy.Mul) and isinstance(ld[0], sympy.Mul):
                fc, fd = unmatched(list(lc[0].args), list(ld[0].args))
                if len(fc) == 1 and len(fd) == 1 and (len(fc) < len(lc[0].args)):
                    return diff(fc[0], fd[0], depth + 1)
            if depth < 4 and (len(lc) > 1 or len(ld) > 1) and (lc or ld):
                ec, ed = sympy.expand(sympy.Add(*lc)), sympy.expand(sympy.Add(*ld))
                xc, xd = unmatched(list(sympy.Add.make_args(ec)), list(sympy.Add.make_args(ed)))
                if len(xc) + len(xd) < len(lc) + len(ld):
                    return xc, xd
            return lc, ld

        try:
            c = _normal(self.specialize(claim.rhs, TIME), self.deriver, deep=False)
            only_c, only_d = diff(c, _normal(derived, self.deriver, deep=False))
        except Exception:  # noqa: BLE001 - the terms are a convenience of the report
            return (), ()
        return tuple(self.text(e) for e in only_c), tuple(self.text(e) for e in only_d)


def _names_of(claims: ClaimsFile) -> dict[str, str]:
    return dict(claims.aliases)


def _summed(lhs: sympy.Expr, l: _T, r: _T) -> _T:
    """The right side of a claim about the loss (L, L_t, dL_t/d or dL/d a scalar parameter),
    summed over units where it is a vector: the loss is a sum over units."""
    if isinstance(lhs, Q) and lhs.kind in ("loss", "losst", "lsens", "grad") and "_" in r.axes and "_" not in l.axes:
        k = r.axes.index("_")
        return _T(r.a.sum(axis=k), r.axes[:k] + r.axes[k + 1:])
    return r


def _fits(l: _T, r: _T) -> None:
    extra = [a for a in r.axes if a not in l.axes]
    if extra:
        what = "a vector" if extra[0] == "_" else ("a matrix" if extra[0] == "~" else f"index {extra[0]}")
        raise ShapeMismatch(f"the right side is {what} where the left side is not")
    _align(l, r)


def _first_difference(lhs: list, rhs: list, broadcast: bool = False):
    """(k, entry, claimed, derived) of the first position k where two lists of tensors differ."""
    pairs = []
    scale = 0.0
    for l, r in zip(lhs, rhs):
        a, b, axes = _align(l, r)
        a, b = np.broadcast_arrays(a, b)
        pairs.append((a, b, axes))
        finite = np.concatenate([np.abs(a[np.isfinite(a)]).ravel(), np.abs(b[np.isfinite(b)]).ravel(), [0.0]])
        scale = max(scale, float(finite.max()))
    tol = RTOL * max(scale, 1.0)
    for k, (a, b, axes) in enumerate(pairs):
        with np.errstate(invalid="ignore"):
            diff = np.abs(a - b)
        bad = ~(diff <= tol)
        if bad.any():
            where = np.unravel_index(int(np.argmax(np.where(np.isnan(diff), np.inf, diff))), diff.shape) if diff.ndim else ()
            entry = ", ".join(f"{('unit' if ax == '_' else 'column' if ax == '~' else ax)} {i}" for ax, i in zip(axes, where))
            return k, entry, float(b[where] if b.ndim else b), float(a[where] if a.ndim else a)
    return None


# -- the symbolic decision -----------------------------------------------------------------------
#: the most nodes (sympy.preorder_traversal) a normal form may grow to; beyond it (a layer-norm
#: LSTM's adjoints written out through every value of the step: ~60000) expanding it would take
#: minutes, and the numbers decide
NORMAL_LIMIT = 5000


class _TooLarge(Exception):
    """A normal form grew beyond NORMAL_LIMIT nodes."""


def _nodes(e: sympy.Expr) -> int:
    return sum(1 for _ in sympy.preorder_traversal(e))


def _normal(e: sympy.Expr, deriver: Deriver, deep: bool = True, now=TIME) -> sympy.Expr:
    """``e`` with σ'(a) written through σ and (deep) the current step's values, sensitivities and
    adjoints replaced by their derived definitions, until only earlier/later ones remain
    (_TooLarge once it has more than NORMAL_LIMIT nodes)."""

    def prime(x):
        if isinstance(x, Prime):
            op = OPS[x.args[0].name]
            return op.derivative(op(x.args[1]), x.args[1])
        return x

    e = e.replace(lambda x: isinstance(x, Prime), prime)
    if not deep:
        return e
    for _ in range(60):
        atoms = [a for a in e.atoms(Q) if a.time.has(TIME) == now.has(TIME) and (a.time == now or a.kind == "lossp")
                 and a.kind in ("val", "sens", "adj", "preadj", "pre", "lossp")]
        table = {}
        for a in atoms:
            d = deriver.derived_core(a, None)
            if d is not None and d != a:
                table[a] = d
        if not table:
            return e
        e = e.xreplace(table)
        if _nodes(e) > NORMAL_LIMIT:
            raise _TooLarge
    return e


def _symbolic_equal(claim: sympy.Expr, derived: sympy.Expr, deriver: Deriver, now=TIME) -> bool:
    try:
        diff = _normal(claim, deriver, now=now) - _normal(derived, deriver, now=now)
        return sympy.expand(diff) == 0
    except Exception:  # noqa: BLE001 - undecided symbolically: the numbers decide
        return False


# -- reports --------------------------------------------------------------------------------------
def _line(v: Verdict, path: str) -> str:
    c = v.claim
    where = f"{path}:{c.line}" if c.line else path
    return f"[{c.scope}] {c.key} = {c.text}   ({where})"


def _num_text(x: float) -> str:
    return f"{x:.6g}"


def format_report(report: Report) -> str:
    f = report.file
    cell = f.cell.name
    total = len(report.verdicts) + len(report.sizes)
    lines = [f"{f.path}: cell '{cell}'" + (f" ({f.source})" if f.source else "")
             + f": {total} claim(s), {total - report.wrong} correct, {report.wrong} wrong",
             f"  checked on {report.instances}"]
    for v in report.verdicts:
        c = v.claim
        status = "ok   " if v.correct else "WRONG"
        how = v.method if v.correct else ""
        lines.append(f"  {status} {_line(v, f.path)}" + (f"   [{how}]" if how else ""))
        if v.correct:
            continue
        if v.derived:
            lines.append(f"        derived: {c.key} = {v.derived}")
        if v.only_claim or v.only_derived:
            if v.only_claim:
                lines.append(f"        in the claim, not derived: {'; '.join(v.only_claim)}")
            if v.only_derived:
                lines.append(f"        derived, not in the claim: {'; '.join(v.only_derived)}")
        if v.reason:
            lines.append(f"        {v.reason}")
        if v.witness:
            w = v.witness
            at = f"step t = {w.step}" if w.step is not None else "the whole sequence"
            lines.append(f"        witness: {at} (seed {w.instance}{', ' + w.entry if w.entry else ''}): claimed "
                         f"{_num_text(w.claimed)}, derived {_num_text(w.derived)} (difference {_num_text(w.difference)})")
        if c.note:
            lines.append(f"        note: {c.note}")
    for s in report.sizes:
        status = "ok   " if s.correct else "WRONG"
        lines.append(f"  {status} [sizes] {s.claim.name} = {s.claim.text}"
                     + ("" if s.correct else f"   derived: {s.derived}"))
    return "\n".join(lines)


def markdown_report(report: Report) -> str:
    """The report as a Markdown section (every text from the file through md_text)."""
    from .escape import md_text

    f = report.file

    def code(text: str) -> str:
        return md_text(text)

    out = [f"### {md_text(f.source or f.cell.name)}: cell `{f.cell.name}`", "",
           f"Claims file `{md_text(f.path)}`; checked on {md_text(report.instances)}.", "",
           "| | claim | derived | decided |", "| --- | --- | --- | --- |"]
    for v in report.verdicts:
        c = v.claim
        mark = "correct" if v.correct else "**wrong**"
        detail = v.method
        if not v.correct:
            bits = []
            if v.only_claim:
                bits.append("claim has " + "; ".join(code(t) for t in v.only_claim))
            if v.only_derived:
                bits.append("derivation has " + "; ".join(code(t) for t in v.only_derived))
            if v.reason:
                bits.append(code(v.reason))
            if v.witness:
                w = v.witness
                at = f"t = {w.step}" if w.step is not None else "the sequence"
                bits.append(f"witness {at}: {_num_text(w.claimed)} claimed, {_num_text(w.derived)} derived")
            detail = "; ".join(bits)
        derived = code(v.derived) if v.derived and not v.correct else ("(as claimed)" if v.correct else "")
        note = f" ({code(c.note)})" if c.note else ""
        out.append(f"| {mark} | \\[{c.scope}\\] {code(c.key)} = {code(c.text)}{note} | {derived} | {detail} |")
    for s in report.sizes:
        mark = "correct" if s.correct else "**wrong**"
        out.append(f"| {mark} | size of {code(s.claim.name)} = {code(s.claim.text)} | {code(s.derived)} | symbolic |")
    out.append("")
    return "\n".join(out)


def markdown_page(reports: list[Report], command: str) -> str:
    """Several reports as one Markdown page (``docs/seeds.md`` is this page for the claims
    files of the seeds), with a table of the claims found wrong first."""
    from .escape import html_comment, md_text

    out = [f"<!-- Generated by symrnn. Do not edit. Regenerate with: {html_comment(command)} -->",
           "# Hand derivations, checked", "",
           "Each section is one claims file (`docs/claims-format.md`): a hand derivation transcribed claim by "
           "claim, each claim checked by `symrnn verify` against the derivation symrnn makes (symbolically where "
           "the two normal forms agree, else numerically on random instances, with the first step at which they "
           "differ). A wrong claim is shown with the derived formula beside it.", "",
           "## Where the hand derivations are wrong", "",
           "| source | claim (as written) | derived | first difference |", "| --- | --- | --- | --- |"]
    for r in reports:
        src = md_text(r.file.source or r.file.cell.name)
        for v in r.verdicts:
            if v.correct:
                continue
            at = (f"step t = {v.witness.step}" if v.witness and v.witness.step is not None else
                  ("the sequence" if v.witness else md_text(v.reason)))
            note = f" ({md_text(v.claim.note)})" if v.claim.note else ""
            out.append(f"| {src} | {md_text(v.claim.key)} = {md_text(v.claim.text)}{note} | "
                       f"{md_text(v.derived) or '(see the report)'} | {at} |")
        for sv in r.sizes:
            if not sv.correct:
                note = f" ({md_text(sv.claim.note)})" if sv.claim.note else ""
                out.append(f"| {src} | size of {md_text(sv.claim.name)} = {md_text(sv.claim.text)}{note} | "
                           f"{md_text(sv.derived)} | (a size) |")
    out += ["", "## The claims, one file at a time", ""]
    for r in reports:
        out.append(markdown_report(r))
    return "\n".join(out).rstrip("\n") + "\n"
