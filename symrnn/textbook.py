"""The textbook (vector) form of a derivation document, the default of ``symrnn latex``.

Every formula is a vector equation as a course writes it: ``\\odot`` for elementwise
products, ``W [h^{t-1}; x^t]`` for a matrix times the concatenation the cell multiplies
(its columns are never sliced), ``W^\\top \\delta`` going back, stacked gates kept stacked,
``\\overline{q}`` the adjoint of a value q (the bar over the whole quantity) and
``\\delta_q`` the adjoint of the argument of q's nonlinearity.  A cell whose sizes are all 1
(seed 002) prints as scalars.

The formulas are the chain rule applied to the cell's own equations
(:class:`symrnn.verify.Deriver`), the same derived formulas ``symrnn verify`` writes; each is
checked against the derivation objects (and through them the generated module) on random
instances by ``tests/test_textbook.py``.  The per-unit form of seeds 000/001 is
:mod:`symrnn.latex` (``--form unit``).
"""

from __future__ import annotations


import sympy
from sympy.printing.latex import LatexPrinter

from .cell import DIMS, Block, MatVec, ParamSymbol
from .claims import TIME, Cat, Entry, Outer, Prime, Q, Rows, TSum, Transposed, Unit, q
from .ir import Pointwise, Reduction
from .ops import OPS, Op, log
from .chainrule import Deriver, _placed, _uses, gradient_parts, reduction_tangent
from .reductions import AtUnit, Reduce
from .document import cost_table as _cost, dim_tex as _dim, visible_width as _visible

__all__ = ["TextbookPrinter", "vector_document_data", "generic_tangent"]

_END = sympy.Symbol("_end")


