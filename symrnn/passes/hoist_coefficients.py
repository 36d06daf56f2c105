"""Coefficient hoisting (NumPy's backward loop): leave in the loop only what depends on
the incoming adjoints.

Every adjoint statement is linear in the adjoints, with coefficients that are
functions of stored forward values only.  An adjoint used once (or one adjoint times
a coefficient) is substituted into its user; then each statement is split into
sum_j d_j * k_j, and a coefficient k_j that is more than a number or one stored value
becomes a buffer computed for a block of steps at once, before the loop runs over that
block (``backward_coefs``), its common subexpressions shared (sympy.cse).  Switched off
(the ``hoist_coefficients`` pass), the loop computes every statement as derived.

A block is ``_COEF_STEPS`` steps (:func:`block_steps`): 16, or fewer where a cell has many
coefficients, so that a block's buffers stay in the CPU's caches while the loop reads
them (layer_norm_lstm's 66 buffers of (16, 32, 256) float32 are 34 MiB: its backward
took ~10% longer with 16 steps than with 2 to 4; benchmarks/RESULTS.md, layer-norm section).
Where a block would be shorter than ``MIN_BLOCK_STEPS`` (more than 32 buffers) the pass does not
pay and the module is emitted without it (:func:`pays`): layer_norm_lstm's 66 buffers in blocks of
3 steps took 1.05x (float32) and 1.08x (float64) the time of its module without hoisting
(benchmarks/layer_norm_cpu.py, 2026-12-02); the cells with 5 to 16 buffers gain from it.  Between
16 and 66 buffers the threshold is not measured more finely.
"""

from __future__ import annotations

import sympy

from ..errors import InternalError
from ..plan import Stage
from ..stmt import Assign, Ref, t0_SYM, t_SYM

__all__ = ["CoefficientHoisting", "MIN_BLOCK_STEPS", "block_steps"]

#: steps per block at most
MAX_BLOCK_STEPS = 16
#: coefficient buffers times steps per block at most (a cell with up to 16 buffers gets 16 steps)
BLOCK_BUFFER_STEPS = 256
#: steps per block at least, for the pass to pay
MIN_BLOCK_STEPS = 8


