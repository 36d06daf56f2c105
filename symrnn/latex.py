"""LaTeX export of a derivation: every formula printed from the derivation objects.

The printer subclasses SymPy's ``LatexPrinter``; it knows, for each name of the
step graph, its LaTeX base (``h_tilde`` -> ``\\tilde{h}``, ``weight_hh_l0`` ->
``W_{hh}``) and its time (``h_prev`` -> ``h^{t-1}``).  Auxiliary nodes (one per
nonlinearity, one per matrix-vector product) print as their definition, so a
reader sees ``\\tanh(c^{t})`` and ``W_{hh} h^{t-1}``, not internal names.
The template (``templates/derivation.tex.j2``) holds prose and layout only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property

import sympy
from sympy.printing.latex import LatexPrinter
from sympy.printing.precedence import PRECEDENCE

from .cell import DIMS
from .derive import Derivation, sensitivity_name
from .ir import MatVecNode, Pointwise, Reduction
from .document import combination_tex, cost_table as _cost, dim_tex as _dim, visible_width as _visible
from .plan import KernelPlan

__all__ = ["Notation", "DerivationLatexPrinter", "document_data"]

_GREEK = {
    "alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "kappa", "lambda", "mu",
    "nu", "xi", "rho", "sigma", "tau", "phi", "chi", "psi", "omega",
}
_ACCENTS = {"tilde": r"\tilde", "hat": r"\hat", "bar": r"\bar"}


@dataclass(frozen=True)
class Notation:
    """How the document writes things where the seeds differ.

    ``time``: ``super`` (h^{t}, as seeds 000-003) or ``index`` (h[t], as seed 004);
    ``rename``: (name, shown as) pairs, e.g. (("s", "h"),) writes seed 000's state s as h;
    ``form``: ``vector`` (the textbook form, :mod:`symrnn.textbook`) or ``unit`` (per unit).
    """

    time: str = "super"
    rename: tuple[tuple[str, str], ...] = ()
    form: str = "vector"  # "vector" (textbook, the default) or "unit" (per unit, seeds 000/001)

    def base(self, name: str) -> str:
        return base_latex(dict(self.rename).get(name, name))

    def form_for(self, graph) -> str:
        """The form a document of ``graph`` is written in: ``form`` (a reduction over units
        prints as ``\\frac{1}{n}\\sum_j a_j`` in both forms)."""
        return self.form

    def at(self, base: str, time: str) -> str:
        if self.time == "index":
            return f"{{{base}[{time}]}}"
        return f"{{{base}^{{{time}}}}}"  # braced, so a power reads {h^{t}}^{2}


def base_latex(name: str) -> str:
    """The LaTeX of a name without time: W_f -> W_{f}, h_tilde -> \\tilde{h}, weight_ih_l0 -> W_{ih}."""
    name = re.sub(r"_l0(?=_|$)", "", name)
    name = re.sub(r"^weight_", "W_", name)
    name = re.sub(r"^bias_", "b_", name)
    parts = name.split("_")
    head = parts[0]
    head = f"\\{head}" if head in _GREEK else head
    rest = parts[1:]
    for accent, command in _ACCENTS.items():
        if accent in rest:
            rest.remove(accent)
            head = f"{{{command}{{{head}}}{{}}}}"  # the {} stops amsmath's accent from reading a following ^
    if not rest:
        return head
    sub = ",".join(f"\\{r}" if r in _GREEK else r for r in rest)
    return f"{{{head}_{{{sub}}}}}"  # braced: it may take another index


class DerivationLatexPrinter(LatexPrinter):
    """Prints per-unit expressions of one step graph with time indices."""

    def __init__(self, plan: KernelPlan, notation: Notation = Notation(), settings=None):
        super().__init__({"mul_symbol": None, **(settings or {})})
        self.plan, self.g, self.notation = plan, plan.graph, notation

    # -- names ------------------------------------------------------------------
    def value(self, name: str, time: str = "t") -> str:
        """LaTeX of a value of the step graph at time ``time``."""
        g = self.g
        if g.is_leaf(name):
            leaf = g.leaf(name)
            if leaf.kind == "prev_state":
                return self.notation.at(self.notation.base(leaf.state), "t-1")
            if leaf.kind == "param":
                base = self.notation.base(leaf.param)
                return base if leaf.block is None else f"{{{base}^{{({leaf.block})}}}}"
            if leaf.kind == "target":
                return self.notation.at(r"\mathrm{target}", time)
            return self.notation.at(self.notation.base(name), time)
        node = g.node(name)
        if node.role == "auxiliary":
            return self.definition(node)
        return self.notation.at(self.notation.base(name), time)

    def definition(self, node) -> str:
        if isinstance(node, MatVecNode):
            return f"{self.weight(node)} {self.value(node.operand)}"
        if isinstance(node, Reduction):  # \frac{1}{n}\sum_{j} a_j
            return self.doprint(node.reduce(sympy.Symbol(node.operand)))
        return self.doprint(node.expr)

    def weight(self, node: MatVecNode) -> str:
        if self.g.is_derived(node.param):  # (W - W^T): the combination, as the cell writes it
            return rf"\left({self.combination(node)}\right)"
        base = self.notation.base(node.param)
        p = self.g.param(node.param)
        if node.block is not None:
            base = f"{base}^{{({node.block})}}"
        full = sympy.simplify(node.cols[0]) == 0 and sympy.simplify(node.cols[1] - p.shape[1 - node.transpose]) == 0
        if not full:
            lo, hi = sympy.latex(node.cols[0] + 1), sympy.latex(node.cols[1])
            base = f"{base}_{{[{lo}:{hi},\\,:]}}" if node.transpose else f"{base}_{{[:,\\,{lo}:{hi}]}}"
        return f"{{{base}}}^{{\\top}}" if node.transpose else f"{{{base}}}"

    def combination(self, node: MatVecNode) -> str:
        """A derived matrix's terms, c_1 W_1 + c_2 W_2^T (ir.DerivedMatrix)."""
        return combination_tex(self.g.weight_terms(node), self.notation.base)

    def _print_Symbol(self, expr, style="plain"):
        name = expr.name
        if name in DIMS:
            return rf"n_{{\mathrm{{{name[2:]}}}}}"
        if expr.is_integer:  # an index of the derivation (l, i, j, m1), never a value
            return re.sub(r"^([a-z])(\d+)$", r"\1_{\2}", name)
        if self.g.is_leaf(name) or any(n.name == name for n in self.g.nodes):
            text = self.value(name)
            node = None if self.g.is_leaf(name) else self.g.node(name)
            if node is not None and node.role == "auxiliary" and isinstance(node, Pointwise) and node.op is None:
                return rf"\left({text}\right)"
            return text
        if name.startswith("d_"):
            return rf"\overline{{{self.value(name[2:])}}}"
        return super()._print_Symbol(expr, style)

    @cached_property
    def sensitivities(self) -> dict[str, tuple[str, bool, str]]:
        """The name of each sensitivity array (symrnn.derive.sensitivity_name) -> (state,
        of the step before?, parameter)."""
        return {sensitivity_name(s.name, p.name, prev): (s.name, prev, p.name)
                for s in self.g.states for p in self.g.params for prev in (False, True)}

    @property
    def scalar_cell(self) -> bool:
        g = self.g
        return all(g.size(n) == 1 for n in g.outputs) and all(all(s == 1 for s in p.shape) for p in g.params)

    def _print_Indexed(self, expr):
        label = expr.base.label.name
        if label in self.sensitivities:
            return self.sensitivity(expr)
        if self.scalar_cell and all(i.is_Symbol for i in expr.indices):  # a scalar cell: h^t, not h^t_l
            if self.g.is_leaf(label) or any(n.name == label for n in self.g.nodes):
                return self.value(label)
        idx = ",".join(self._print(i) for i in expr.indices)
        if self.g.is_leaf(label) or any(n.name == label for n in self.g.nodes):
            return f"{{{self.value(label)}_{{{idx}}}}}"
        return f"{{{self.notation.base(label)}_{{{idx}}}}}"

    def sensitivity(self, expr: sympy.Indexed, time: str | None = None) -> str:
        """d state[l] / d param[i, j] at step t (t - 1 for the state before; ``time``: at that step)."""
        state, prev, param = self.sensitivities[expr.base.label.name]
        time = time or ("t-1" if prev else "t")
        base = self.notation.base(param)
        if self.scalar_cell and all(i.is_Symbol for i in expr.indices):  # a scalar cell: h^t, not h^t_l
            return rf"\frac{{\partial {self.notation.at(self.notation.base(state), time)}}}{{\partial {base}}}"
        first, *rest = expr.indices
        num = "{" + self.notation.at(self.notation.base(state), time) + f"_{{{self._print(first)}}}}}"
        den = base
        if rest:
            den = f"{{{base.lower() if len(base) == 1 else base}}}_{{{','.join(self._print(i) for i in rest)}}}"
        return rf"\frac{{\partial {num}}}{{\partial {den}}}"

    def _print_KroneckerDelta(self, expr, exp=None):
        i, j = expr.args
        return rf"\delta_{{{self._print(i)}{self._print(j)}}}"