class TextbookPrinter(LatexPrinter):
    """Claims-level expressions (values, adjoints, tangents at a step) as textbook LaTeX."""

    def __init__(self, g, notation, delta: str = r"\delta", settings=None):
        super().__init__({"mul_symbol": None, **(settings or {})})
        self.g, self.notation, self.delta = g, notation, delta
        self.scalar_cell = all(g.size(n) == 1 for n in g.outputs) and all(
            all(s == 1 for s in p.shape) for p in g.params)
        self.eq_order = {name: k for k, (name, _) in enumerate(g.equations)}
        self.reduced = {n.name for n in g.nodes if isinstance(n, Reduction)}  # values that are one number

    def _print(self, expr, **kwargs) -> str:
        if isinstance(expr, MatVec):  # before MatVec's own _latex (a bmatrix): [h^{t-1}; x^t]
            return self._print_MatVec(expr)
        if isinstance(expr, Block):  # W^{(k)}, not Block's own W_{[k]}
            return self._print_Block(expr)
        if isinstance(expr, AtUnit):  # before AtUnit's own _latex
            return self._print_AtUnit(expr)
        return super()._print(expr, **kwargs)

    # -- names and times ------------------------------------------------------------------
    def when(self, time) -> str:
        if time == TIME:
            return "t"
        shift = sympy.expand(time - TIME) if time.has(TIME) else None
        if shift is not None:
            return f"t{'+' if shift > 0 else '-'}{abs(int(shift))}"
        return str(int(time))

    def at(self, base: str, time) -> str:
        return self.notation.at(base, self.when(time))

    def base(self, name: str) -> str:
        if name == "target" and self.g.loss is not None and not any(n.name == "target" for n in self.g.nodes):
            return r"\mathrm{target}"
        return self.notation.base(name)

    def _print_Q(self, e: Q) -> str:
        k = e.kind
        if k == "val":
            return self.at(self.base(e.qname), e.time)
        if k == "adj":
            return rf"\overline{{{self.at(self.base(e.qname), e.time)}}}"
        if k == "preadj":
            return self.at(f"{self.delta}_{{{self.base(e.qname)}}}", e.time)
        if k == "lossp":
            return rf"\frac{{\partial L^{{{self.when(e.time)}}}}}{{\partial {self.at(self.base(e.qname), e.time)}}}"
        if k == "sens":
            num = self.at(self.base(e.qname), e.time)
            if e.wrt == "_theta":
                return self.at(rf"\dot{{{self.base(e.qname)}}}", e.time)
            return rf"\frac{{\partial {num}}}{{\partial {self.theta(e.wrt, e.entries)}}}"
        if k == "pdot":
            base = rf"\dot{{{self.base(e.qname)}}}"
            return base if e.wrt == "_" else f"{base}^{{({e.wrt})}}"
        if k == "steps":
            return "T"
        raise ValueError(k)

    def theta(self, param: str, entries) -> str:
        base = self.base(param)
        if not entries:
            return base
        idx = "".join(i.name for i in entries)
        return rf"\left({base}\right)_{{{idx}}}" if len(base) > 1 else f"{base}_{{{idx}}}"

    def _print_ParamSymbol(self, e) -> str:
        return self.base(e.name)

    def _print_Symbol(self, e, style="plain") -> str:
        if e.name in DIMS:
            return rf"n_{{\mathrm{{{e.name[2:]}}}}}"
        return super()._print_Symbol(e, style)

    def _print_Block(self, e) -> str:
        return f"{{{self._print(e.args[0])}^{{({e.args[1]})}}}}"

    def _print_Transposed(self, e) -> str:
        w = e.args[0]
        if isinstance(w, Block):
            return f"{{{self._print(w.args[0])}^{{({w.args[1]})\\top}}}}"
        return f"{{{self._print(w)}^{{\\top}}}}"

    def _print_MatVec(self, e) -> str:
        w, ops = e.args
        return f"{self._print(w)} {self.vector(ops)}"

    def vector(self, ops) -> str:
        if len(ops) == 1:
            o = ops[0]
            text = self._print(o)
            return rf"\left({text}\right)" if isinstance(o, (sympy.Add, sympy.Mul)) or (
                isinstance(o, sympy.Mul) and len(o.args) > 1) else text
        return r"\left[" + ";\\, ".join(self._print(o) for o in ops) + r"\right]"

    def _print_Cat(self, e) -> str:
        if all(isinstance(a, Q) and a.kind in ("preadj", "adj") for a in e.args) or len(e.args) > 2:
            return r"\begin{bmatrix}" + r" \\ ".join(self._print(a) for a in e.args) + r"\end{bmatrix}"
        return self.vector(e.args)

    def _print_Outer(self, e) -> str:
        a, b = e.args
        left = self._print(a)
        if isinstance(a, sympy.Mul):
            left = rf"\left({left}\right)"
        right = self._print(b) if isinstance(b, Cat) else rf"\left({self._print(b)}\right)"
        if isinstance(b, Q):
            right = self._print(b)
        return rf"{left}\, {right}^{{\top}}"

    def _print_Rows(self, e) -> str:
        v, lo, hi = e.args
        lo_t = self._print(lo + 1)
        hi_t = "" if hi == _END else self._print(hi)
        return rf"\left[{self._print(v)}\right]_{{{lo_t}:{hi_t}}}"

    def _print_AtUnit(self, e) -> str:
        """v_j inside a reduction; a reduction's value, one number, has no unit."""
        v = e.args[0]
        if isinstance(v, Q) and v.qname in self.reduced or (isinstance(v, sympy.Symbol) and v.name in DIMS):
            return self._print(v)
        return e._latex(self)

    def _print_Unit(self, e) -> str:
        return f"e_{{{e.args[0].name}}}"

    def _print_Entry(self, e) -> str:
        inner = self._print(e.args[0])
        idx = "".join(self._print(i) for i in e.args[1:])
        return f"{{{inner}_{{{idx}}}}}"

    def _print_Prime(self, e) -> str:
        op = OPS[e.args[0].name]
        return op.latex.format(x=self._print(e.args[1]), mark="'")

    def _print_TSum(self, e) -> str:
        return rf"\sum_{{t=0}}^{{T-1}} {self._print(e.args[0])}"

    def _print_Function(self, e, exp=None):
        if isinstance(e, Op):
            return type(e).latex.format(x=self._print(e.args[0]), mark="" if exp is None else f"^{{{exp}}}")
        return super()._print_Function(e, exp)

    # -- sums and products in reading order ---------------------------------------------------
    def vectorial(self, e) -> bool:
        """Whether ``e`` is a vector (so a product with another vector is elementwise)."""
        if self.scalar_cell or isinstance(e, Entry):  # x^t_j: one entry
            return False
        if isinstance(e, (sympy.Mul, sympy.Add, sympy.Pow)):
            return any(self.vectorial(a) for a in e.args)
        for a in sympy.preorder_traversal(e):
            if isinstance(a, Q) and a.kind in ("val", "adj", "preadj", "lossp", "sens", "pre"):
                return True
            if isinstance(a, ParamSymbol) and len(self.g.param(a.name).shape) >= 1:
                return True
            if isinstance(a, (MatVec, Unit, Block, Rows, Cat)):
                return True
        return False

    def rank(self, e) -> tuple:
        """Where a term goes in a sum: the loss's own derivative, the input, earlier steps, later
        steps, this step, parameters, numbers."""
        atoms = [a for a in sympy.preorder_traversal(e) if isinstance(a, Q)]
        if e.is_Number:
            return (6,)
        if any(a.kind == "lossp" for a in atoms):
            return (0,)
        if any(a.kind == "val" and a.qname == self.g.input.name for a in atoms):
            return (1,)
        if any(a.time.has(TIME) and a.time != TIME for a in atoms):
            return (2,)
        if atoms:
            return (3,)
        return (4,)

    def term_key(self, a) -> tuple:
        first = min((self.eq_order.get(x.qname, -1) for x in sympy.preorder_traversal(a) if isinstance(x, Q)),
                    default=-1)
        return (self.rank(a), first, sympy.default_sort_key(a))

    def factor_rank(self, e) -> tuple:
        if e.is_Number:
            return (0, 0, 0)
        if isinstance(e, ParamSymbol) or (isinstance(e, Block)):
            return (1, 0, 0)
        if isinstance(e, Prime) or (isinstance(e, sympy.Add) and not e.atoms(Q) - e.atoms(Q)):
            pass
        atoms = [a for a in sympy.preorder_traversal(e) if isinstance(a, Q)]
        if isinstance(e, Prime):
            return (2, 0, 0)
        if any(a.kind in ("adj", "preadj", "sens", "lossp") for a in atoms) or isinstance(e, MatVec) or isinstance(e, Rows):
            return (6, 0, 0)
        if isinstance(e, Unit):
            return (3, 0, 0)
        vals = [a for a in atoms if a.kind == "val"]
        if vals and all(a.time == TIME for a in vals):
            first = min(self.eq_order.get(a.qname, -1) for a in vals)
            return (4 if not isinstance(e, Op) else 4.5, first, isinstance(e, sympy.Add))
        if vals:
            return (5, 0, 0)
        return (4, 0, 0)

    def _print_Add(self, e, order=None):
        terms = sorted(e.args, key=self.term_key)
        if len(terms) == 2 and terms[1].is_Number and _negative(terms[0]):
            terms = [terms[1], terms[0]]  # 1 - z
        elif _negative(terms[0]):
            first = next((k for k, t in enumerate(terms) if not _negative(t)), None)
            if first is not None:  # h~ - h, not -h + h~
                terms = [terms[first]] + terms[:first] + terms[first + 1:]
        out = ""
        for k, t in enumerate(terms):
            text = self._print(t)
            if k == 0:
                out = text
            elif text.startswith("- "):
                out += " - " + text[2:]
            elif text.startswith("-"):
                out += " - " + text[1:]
            else:
                out += " + " + text
        return out

    def _print_Mul(self, e):
        coeff, factors = e.as_coeff_mul()
        sign = ""
        if coeff.is_negative:
            sign, coeff = "- ", -coeff
        factors = list(factors)
        nums, den = [], []
        for f in factors:
            if isinstance(f, sympy.Pow) and f.args[1].is_Number and f.args[1] < 0 and not isinstance(f.args[0], Q):
                den.append(f.args[0] ** -f.args[1])
            elif isinstance(f, sympy.Pow) and f.args[1] == -1 and isinstance(f.args[0], Q):
                den.append(f.args[0])
            else:
                nums.append(f)
        scalars = [f for f in nums if not self.vectorial(f)]
        vectors = [f for f in nums if self.vectorial(f)]
        scalars.sort(key=lambda f: (self.factor_rank(f), sympy.default_sort_key(f)))
        vectors.sort(key=lambda f: (self.factor_rank(f), sympy.default_sort_key(f)))
        parts = []
        if coeff != 1 or not (scalars or vectors):
            parts.append(self._print(coeff) if coeff.q == 1 else rf"\tfrac{{{coeff.p}}}{{{coeff.q}}}")
        parts += [self.factor(f) for f in scalars]
        text = " ".join(parts)
        vec = r" \odot ".join(self.factor(f) for f in vectors)
        body = (text + (" " if text and vec else "") + vec) if vec else text
        if den and all(isinstance(d, Q) and d.kind == "steps" for d in den):
            body = rf"\frac{{1}}{{T}} {body}"
        elif den:
            body = rf"\frac{{{body or '1'}}}{{{' '.join(self.factor(d) for d in den)}}}"
        return sign + body

    def factor(self, f) -> str:
        text = self._print(f)
        if isinstance(f, sympy.Add) or (isinstance(f, MatVec) and False):
            return rf"\left({text}\right)"
        return text

    def _print_Pow(self, e):
        base, exp = e.args
        if exp == -1:
            return rf"\frac{{1}}{{{self._print(base)}}}"
        if isinstance(base, Op) and exp.is_Integer and exp > 0:
            return self._print_Function(base, exp=self._print(exp))
        b = self._print(base)
        if isinstance(base, (sympy.Add, sympy.Mul)) or "^" in b:
            b = rf"\left({b}\right)"
        return f"{b}^{{{self._print(exp)}}}"


