"""The textbook (vector) form: every formula it prints is checked numerically against the
derivation objects (through verify's per-step evaluation, itself cross-checked against the
generated module), for every built-in cell; and the page counts of the LSTM and GRU documents."""

from __future__ import annotations

import re
import shutil
import subprocess

import warnings

import pytest
import sympy
from hypothesis import HealthCheck, Phase, assume, example, given, settings
from test_spec_random_cells import spec_text

from symrnn.claims import q
from symrnn.errors import UserError
from symrnn.spec import SpecWarning, parse_spec
from symrnn.latex import Notation
from symrnn.pipeline import build, load_module, module_name, render_latex, render_markdown, render_numpy
from symrnn.textbook import instantiate, vector_document_data
from symrnn.truth import ShapeMismatch
from symrnn.verify import Evaluator, Instance, _first_difference, _summed


@pytest.fixture(scope="module")
def instances():
    cache = {}

    def get(cell):
        if cell not in cache:
            plan = build(cell)
            module = load_module(render_numpy(plan), module_name(cell))
            cache[cell] = (plan, Instance(plan, module, seed=7, steps=4, zero_states=False))
        return cache[cell]

    return get


def _check(inst, lhs, rhs, ranges=None):
    times = [None] if lhs.kind in ("grad",) else list(range(inst.T))
    ev = Evaluator(inst, ranges, uniform=True)  # a reduction's value read as the vector that holds it
    left = [ev.ev(lhs, t) for t in times]
    right = [_summed(lhs, l, ev.ev(rhs, t)) for l, t in zip(left, times)]
    assert not _first_difference(left, right), (lhs, rhs)


def test_every_printed_formula_is_the_derivation(cell_name, instances):
    check_every_formula(*instances(cell_name))


def check_every_formula(plan, inst):
    """Every formula of the textbook document of ``plan``, against the derivation on ``inst``."""
    g = plan.graph
    data = vector_document_data(plan, Notation())
    checked = {"val": 0, "adj": 0, "preadj": 0, "grad": 0, "sens": 0}
    for lhs, rhs in data["formulas"]:
        if lhs.kind == "sens" and lhs.wrt == "_theta":
            for p in g.params:  # the generic recursion, for every parameter
                entries = tuple(sympy.Symbol(n, integer=True) for n in "ij"[: len(p.shape)])
                ranges = dict(zip("ij", [inst.size(s) for s in p.shape]))
                _check(inst, q("sens", lhs.qname, p.name, lhs.time, entries), instantiate(rhs, p.name, entries, g),
                       ranges)
        elif lhs.kind == "sens":
            p = g.param(lhs.wrt)
            _check(inst, lhs, rhs, dict(zip("ij", [inst.size(s) for s in p.shape])))
        else:
            _check(inst, lhs, rhs)
        checked[lhs.kind] += 1
    assert checked["val"] == len(g.equations) and checked["grad"] == len(g.params) and checked["sens"]
    assert checked["adj"] >= len(g.states) + 1


def _pages(tex: str, tmp_path) -> int:
    (tmp_path / "doc.tex").write_text(tex)
    subprocess.run([shutil.which("pdflatex"), "-interaction=nonstopmode", "-halt-on-error", "doc.tex"], cwd=tmp_path,
                   capture_output=True)
    log = (tmp_path / "doc.log").read_text(errors="replace")
    return int(re.search(r"Output written on doc\.pdf \((\d+) pages?", log).group(1))


@pytest.mark.parametrize("time", ["super", "index"])
@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_lstm_and_gru_fit_in_three_pages(cell, time, tmp_path):
    assert shutil.which("pdflatex"), "pdflatex is missing: apt-get install texlive-latex-base texlive-latex-recommended"
    assert _pages(render_latex(build(cell), Notation(time=time)), tmp_path) <= 3


