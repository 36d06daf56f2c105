"""What both derivation documents (the textbook form, symrnn.textbook; the unit form,
symrnn.latex) share: a dimension in LaTeX, the cost table, and the width of a line."""

from __future__ import annotations

import re

import sympy

from .ir import MatVecNode, Pointwise
from .plan import KernelPlan

__all__ = ["cost_table", "dim_tex", "visible_width"]


def dim_tex(expr: sympy.Expr) -> str:
    """A size inside a product: n_hidden + n_in becomes (n_hidden + n_in)."""
    text = sympy.latex(expr)
    return rf"\left({text}\right)" if isinstance(expr, sympy.Add) else text


def visible_width(tex: str) -> int:
    """A rough count of the characters a line of LaTeX math shows (where a displayed line
    breaks: a layout heuristic over the printed line, which decides nothing a reader's
    numbers depend on)."""
    tex = re.sub(r"\\(left|right|big|Big|mathrm|tfrac|quad|,)", "", tex)
    tex = re.sub(r"\\frac\{([^{}]*(?:\{[^{}]*\}[^{}]*)*)\}\{", lambda m: "{", tex)  # a fraction shows its wider part
    tex = re.sub(r"\\[A-Za-z]+", "x", tex)
    return len(re.sub(r"[{}_^\s]", "", tex))


def cost_table(plan: KernelPlan) -> dict:
    """Per-step work and storage of forward, BPTT and RTRL: the rows of the table in M (the
    multiplications of one step of one sequence: matrix products and elementwise products)
    and P (the number of parameters), whose values are given below it."""
    g = plan.graph
    n_params = sympy.Add(*[sympy.Mul(*p.shape) for p in g.params])
    states = sympy.Add(*[s.size for s in g.states])
    stored = sympy.Add(*[g.node(n).size for n in plan.stored]) + states
    mults = sympy.Add(*[m.size * (m.cols[1] - m.cols[0]) for m in g.nodes if isinstance(m, MatVecNode)])
    for n in g.nodes:  # and the elementwise products of every unit
        if isinstance(n, Pointwise):
            ops = sympy.count_ops(n.expr, visual=True)
            count = sum(ops.coeff(sympy.Symbol(kind)) for kind in ("MUL", "DIV")) if ops != 0 else 0
            mults += count * n.size
    mults = sympy.expand(mults)
    rows = [
        ("forward", r"$M \cdot B$", rf"${sympy.latex(stored)}$ values per step and sequence, kept for BPTT"),
        ("BPTT (reverse)", r"about $2 M \cdot B$", rf"${dim_tex(stored)} \cdot T \cdot B$: every step's activations"),
        ("RTRL (forward)", r"about $M \cdot P \cdot B$", rf"${dim_tex(states)} \cdot P \cdot B$: the sensitivity tensor, "
         "independent of $T$"),
    ]
    return dict(rows=rows, M=sympy.latex(mults), P=sympy.latex(n_params), formed=formed_matrices(g))


def formed_matrices(g) -> list[str]:
    """The LaTeX of each combination of matrices the kernels form once per call
    (ir.DerivedMatrix: ``W - W^T``), which M counts as one product."""
    from .latex import base_latex

    return [combination_tex(d.terms, base_latex) for d in g.derived]


def combination_tex(terms, base) -> str:
    """c_1 W_1 + c_2 W_2^T from (coefficient, parameter, transposed) terms; ``base`` prints a
    parameter's name."""
    out = []
    for coeff, param, transposed in terms:
        size = abs(coeff)
        w = f"{{{base(param)}}}" + (r"^{\top}" if transposed else "")
        out.append(f"{'-' if coeff < 0 else '+'} {'' if size == 1 else sympy.latex(size) + ' '}{w}")
    text = " ".join(out)
    return text[2:] if text.startswith("+ ") else text