def _negative(e) -> bool:
    return isinstance(e, sympy.Mul) and e.as_coeff_mul()[0].is_negative


# -- the vector-form derivation -------------------------------------------------------------------
def _merge_rows(e: sympy.Expr) -> sympy.Expr:
    """Rows(a, lo, hi) + Rows(b, lo, hi) -> Rows(a + b, lo, hi) (and the same inside next-step
    terms): the rows of the concatenation's adjoint, summed once."""
    if not isinstance(e, sympy.Add):
        return e
    groups: dict = {}
    rest = []
    for t in e.args:
        coeff, core = (t.as_independent(Rows, as_Add=False) if t.has(Rows) else (t, None))
        if core is not None and isinstance(core, Rows):
            key = (coeff, core.args[1], core.args[2])
            groups.setdefault(key, []).append(core.args[0])
        else:
            rest.append(t)
    for (coeff, lo, hi), parts in groups.items():
        rest.append(coeff * Rows(sympy.Add(*parts), lo, hi))
    return sympy.Add(*rest)


def generic_tangent(deriver: Deriver, name: str) -> sympy.Expr:
    """d name^t / d theta for any parameter entry theta, through the tangents of what the
    equation reads: theta's own derivative is \\dot W (W^(k) for a row block)."""
    expr = deriver.value(name, TIME)
    return _dot(deriver, expr, name)