def test_textbook_notation():
    lstm = render_latex(build("lstm"))
    assert r"{W_{f}} \left[{h^{t-1}};\, {x^{t}}\right]" in lstm  # the concatenation, as the cell writes it
    assert "[:," not in lstm and r"\bar{" not in lstm  # no column slices, no bar over a product
    assert r"{{W_{f}}^{\top}} {\delta_{f}^{t+1}}" in lstm  # W^T delta
    assert r"\overline{{c^{t}}} &=" in lstm and r"\odot" in lstm
    gru = render_latex(build("gru"))
    assert r"\begin{bmatrix}{z^{t}} \\ {r^{t}}\end{bmatrix} = \sigma\left({W_{rz}} \left[{h^{t-1}};\, {x^{t}}\right] + {b_{rz}}\right)" in gru
    assert r"\begin{bmatrix}{\delta_{z}^{t}} \\ {\delta_{r}^{t}}\end{bmatrix}\, \left[{h^{t-1}};\, {x^{t}}\right]^{\top}" in gru


def test_seed002_cell_prints_as_the_seed_writes_it():
    """Seed 002's recursions term by term: dh^t/db = sigma'(a^t)[v dh^{t-1}/db + 1]; a scalar cell,
    so no unit index, no odot, no sum over an index named like a parameter, and a cost that counts."""
    md = render_markdown(build("single_sigmoid"))
    assert r"\frac{\partial {h^{t}}}{\partial b} = \sigma'\left({a^{t}}\right) \left(v \frac{\partial {h^{t-1}}}{\partial b} + 1\right)" in md
    assert r"\frac{\partial {h^{t}}}{\partial w} = \sigma'\left({a^{t}}\right) \left({x^{t}} + v \frac{\partial {h^{t-1}}}{\partial w}\right)" in md
    assert r"{a^{t}} &= w {x^{t}} + v {h^{t-1}} + b" in md
    assert "_{l}" not in md and r"\odot" not in md and r"\sum_{b" not in md and r"0 \cdot B" not in md
    assert "M &= 3" in md


def test_no_summation_index_is_a_name_of_the_cell():
    for cell in ("single_sigmoid", "lstm", "elman"):
        for form in ("vector", "unit"):
            tex = render_latex(build(cell), Notation(form=form))
            plan = build(cell)
            names = {p.name for p in plan.graph.params} | {n.name for n in plan.graph.nodes}
            for index in re.findall(r"\\sum_\{([a-z])(?:,\\,([a-z]))?\}", tex):
                assert not set(index) & names, (cell, form, index)


def test_notebook_display():
    import symrnn

    doc = symrnn.derivation("gru")
    md, tex = doc._repr_markdown_(), doc._repr_latex_()
    assert md == render_markdown(build("gru")) and md.count("$$") >= 12
    assert tex.startswith(r"$$\begin{aligned}") and tex.endswith(r"\end{aligned}$$") and r"\overline{{h^{t}}} &=" in tex
    assert "\n" not in tex  # one display: what a notebook's MathJax renders
    assert "gru" in repr(doc) and doc.tex == render_latex(build("gru"))
    unit = symrnn.derivation("elman", form="unit", time="index", rename={"s": "h"})
    assert "{h[t-1]}" in unit.tex and r"\delta_{li}" in unit.tex
    with pytest.raises(symrnn.UserError):
        symrnn.derivation("gru", form="matrix")


#: a nonlinearity of a sum that holds another nonlinearity (the textbook form failed on it)
NESTED = """\
[cell]
name = "random_cell"
[inputs]
x = "n_in"
[states]
h = "n_hidden"
[params]
W = ["n_hidden", "n_hidden"]
U = ["n_hidden", "n_in"]
b = ["n_hidden"]
[equations]
g = "sigmoid(2 + tanh(W @ h_prev + U @ x + b))"
h = "tanh(g * h_prev + U @ x)"
"""

#: a reduction of parameters alone (one number per cell, the same at every step), and in a
#: layer norm's operand: its size is the parameter's
PARAMETER_MEAN = """\
[cell]
name = "random_cell"
[inputs]
x = "n_in"
[states]
h = "n_hidden"
[params]
a = ["n_hidden"]
g = ["n_hidden"]
U = ["n_hidden", "n_hidden"]
b = ["n_hidden"]
[equations]
m = "mean(cos(a))"
v = "sin((m * g - mean(m * g)) * (mean((m * g - mean(m * g))**2) + 0.5)**-0.5)"
h = "tanh(U @ h_prev / (1 + sigmoid(m)) + v + b * h_prev)"
"""