def block_steps(buffers: int) -> int:
    """The steps of a block of the backward recursion whose coefficients are ``buffers`` arrays."""
    return min(MAX_BLOCK_STEPS, max(1, BLOCK_BUFFER_STEPS // max(buffers, 1)))


class CoefficientHoisting:
    """The coefficients of one backward's recursion (``b``: its backends/numpy_backward.Backward)."""

    def __init__(self, backward):
        self.b = backward
        self.coefs: dict[sympy.Expr, str] = {}  # coefficient of the adjoint recursion -> its buffer
        self.definitions: dict[str, sympy.Expr] = {}  # ... and back
        self.coef_refs: dict[str, Ref] = {}  # coefficient buffer -> its value at step t
        self.block_coefs: list[tuple[str, sympy.Expr]] = []  # (buffer, coefficient) computed per block of steps

    def one_term(self, expr: sympy.Expr) -> bool:
        """One adjoint times a coefficient: substituting it into several users adds no work."""
        return len([s for s in expr.free_symbols if self.b.is_adjoint(s)]) == 1 and not expr.is_Add

    def linearize(self, pending: list, stage: Stage) -> list:
        """Leave in the loop only what depends on the incoming adjoints.

        Every adjoint statement is linear in adjoints, with coefficients that
        are functions of stored forward values only.  First, an adjoint used
        once (or defined as one adjoint times a coefficient) is substituted
        into its user, so chains such as d_tanh_c = d_h o, d_c += d_tanh_c (1 -
        tanh_c^2) collapse into one product.  Then each statement is split into
        sum_j d_j * k_j; a coefficient k_j that is more than a number or one
        stored value becomes a buffer computed for a block of steps at once,
        before the loop runs over that block (``backward_coefs``)."""
        keep = {self.b.n("adj", mv.name) for mv in stage.matvecs}  # written to the GEMM's adjoint buffer
        keep |= {self.b.n("adj", r.name) for r in stage.reductions}  # summed over units (reduction_backward)
        keep |= {self.b.sym(ref).name for refs in self.b.acc.values() for ref in refs}
        keep |= set(self.b.alias) | set(self.b.alias.values())
        keep |= {p.dst.name for p in pending if p.units}  # means over the units (compact_unit_adjoints)
        uses: dict[str, int] = {}
        for p in pending:
            for name in ([s.name for s in p.expr.free_symbols] if p.expr is not None else [p.alias]):
                uses[name] = uses.get(name, 0) + 1
        inlined: dict[sympy.Symbol, sympy.Expr] = {}
        kept = []
        for p in pending:
            if p.expr is not None:
                p = p.with_expr(p.expr.xreplace(inlined))
            name = self.b.assigned(p)
            if name and p.expr is not None and name not in keep and (uses.get(name, 0) <= 1 or self.one_term(p.expr)):
                inlined[sympy.Symbol(name)] = p.expr
                continue
            kept.append(p)
        return [p.with_expr(self.split(p)) if p.expr is not None else p for p in kept]

    def split(self, p) -> sympy.Expr:
        """``expr`` = sum_j d_j * k_j with each non-trivial k_j replaced by its buffer."""
        expr = p.expr
        adjoints = sorted((s for s in expr.free_symbols if self.b.is_adjoint(s)), key=lambda s: s.name)
        terms = [(a, sympy.factor_terms(sympy.diff(expr, a))) for a in adjoints]
        # linear: no coefficient holds an adjoint (so expr is affine in them) and expr is 0 where
        # they are (then expr = sum_j a_j k_j exactly; an expand to check it is exponential in
        # the nesting of the cell's functions)
        if any(k.has(*adjoints) for _, k in terms) or expr.xreplace({a: 0 for a in adjoints}) != 0:
            raise InternalError(f"adjoint statement for '{p.dst.name}' of cell '{self.b.g.cell}' "
                                f"is not linear in the adjoints: {expr}")
        target = self.b.assigned(p) or "d_"
        return sympy.Add(*[a * self.coefficient(k, a.name, target) for a, k in terms])

    def definition(self, name: str) -> sympy.Expr | None:
        """The expression of coefficient ``name`` (its buffer), or None if ``name`` is none."""
        return self.definitions.get(name)

    def coefficient(self, k: sympy.Expr, source: str, target: str) -> sympy.Expr:
        """A symbol for coefficient ``k`` (a buffer over a block of steps), or ``k`` itself when trivial."""
        if k.is_Number or k.is_Symbol or (-k).is_Symbol:
            return k
        if k not in self.coefs:
            src, tgt = source[2:], target[2:]
            name = self.b.n.fresh(f"d{src}_d{tgt}" if src.isidentifier() and tgt.isidentifier() else "d_coef")
            self.coefs[k] = name
            self.definitions[name] = k
            varies = any(not self.b.g.is_leaf(s.name) or self.b.g.leaf(s.name).kind != "param" for s in k.free_symbols)
            if varies:
                self.coef_refs[name] = Ref(name, (t_SYM - t0_SYM,))
                self.block_coefs.append((name, k))  # printed by share_coefficients
            else:  # parameters only: once
                self.coef_refs[name] = Ref(name)
                self.b.m.backward_seed.append(Assign(Ref(name), self.b.ew(k, "all")))
        return sympy.Symbol(self.coefs[k])

    def share(self) -> None:
        """Print the per-block coefficients, their common subexpressions computed once
        (sympy.cse): GRU's r (1 - n^2)(1 - z) appears in three of its four coefficients."""
        replacements, reduced = sympy.cse([k for _, k in self.block_coefs], symbols=self.b.n.numbered("coef_tmp"), order="none")
        rename = {sym: sympy.Symbol(self.b.n.fresh("common")) for sym, _ in replacements}
        own = {s.name: Ref(s.name) for s in rename.values()}  # printed as themselves, not as stored values
        lines = [(rename[sym].name, expr) for sym, expr in replacements] + [(name, k) for (name, _), k in zip(self.block_coefs, reduced)]
        self.b.m.backward_coefs.extend(Assign(Ref(name), self.b.ew(expr.xreplace(rename), "block", own)) for name, expr in lines)