def _dot(deriver: Deriver, e, owner=None):
    g = deriver.g
    if isinstance(e, Q):
        if e.kind != "val" or (e.qname not in deriver.eqs and e.time == TIME):
            return sympy.Integer(0)
        if e.time == TIME or e.qname in g.state_names:
            return q("sens", e.qname, "_theta", e.time)
        return sympy.Integer(0)
    if isinstance(e, ParamSymbol):
        return q("pdot", e.name)
    if isinstance(e, Block):
        return q("pdot", e.args[0].name, str(int(e.args[1])))
    if e.is_Number:
        return sympy.Integer(0)
    if isinstance(e, sympy.Add):
        return sympy.Add(*[_dot(deriver, a) for a in e.args])
    if isinstance(e, sympy.Mul):
        return sympy.Add(*[sympy.Mul(*e.args[:k], _dot(deriver, a), *e.args[k + 1:]) for k, a in enumerate(e.args)])
    if isinstance(e, sympy.Pow):  # d(a^b) = b a^(b-1) da + a^b log(a) db
        b, n = e.args
        out = n * b ** (n - 1) * _dot(deriver, b)
        if not n.is_Number:
            out += deriver.through_power(e, owner, TIME) * log(b) * _dot(deriver, n)
        return out
    if isinstance(e, Op):
        d = _dot(deriver, e.args[0])
        return 0 if d == 0 else deriver.prime(type(e).__name__, e.args[0], owner, TIME) * d
    if isinstance(e, Reduce):  # d mean(a) = mean(da); d logsumexp(a) = sum(softmax(a) da)
        d = _dot(deriver, e.args[0])
        return 0 if d == 0 else reduction_tangent(e, d)
    if isinstance(e, MatVec):
        w, ops = e.args
        dops = [_dot(deriver, o) for o in ops]
        terms = []
        if any(d != 0 for d in dops):
            terms.append(MatVec(w, sympy.Tuple(*[d if d != 0 else sympy.Integer(0) for d in dops])))
        if isinstance(w, Transposed):  # d(W^T) = (dW)^T
            wd = Transposed(q("pdot", w.args[0].name))
        else:
            wd = q("pdot", w.args[0].name, str(int(w.args[1]))) if isinstance(w, Block) else q("pdot", w.name)
        terms.append(MatVec(wd, sympy.Tuple(*ops)))
        return sympy.Add(*terms)
    raise ValueError(type(e).__name__)


def _delta_letter(g, notation) -> str:
    """The adjoint of a pre-activation: delta, unless a name of the cell prints as one."""
    shown = {notation.base(n) for n in _names(g)}
    for letter in (r"\delta", r"\Delta", r"\varepsilon", r"\eta"):
        if not any(s.lstrip("{").startswith(letter) for s in shown):
            return letter
    return r"\delta"


def _names(g) -> list[str]:
    return [g.input.name, *g.state_names, *(n.name for n in g.nodes if n.role != "auxiliary"), *(p.name for p in g.params)]