@dataclass(frozen=True)
class Equation:
    label: str
    lhs: str
    rhs: str
    note: str = ""


def _lines(printer: DerivationLatexPrinter, expr: sympy.Expr, per_line: int = 3) -> list[str]:
    """The terms of a sum, grouped a few to a line, for an aligned display."""
    terms = list(sympy.Add.make_args(expr)) if isinstance(expr, sympy.Add) else [expr]
    # each term printed once, with its sign (printing is the slow part: a layer norm's
    # sensitivities hold sums over units)
    signed = {t: ("- " + printer.doprint(-t)) if t.could_extract_minus_sign() else ("+ " + printer.doprint(t))
              for t in terms}
    terms.sort(key=lambda t: len(signed[t]) - (2 if signed[t].startswith("+ ") else 1))  # the term's printed width
    out, line = [], []
    for term in terms:
        line.append(term)
        if len(line) == per_line or len(" ".join(signed[t] for t in line)) - 2 > 70:
            out.append(line)
            line = []
    if line:
        out.append(line)
    texts = []
    for i, group in enumerate(out):
        text = " ".join(signed[t] for t in group)
        texts.append(text[2:] if i == 0 and text.startswith("+ ") else text)
    return texts


def document_data(plan: KernelPlan, notation: Notation = Notation()) -> dict:
    """Everything the derivation template prints, as plain strings."""
    g, der = plan.graph, plan.derivation
    P = DerivationLatexPrinter(plan, notation)
    cell = g.cell
    symbols = [(P.value(leaf.name), "input", sympy.latex(leaf.size)) for leaf in g.leaves if leaf.kind == "input"]
    symbols += [(P.value(s.name), "state", sympy.latex(s.size)) for s in g.states]
    symbols += [
        (P.value(n.name), "intermediate" if n.role == "intermediate" else n.role, sympy.latex(n.size))
        for n in g.nodes if n.role in ("intermediate", "readout")
    ]
    symbols += [
        (notation.base(p.name), "parameter", r" \times ".join(_dim(s) for s in p.shape) if len(p.shape) > 1
         else (sympy.latex(p.shape[0]) if p.shape else "1"))
        for p in g.params
    ]
    forward = []
    from .chainrule import Deriver
    from .textbook import TextbookPrinter

    deriver = Deriver(g)
    written = TextbookPrinter(g, notation)  # the cell's equations as it writes them: W [h^{t-1}; x^t]
    written.scalar_cell = True  # per unit: products of units, no odot
    for n in g.nodes:
        if n.role == "auxiliary":
            continue
        forward.append(Equation(f"eq:{cell}:{n.name}", P.value(n.name), written._print(deriver.value(n.name))))
    loss = None
    if g.loss is not None:
        reduction = r"\frac{1}{T}\sum_{t=0}^{T-1}" if g.loss.reduction == "mean" else r"\sum_{t=0}^{T-1}"
        loss = dict(per_step=P.doprint(g.loss.expr), total=f"{reduction} L^{{t}}", label=f"eq:{cell}:loss",
                    batch_sum=_batch_sum(g, units=True))
    partials = []
    for n in g.nodes:
        if isinstance(n, Pointwise):
            for dep, p in der.partials[n.name]:
                partials.append((rf"\frac{{\partial {P.value(n.name)}}}{{\partial {P.value(dep)}}}", P.doprint(p)))
    adjoints = []
    for s in g.states:
        adjoints.append(_adjoint(P, der, s.name, g))
    for n in reversed(g.nodes):
        if n.name not in g.state_names:
            eq = _adjoint(P, der, n.name, g)
            if eq is not None:
                adjoints.append(eq)
    for s in g.states:
        eq = _adjoint(P, der, s.prev, g)
        if eq is not None:
            adjoints.append(eq)
    gradients = _param_gradients(P, der, g)
    sensitivities = []
    for s in g.states:
        for p in g.params:
            sens = der.sensitivity(s.name, p.name)
            chain, lines = [], []
            if not _surely_too_long(sens.rhs):
                lines = _lines(P, sens.rhs)
            if not lines or max(_visible(line) for line in lines) > _MAX_LINE:  # too long substituted: node by node
                chain, lines = _chain(P, der, p.name, s.name), []
            sensitivities.append(dict(
                label=f"eq:{cell}:rtrl:{s.name}:{p.name}",
                lhs=P.doprint(sens.lhs), lines=lines, chain=chain,
                initial=P.sensitivity(sens.lhs, time="-1") + " = 0",
            ))
    return dict(
        cell=cell, symbols=symbols,
        forward=forward, loss=loss, partials=partials, adjoints=[a for a in adjoints if a],
        gradients=gradients, sensitivities=sensitivities, cost=_cost(plan),
    )