@settings(max_examples=25, deadline=None, derandomize=True, phases=(Phase.explicit, Phase.generate),
          suppress_health_check=list(HealthCheck))
@given(text=spec_text())
@example(text=NESTED)
@example(text=PARAMETER_MEAN)
def test_random_cells_print_and_every_printed_formula_is_the_derivation(text):
    """Cells nobody wrote (tests/test_spec_random_cells.py's grammar: nonlinearities of
    sums of nonlinearities, products of gates, readouts, reductions over units) in both forms
    and formats, and the textbook form's formulas against the derivation, as for the built-in
    cells (those with reductions included)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SpecWarning)
        try:
            cell = parse_spec(text, "random_cell.toml")
        except UserError:
            assume(False)
    plan = build(cell)
    for form in ("vector", "unit"):
        assert "\\begin{document}" in render_latex(plan, Notation(form=form))
        assert "$$" in render_markdown(plan, Notation(form=form))
    module = load_module(render_numpy(plan), "random_cell")
    inst = Instance(plan, module, seed=7, steps=3, zero_states=False)
    formulas = vector_document_data(plan, Notation())["formulas"]
    unknown = 0
    for lhs, rhs in formulas:
        try:
            if lhs.kind == "sens" and lhs.wrt == "_theta":
                p = plan.graph.params[0]
                entries = tuple(sympy.Symbol(n, integer=True) for n in "ij"[: len(p.shape)])
                _check(inst, q("sens", lhs.qname, p.name, lhs.time, entries),
                       instantiate(rhs, p.name, entries, plan.graph), dict(zip("ij", [inst.size(s) for s in p.shape])))
            elif lhs.kind == "sens":
                _check(inst, lhs, rhs, dict(zip("ij", [inst.size(s) for s in plan.graph.param(lhs.wrt).shape])))
            else:
                _check(inst, lhs, rhs)
        except ShapeMismatch as err:
            # the one formula the evaluator cannot read: the sum (or logsumexp) over the units of a
            # value that is one number per row needs the number of units, which the formula does not
            # say; every other formula is checked
            if not re.fullmatch(r"(sum|logsumexp)\(\.\.\.\) reduces a vector over its units, not a number", str(err)):
                raise
            unknown += 1
    assert unknown < len(formulas)


#: a power with an expression as exponent inside a larger expression (the base in (0, 1))
NESTED_POWER = """\
[cell]
name = "nested_power"
[inputs]
x = "n_in"
[states]
h = "n_hidden"
[params]
W = ["n_hidden", "n_in"]
U = ["n_hidden", "n_hidden"]
b = ["n_hidden"]
[equations]
s = "sigmoid(W @ x + b)"
h = "0.5 * h_prev + tanh(U @ h_prev) * s ** (1 + softplus(b) * h_prev)"
"""


@pytest.mark.parametrize("cell", ["rg_lru", "nested_power"])
def test_a_power_prints_as_the_cell_writes_it(cell):
    plan = build(parse_spec(NESTED_POWER, "nested_power.toml") if cell == "nested_power" else cell)
    module = load_module(render_numpy(plan), module_name(plan.graph.cell))
    check_every_formula(plan, Instance(plan, module, seed=7, steps=4, zero_states=False))
    md, tex = render_markdown(plan), render_latex(plan)
    for doc in (md, tex):
        forward = doc.split("Reverse mode")[0]  # the equations and the nonlinearities' derivatives
        assert "Reverse mode" in doc and r"\exp" not in forward and r"\log" not in forward  # a^b, not exp(b log a)
    power = {"rg_lru": r"\left({a^{t}}\right)^{8 {r^{t}}}", "nested_power": r"\left({s^{t}}\right)^{"}[cell]
    assert power in md and power in tex
    assert r"\log\left(" in md  # d(a^b)/db = a^b log(a), in the adjoints