class _VectorDocument:
    """The textbook form's equations of one cell, section by section; ``formulas`` collects
    (quantity, formula) pairs, which the tests check numerically against the derivation."""

    def __init__(self, plan, notation):
        self.plan, self.g = plan, plan.graph
        self.deriver = Deriver(self.g)
        self.P = TextbookPrinter(self.g, notation, _delta_letter(self.g, notation))
        self.cell = self.g.cell
        self.lossp = {}
        if self.g.loss is not None:
            for out in self.g.outputs:
                self.lossp[q("lossp", out)] = self.deriver.lossp(out, TIME, plan.derivation)
        self.formulas: list[tuple[sympy.Expr, sympy.Expr]] = []

    def eq(self, label, lhs, expr, aliases=(), note="", quantity=None) -> dict:
        if self.lossp:
            expr = expr.xreplace(self.lossp)
        if quantity is not None:
            self.formulas.append((quantity, expr))
        return dict(label=label, aliases=[a for a in dict.fromkeys(aliases) if a != label], lhs=lhs,
                    lines=_split(self.P, expr), note=note)

    def symbols(self) -> list:
        g, P = self.g, self.P
        size = (lambda s: "1") if P.scalar_cell else (lambda s: sympy.latex(s))
        symbols = [(P.at(P.base(g.input.name), TIME), "input", size(g.input.size))]
        symbols += [(P.at(P.base(s.name), TIME), "state", size(s.size)) for s in g.states]
        symbols += [(P.at(P.base(n.name), TIME), n.role if n.role == "readout" else "intermediate", size(n.size))
                    for n in g.nodes if n.role in ("intermediate", "readout")]
        symbols += [(P.base(p.name), "parameter", "1" if not p.shape or P.scalar_cell else
                     r" \times ".join(_dim(s) for s in p.shape)) for p in g.params]
        return symbols

    def forward(self) -> list:
        """Forward equations, stacked where the user's gates are row blocks of one parameter."""
        g, P, cell, deriver = self.g, self.P, self.cell, self.deriver
        forward = []
        names = [name for name, _ in g.equations]
        k = 0
        while k < len(names):
            run = _stacked_run(deriver, names, k)
            group = names[k:k + run]
            aliases = [f"eq:{cell}:{n.name}" for n in g.nodes if n.role == "auxiliary" and n.equation in group]
            aliases += [f"eq:{cell}:{n}" for n in group[1:]]
            if run > 1:
                lhs = r"\begin{bmatrix}" + r" \\ ".join(P._print(q("val", n)) for n in group) + r"\end{bmatrix}"
                forward.append(self.eq(f"eq:{cell}:{group[0]}", lhs, _unblocked(deriver.value(group[0])), aliases))
                self.formulas.extend((q("val", n), deriver.value(n)) for n in group)
            else:
                forward.append(self.eq(f"eq:{cell}:{group[0]}", P._print(q("val", group[0])), deriver.value(group[0]), aliases,
                                  quantity=q("val", group[0])))
            k += run
        return forward

    def loss(self) -> dict | None:
        g, P, cell, deriver = self.g, self.P, self.cell, self.deriver
        loss = None
        if g.loss is not None:
            reduction = r"\frac{1}{T}\sum_{t=0}^{T-1}" if g.loss.reduction == "mean" else r"\sum_{t=0}^{T-1}"
            per = deriver.lift(g.loss.expr)
            per_text = P._print(per)
            if not P.scalar_cell:
                per_text = rf"\mathbf{{1}}^{{\top}} \left({per_text}\right)" if isinstance(per, sympy.Add) else \
                    rf"\mathbf{{1}}^{{\top}} {per_text}"
            loss = dict(per_step=per_text, total=f"{reduction} L^{{t}}", label=f"eq:{cell}:loss")
        return loss

    def written(self, n: Pointwise) -> bool:
        """Whether node ``n``'s op is applied in its equation as the cell writes it."""
        top = self.deriver.value(n.equation if n.role == "auxiliary" else n.name)
        return top is not None and any(isinstance(a, n.op) for a in sympy.preorder_traversal(top))

    def partials(self) -> list:
        """Local derivatives: each nonlinearity through the value it computes."""
        g, P, deriver = self.g, self.P, self.deriver
        partials = []
        nested: dict[tuple, list] = {}  # (equation, op) -> the op's applications inside it, not yet listed
        for n in g.nodes:
            if isinstance(n, Pointwise) and n.op is not None:
                if not self.written(n):  # lowered from what the equation writes otherwise (a ** b: exp(b log a))
                    continue
                if n.role == "auxiliary" and not self.of_one_value(n):  # op(an expression): as the equation writes it
                    key = (n.equation, n.op)
                    if key not in nested:
                        top = deriver.value(n.equation)
                        nested[key] = [a for a in sympy.preorder_traversal(top) if isinstance(a, n.op) and a != top]
                    if not nested[key]:
                        continue
                    application = nested[key].pop(0)
                    arg = application.args[0]
                    partials.append((P._print(Prime(sympy.Symbol(n.op.__name__), arg)), P._print(n.op.derivative(application, arg))))
                    continue
                if n.role == "auxiliary":
                    (dep,) = n.deps
                    if g.is_leaf(dep) and g.leaf(dep).kind == "param":
                        continue
                    arg = q("val", g.leaf(dep).state, time=TIME - 1) if g.is_leaf(dep) and g.leaf(dep).kind == "prev_state" \
                        else q("val", dep)
                    via = n.op.derivative(n.op(arg), arg)
                else:
                    arg = deriver.value(n.name).args[0]
                    via = n.op.derivative(q("val", n.name), arg)
                partials.append((P._print(Prime(sympy.Symbol(n.op.__name__), arg)) if isinstance(arg, Q)
                                 else n.op.latex.format(x=r"\cdot", mark="'") + rf"\ \text{{in }} {P._print(q('val', n.name))}",
                                 P._print(via)))
        return partials

    def of_one_value(self, n) -> bool:
        """A nonlinearity applied to one value of the cell (a parameter, the input, a state at
        t - 1 or an equation's value), not to an expression of several."""
        if len(n.deps) != 1:
            return False
        (dep,) = n.deps
        return self.g.is_leaf(dep) or self.g.node(dep).role != "auxiliary" and isinstance(self.g.node(dep), Pointwise)

    def adjoints(self) -> list:
        """Reverse mode: the adjoint of every value (and of pre-activations), then of x."""
        g, P, cell, deriver = self.g, self.P, self.cell, self.deriver
        covered: set[str] = set()
        adjoints = []
        inline = {n.name for n in g.nodes if n.role == "intermediate" and isinstance(n, Pointwise) and n.op is not None
                  and isinstance(deriver.value(n.name), n.op) and not isinstance(deriver.value(n.name).args[0], Q)
                  and deriver.readers(n.name) == 1}  # written out where it is read (Deriver.inline_adjoints)
        order = [s.name for s in g.states] + [n for n, _ in g.equations if n not in g.state_names]
        for name in order:
            aliases = [f"eq:{cell}:adj:{name}"] + [f"eq:{cell}:adj:{s.prev}" for s in g.states if s.name == name]
            expr = deriver.value(name)
            has_pre = isinstance(expr, Op) and not isinstance(expr.args[0], Q)
            if name not in inline:
                a = _merge_rows(deriver.inline_adjoints(deriver.adj(name), TIME))
                own = [f"eq:{cell}:adj:{n.name}" for n in g.nodes if n.role == "auxiliary" and n.equation == name
                       and not has_pre]
                adjoints.append(self.eq(f"eq:{cell}:adj:{name}", P._print(q("adj", name)), a, aliases + own,
                                   quantity=q("adj", name)))
                covered.add(name)
            if has_pre:
                d = _pull_common(deriver.inline_adjoints(deriver.preadj(name), TIME))
                own = [f"eq:{cell}:adj:{n.name}" for n in g.nodes if n.role == "auxiliary" and n.equation == name]
                label = f"eq:{cell}:adj:{name}" if name in inline else f"eq:{cell}:adjpre:{name}"
                adjoints.append(self.eq(label, P._print(q("preadj", name)), d, own + (aliases if name in inline else []),
                                   note="pre", quantity=q("preadj", name)))
        x = g.input.name
        adjoints.append(self.eq(f"eq:{cell}:adj:{x}", P._print(q("adj", x)), _merge_rows(deriver.inline_adjoints(deriver.adj(x), TIME)),
                           quantity=q("adj", x)))
        return adjoints

    def gradients(self) -> list:
        g, P, deriver = self.g, self.P, self.deriver
        gradients = []
        for p in g.params:
            parts = gradient_parts(deriver, p.name)
            gradients += _gradient_lines(P, p, parts, deriver)
            self.formulas.append((q("grad", "_", p.name, 0), _placed(parts, p, deriver, self.lossp)))
        return gradients