_MAX_LINE = 60  # visible characters (roughly) in one displayed line


def _surely_too_long(expr: sympy.Expr) -> bool:
    """Whether a term of ``expr`` holds more indexed values (each shows at least a letter)
    than four lines show characters: the substituted form is then not printed to be
    measured (printing is what costs: a layer norm's state sensitivities substituted are
    terms of ~1000 values, 20 s of printing for a form the chain replaces).  Counts up to
    the bound, no further."""
    bound = 4 * _MAX_LINE
    for term in sympy.Add.make_args(expr):
        seen = 0
        for sub in sympy.preorder_traversal(term):
            seen += isinstance(sub, sympy.Indexed)
            if seen > bound:
                return True
    return False


def _factor(P, expr: sympy.Expr) -> str:
    """An expression that multiplies what follows it: a sum gets parentheses."""
    return P.parenthesize(expr, PRECEDENCE["Mul"], strict=True)


def _chain(P, der: Derivation, param: str, state: str) -> list[tuple[str, str]]:
    """The forward-mode recursion of ``state`` w.r.t. ``param`` node by node (per unit l):
    a dot is d/d(param); a matrix product keeps its vector form (W dv)_l."""
    g = der.graph
    decl = g.param(param)
    index = {"scalar": "", "vector": "_{i}", "matrix": "_{ij}"}[decl.kind]
    base = P.notation.base(param)
    theta = (base.lower() if len(base) == 1 and decl.kind == "matrix" else base) + index
    memo: dict[str, str] = {}
    parts: dict[str, list[str]] = {}  # the terms of each node's text

    def dot(name: str) -> str:
        if g.is_leaf(name):
            leaf = g.leaf(name)
            if leaf.kind == "prev_state":
                return rf"\frac{{\partial {P.value(name)}_{{l}}}}{{\partial {theta}}}"
            if leaf.kind == "param" and leaf.param == param:
                if decl.kind == "scalar":
                    return "1"
                row = "l" if not leaf.block else f"(l + {P.doprint(leaf.block * leaf.size)})"
                return rf"\delta_{{{row}i}}"
            return ""
        if name in memo:
            return memo[name]
        node = g.node(name)
        if isinstance(node, MatVecNode):
            terms = []
            inner = dot(node.operand)
            if inner:
                terms.append(rf"\left({P.weight(node)} \tfrac{{\partial {P.value(node.operand)}}}{{\partial {theta}}}\right)_{{l}}")
            for coeff, name_, transposed in g.weight_terms(node):
                if name_ != param:
                    continue
                factor = "" if coeff == 1 else _factor(P, coeff) + r"\, "
                if transposed:  # d(W^T v)_l / dW_ij = delta_lj v_i
                    terms.append(rf"{factor}\delta_{{lj}} {P.value(node.operand)}_{{i}}")
                else:
                    row = "l" if not node.block else f"(l + {P.doprint(node.block * node.size)})"
                    terms.append(rf"{factor}\delta_{{{row}i}} {P.value(node.operand)}_{{j}}")
            text = " + ".join(terms)
        elif isinstance(node, Reduction):
            inner = dot(node.operand)
            if inner and len(inner) > 80:  # the operand's own line: this one names it
                lhs = rf"\frac{{\partial {P.value(node.operand)}_{{l}}}}{{\partial {theta}}}"
                chain.append((lhs, _group(parts.get(node.operand, [inner]), per_line=2)))
                inner = lhs
            w = node.weight()
            factor = "" if w == 1 else _factor(P, w) + r"\, "
            text = rf"\sum_{{m}} {factor}\left.{inner}\right|_{{l = m}}" if inner else ""
            terms = [text] if text else []
        else:
            terms = []
            for dep, p in der.partials[name]:
                d = dot(dep)
                if d:
                    factor = "" if p == 1 else _factor(P, p) + r"\, "
                    terms.append(factor + (rf"\left({d}\right)" if " + " in d and factor else d))
            text = " + ".join(terms)
        parts[name] = terms
        if text and node.role != "auxiliary":
            lines = _group(terms if isinstance(node, Pointwise) else [text], per_line=2)
            chain.append((rf"\frac{{\partial {P.value(name)}_{{l}}}}{{\partial {theta}}}", lines))
            text = rf"\frac{{\partial {P.value(name)}_{{l}}}}{{\partial {theta}}}"
        memo[name] = text
        return text

    chain: list[tuple[str, str]] = []
    dot(state)
    return chain