def vector_document_data(plan, notation) -> dict:
    """What the textbook template prints: lists of equations (label, aliases, lhs, lines)."""
    d = _VectorDocument(plan, notation)
    g, P, cell = d.g, d.P, d.cell
    symbols, forward, loss, partials = d.symbols(), d.forward(), d.loss(), d.partials()
    adjoints, gradients = d.adjoints(), d.gradients()
    sensitivities, generic = _sensitivities(P, d.deriver, g, cell, d.formulas)  # forward mode
    pdots = sorted({p.name for p in g.params})
    return dict(
        cell=cell, symbols=symbols, forward=forward, loss=loss, partials=partials, adjoints=adjoints,
        gradients=gradients, sensitivities=sensitivities, generic=generic, cost=_cost(plan),
        delta=P.delta, scalar=P.scalar_cell,
        dot_example=P._print(q("pdot", g.params[0].name)) if g.params else "",
        params_dot=", ".join(P.base(n) for n in pdots),
        all_labels=_all_labels(g, cell),
        formulas=d.formulas,
    )


def _pull_common(e):
    """Common factors of a sum's terms pulled out, inside out: -h ⊙ a + h~ ⊙ a -> (h~ - h) ⊙ a."""
    if isinstance(e, sympy.Add):
        terms = [_pull_common(a) for a in e.args]
        sets = [list(sympy.Mul.make_args(t)) for t in terms]
        common = [f for f in sets[0] if not f.is_Number and all(f in other for other in sets[1:])]
        if common:
            rest = []
            for fs in sets:
                fs = list(fs)
                for f in common:
                    fs.remove(f)
                rest.append(sympy.Mul(*fs))
            return sympy.Mul(*common, sympy.Add(*rest))
        return sympy.Add(*terms)
    if isinstance(e, sympy.Mul):
        return sympy.Mul(*[_pull_common(a) for a in e.args])
    return e


def instantiate(expr: sympy.Expr, param: str, entries: tuple, g) -> sympy.Expr:
    """A generic forward-mode formula (d/d theta) for theta = ``param[entries]``: its
    derivatives of parameters replaced (e_i e_j^T, e_i, 1 or 0), its tangents named."""
    decl = g.param(param)

    def pdot(a: Q):
        if a.qname != param:
            return sympy.Integer(0)
        unit = Outer(Unit(entries[0]), Unit(entries[1])) if len(decl.shape) == 2 else (
            Unit(entries[0]) if decl.shape else sympy.Integer(1))
        if a.wrt != "_":
            k, rows = int(a.wrt), decl.block_rows
            unit = Rows(unit, k * rows, (k + 1) * rows)
        return unit

    table = {}
    for a in expr.atoms(Q):
        if a.kind == "pdot":
            table[a] = pdot(a)
        elif a.kind == "sens" and a.wrt == "_theta":
            table[a] = q("sens", a.qname, param, a.time, entries)
    out = expr.xreplace(table)
    # d(W^T) = (e_i e_j^T)^T = e_j e_i^T, or 0 (W.T @ v)
    out = out.replace(lambda a: isinstance(a, Transposed) and isinstance(a.args[0], Outer),
                      lambda a: Outer(a.args[0].args[1], a.args[0].args[0]))
    out = out.replace(lambda a: isinstance(a, Transposed) and a.args[0] == 0, lambda a: sympy.Integer(0))
    return out.replace(lambda a: isinstance(a, MatVec) and a.args[0] == 0, lambda a: sympy.Integer(0))


def _unblocked(e):
    """``e`` with every row block W[k] written as the whole stacked parameter W."""
    return e.replace(lambda a: isinstance(a, Block), lambda a: a.args[0])


def _stacked_run(deriver: Deriver, names: list[str], k: int) -> int:
    """How many equations from ``names[k]`` on are the row blocks 0, 1, ... of the same stacked
    parameters, alike but for the block (seed 003's GRU: (z; r) = sigma(W_rz [h; x] + b_rz))."""
    g = deriver.g
    first = deriver.value(names[k])
    blocks = {a.args[1] for a in first.atoms(Block)}
    if blocks != {sympy.Integer(0)}:
        return 1
    params = {a.args[0].name for a in first.atoms(Block)}
    count = min(g.param(p).blocks for p in params)
    if any(g.param(p).blocks != count for p in params) or k + count > len(names):
        return 1
    for j in range(1, count):
        e = deriver.value(names[k + j])
        if names[k + j] in g.state_names or {a.args[1] for a in e.atoms(Block)} != {sympy.Integer(j)}:
            return 1
        if _unblocked(e) != _unblocked(first):
            return 1
    return count if names[k] not in g.state_names else 1


def _all_labels(g, cell) -> list[str]:
    out = [f"eq:{cell}:{n.name}" for n in g.nodes]
    out += [f"eq:{cell}:adj:{n.name}" for n in g.nodes]
    out += [f"eq:{cell}:adj:{leaf.name}" for leaf in g.leaves if leaf.kind in ("input", "prev_state")]
    out += [f"eq:{cell}:rtrl:{s.name}:{p.name}" for s in g.states for p in g.params]
    return out