def _adjoint(P, der: Derivation, name: str, g) -> dict | None:
    terms = []
    for consumer, coeff in der.adjoint_terms(name):
        node = g.node(consumer)
        if isinstance(node, MatVecNode):
            w = P.weight(node)  # (W^T)^T = W
            w = w.removesuffix(r"^{\top}") if node.transpose else rf"{w}^{{\top}}"
            terms.append(rf"{w} \overline{{{P.value(consumer)}}}")
        elif isinstance(node, Reduction):  # the same at every unit: weight times the sum over units
            w = node.weight()
            factor = "" if w == 1 else rf"{_factor(P, w)}\, "
            terms.append(rf"{factor}\sum_{{k}} {{\overline{{{P.value(consumer)}}}}}_{{k}}")
        else:
            factor = "" if coeff == 1 else rf"{_factor(P, coeff)}\, "
            terms.append(rf"{factor}\overline{{{P.value(consumer)}}}")
    if g.is_leaf(name):
        lhs = rf"\overline{{{P.value(name)}}}"
        note = "from step t to t-1"
        if not terms:
            return None
        return dict(lhs=lhs, lines=_group(terms), note=note, label=f"eq:{g.cell}:adj:{name}")
    if name in g.state_names:
        prev = g.states[g.state_names.index(name)].prev
        terms.insert(0, r"\frac{\partial L}{\partial " + P.value(name) + "}")
        terms.insert(1, rf"\left.\overline{{{P.value(prev)}}}\right|_{{t+1}}")
        return dict(lhs=rf"\overline{{{P.value(name)}}}", lines=_group(terms), note="", label=f"eq:{g.cell}:adj:{name}")
    if not terms and name not in g.readouts:
        return None
    if name in g.readouts:
        direct = r"\frac{\partial L}{\partial " + P.value(name) + "}"
        partial = dict(der.loss_partials).get(name)
        if partial is not None:
            scale = r"\frac{1}{T}" if g.loss.reduction == "mean" else ""
            value = P.parenthesize(sympy.factor(partial), PRECEDENCE["Mul"], strict=True) if scale else P.doprint(sympy.factor(partial))
            direct += rf" = {scale}\frac{{\partial L^{{t}}}}{{\partial {P.value(name)}}} = {scale}{value}"
        terms.insert(0, direct)
    return dict(lhs=rf"\overline{{{P.value(name)}}}", lines=_group(terms), note="", label=f"eq:{g.cell}:adj:{name}")