def _gradient_lines(P: TextbookPrinter, p, parts, deriver) -> list[dict]:
    if not parts:
        return []
    blocks = sorted({k for k, _ in parts if k is not None})
    lhs = rf"\frac{{\partial L}}{{\partial {P.base(p.name)}}}"
    scalar_sum = not p.shape and not P.scalar_cell
    if blocks and len(blocks) == p.blocks and all(k is not None for k, _ in parts):
        per = {k: [e for kk, e in parts if kk == k] for k in blocks}
        if all(len(v) == 1 for v in per.values()):
            items = [per[k][0] for k in blocks]
            if all(isinstance(e, Outer) for e in items) and len({e.args[1] for e in items}) == 1:
                stacked = Outer(Cat(*[e.args[0] for e in items]), items[0].args[1])
                return [dict(lhs=lhs, rhs=P._print(TSum(stacked)))]
            if not any(isinstance(e, Outer) for e in items):
                return [dict(lhs=lhs, rhs=P._print(TSum(Cat(*items))))]
    lines = []
    keys = [None] if not blocks else sorted({k for k, _ in parts}, key=lambda k: -1 if k is None else k)
    for k in keys:
        terms = sympy.Add(*[e for kk, e in parts if kk == k])
        name = P.base(p.name) if k is None else f"{P.base(p.name)}^{{({k})}}"
        body = P._print(terms)
        if isinstance(terms, sympy.Add) and not scalar_sum and _visible(body) > 100:  # W and W.T: a sum per line
            sums = [rf"\sum_{{t=0}}^{{T-1}} {P._print(t)}" for t in sorted(terms.args, key=P.term_key)]
            lines.append(dict(lhs=rf"\frac{{\partial L}}{{\partial {name}}}", rhs=r" \\ &\quad + ".join(sums)))
            continue
        if scalar_sum:
            body = rf"\mathbf{{1}}^{{\top}} \left({body}\right)"
        elif isinstance(terms, sympy.Add):
            body = rf"\left({body}\right)"
        lines.append(dict(lhs=rf"\frac{{\partial L}}{{\partial {name}}}", rhs=rf"\sum_{{t=0}}^{{T-1}} {body}"))
    return lines


def _sensitivities(P: TextbookPrinter, deriver: Deriver, g, cell, formulas: list):
    """Per parameter, substituted (seed 002's form) where every recursion is one short line;
    else one generic forward-mode recursion per value, for any parameter entry theta."""
    per = []
    short = True
    recurrent = {p.name for p in g.params if any(_uses(deriver.value(n), p.name) for n, _ in g.equations
                                                if n not in g.readouts)}
    for s in g.states:
        for p in g.params:
            if p.name not in recurrent:
                continue
            entries = tuple(sympy.Symbol(n, integer=True) for n in "ij"[: len(p.shape)])
            rhs = deriver.sens(s.name, p.name, entries)
            if rhs == 0:
                continue
            lhs = q("sens", s.name, p.name, TIME, entries)
            text = P._print(rhs)
            if _visible(text) > 60 or len(text) > 240:  # (fractions print short but set wide: W and W.T)
                short = False
            formulas.append((lhs, rhs))
            per.append(dict(label=f"eq:{cell}:rtrl:{s.name}:{p.name}", aliases=[], lhs=P._print(lhs),
                            lines=[text], initial=P._print(q("sens", s.name, p.name, TIME - 1, entries).xreplace(
                                {TIME: sympy.Integer(0)})) + " = 0"))
    if short and len(per) <= 12:
        zero = [f"eq:{cell}:rtrl:{s.name}:{p.name}" for s in g.states for p in g.params
                if not any(x["label"] == f"eq:{cell}:rtrl:{s.name}:{p.name}" for x in per)]
        if per:
            per[0]["aliases"] = zero
        return per, []
    generic = []
    for name, _ in g.equations:
        rhs = generic_tangent(deriver, name)
        formulas.append((q("sens", name, "_theta"), rhs))
        aliases = [f"eq:{cell}:rtrl:{name}:{p.name}" for p in g.params] if name in g.state_names else []
        generic.append(dict(label=f"eq:{cell}:rtrl:{name}", aliases=aliases, lhs=P._print(q("sens", name, "_theta")),
                            lines=_split(P, rhs)))
    return [], generic


def _split(P: TextbookPrinter, expr) -> list[str]:
    """A sum in lines of about 60 visible characters (terms in reading order)."""
    text = P._print(expr)
    if _visible(text) <= 62:
        return [text]
    if isinstance(expr, sympy.Mul):  # f ⊙ (a + b + ...): the sum over lines, in \bigl( \bigr)
        sums = sorted((a for a in expr.args if isinstance(a, sympy.Add)), key=lambda a: -len(P._print(a)))
        if sums and P.factor_rank(sums[0]) == max(P.factor_rank(a) for a in expr.args):  # the last factor
            rest = sympy.Mul(*[a for a in expr.args if a is not sums[0]])
            head = P._print(rest)
            inner = _split(P, sums[0])
            joint = r" \odot " if P.vectorial(rest) and P.vectorial(sums[0]) else " "
            lines = [head + joint + r"\bigl(" + inner[0]] + inner[1:]
            lines[-1] += r"\bigr)"
            return lines
    if not isinstance(expr, sympy.Add):
        return [text]
    terms = sorted(expr.args, key=P.term_key)
    lines, line = [], ""
    for t in terms:
        piece = P._print(t)
        sep = "" if not line else (" - " + piece[1:].lstrip() if piece.startswith("-") else " + " + piece)
        candidate = (line + sep) if line else piece
        if line and _visible(candidate) > 58:
            lines.append(line)
            line = ("- " + piece[1:].lstrip()) if piece.startswith("-") else "+ " + piece
        else:
            line = candidate
    lines.append(line)
    return lines