def _group(terms: list[str], per_line: int = 2, width: int = 150) -> list[str]:
    """Terms of a sum, at most ``per_line`` and about ``width`` source characters to a line."""
    lines: list[list[str]] = [[]]
    for term in terms:
        if lines[-1] and (len(lines[-1]) == per_line or len(" + ".join(lines[-1] + [term])) > width):
            lines.append([])
        lines[-1].append(term)
    return [(" + " if i else "") + " + ".join(line) for i, line in enumerate(lines)]


def _param_gradients(P, der: Derivation, g) -> list[dict]:
    out = []
    for p in g.params:
        terms = []
        for n in g.nodes:
            if isinstance(n, MatVecNode) and g.is_derived(n.param):  # d((c W + c' W^T) v) / dW: c delta v^T + c' v delta^T
                for coeff, name, transposed in g.weight_terms(n):
                    if name != p.name:
                        continue
                    factor = "" if coeff == 1 else _factor(P, coeff) + r"\, "
                    outer = (rf"{P.value(n.operand)} \left(\overline{{{P.value(n.name)}}}\right)^{{\top}}" if transposed
                             else rf"\overline{{{P.value(n.name)}}} \left({P.value(n.operand)}\right)^{{\top}}")
                    terms.append((f"{{{P.notation.base(name)}}}", factor + outer))
            elif isinstance(n, MatVecNode) and n.param == p.name:
                w = P.weight(n)
                if n.transpose:  # d(W^T v) / dW: v delta^T
                    terms.append((w.removesuffix(r"^{\top}"),
                                  rf"{P.value(n.operand)} \left(\overline{{{P.value(n.name)}}}\right)^{{\top}}"))
                    continue
                terms.append((w, rf"\overline{{{P.value(n.name)}}} \left({P.value(n.operand)}\right)^{{\top}}"))
            elif isinstance(n, Pointwise):
                for leaf in g.leaves:
                    if leaf.kind == "param" and leaf.param == p.name:
                        coeff = der.partial(n.name, leaf.name)
                        if coeff != 0:
                            target = P.value(leaf.name)
                            reduce = _batch_sum(g, units=p.kind == "scalar")
                            factor = "" if coeff == 1 else rf"{_factor(P, coeff)}\, "
                            q = P.value(n.name)
                            chain = rf"\frac{{\partial L}}{{\partial {q}}} \frac{{\partial {q}}}{{\partial {target}}}"
                            terms.append((target, rf"{chain} = \sum_{{t=0}}^{{T-1}} {reduce} {factor}\overline{{{q}}}"))
        for target, term in terms:
            out.append(dict(lhs=rf"\frac{{\partial L}}{{\partial {target}}}", rhs=rf"\sum_{{t=0}}^{{T-1}} {term}"))
    return out


#: indices a document may sum over (the batch, the units), in the order they are taken
_INDEX_LETTERS = ("n", "k", "p", "q", "r", "s", "m")


def free_indices(g, count: int) -> list[str]:
    """``count`` index letters that are no name of the cell (nor a letter a name prints as)."""
    taken = {g.input.name, *g.state_names, *(n.name for n in g.nodes), *(p.name for p in g.params), "target", "t"}
    taken |= {base_latex(n).strip("{}").split("_")[0] for n in list(taken)}
    return [c for c in _INDEX_LETTERS if c not in taken][:count]


def _batch_sum(g, units: bool) -> str:
    """The sum over the batch (and the units): its indices collide with no name of the cell."""
    batch, unit = free_indices(g, 2)
    return rf"\sum_{{{batch},\,{unit}}}" if units else rf"\sum_{{{batch}}}"


