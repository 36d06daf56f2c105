"""LaTeX export: every document compiles with pdflatex and prints the derivation's own objects."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest

import symrnn.pipeline
from symrnn.cli import main
from symrnn.latex import DerivationLatexPrinter, Notation
from symrnn.pipeline import build, render_latex

PDFLATEX = shutil.which("pdflatex")
UNIT = Notation(form="unit")


def compile_tex(tex: str, folder) -> str:
    """Run pdflatex; return its log.  pdflatex is required (.ci/run installs it)."""
    assert PDFLATEX, "pdflatex is missing: apt-get install texlive-latex-base texlive-latex-recommended"
    (folder / "doc.tex").write_text(tex)
    proc = subprocess.run([PDFLATEX, "-interaction=nonstopmode", "-halt-on-error", "doc.tex"],
                          cwd=folder, capture_output=True, text=True, errors="replace")
    log = (folder / "doc.log").read_text(errors="replace")
    assert proc.returncode == 0, "\n".join(line for line in log.splitlines() if line.startswith("!"))
    return log


@pytest.mark.parametrize("form", ["vector", "unit"])
@pytest.mark.parametrize("time", ["super", "index"])
def test_document_compiles_cleanly(cell_name, time, form, tmp_path):
    """Every built-in document, in both forms and both time notations: no error, no undefined
    control sequence, no line (equation, table row) wider than the text, no duplicate label."""
    log = compile_tex(render_latex(build(cell_name), Notation(time=time, form=form)), tmp_path)
    assert "Undefined control sequence" not in log
    assert not re.search(r"^!", log, re.M)
    widths = [float(w) for w in re.findall(r"Overfull \\hbox \(([\d.]+)pt too wide\)", log)]
    assert not widths, f"lines run off the page by {max(widths)}pt"
    assert "multiply defined" not in log


def test_formulas_are_the_derivation_objects():
    plan = build("single_sigmoid")
    tex = render_latex(plan, UNIT)
    printer = DerivationLatexPrinter(plan)
    for param in ("w", "v", "b"):  # seed 002's three recursions, printed from the same objects
        sens = plan.derivation.sensitivity("h", param)
        assert printer.doprint(sens.lhs) in tex
        assert f"eq:single_sigmoid:rtrl:h:{param}" in tex
    # dL/dy^t: seed 002's -(y^t - yhat^t), here (y - target) / T with the mean over time
    assert r"\frac{1}{T}\frac{\partial L^{t}}{\partial {y^{t}}}" in tex
    assert r"\frac{\partial L}{\partial d}" in tex and r"\frac{\partial L}{\partial u}" in tex


def test_elman_forward_sensitivity_for_U_is_in_the_seed_form():
    tex = render_latex(build("elman"), UNIT)
    assert r"\delta_{il}" in tex or r"\delta_{li}" in tex  # x_j delta_li
    assert r"\sum_{m_{1}=0}^{n_{\mathrm{hidden}} - 1}" in tex  # sum_m w_lm ds^{t-1}_m / du_ij


def test_api_equals_cli(tmp_path, capsys):
    import symrnn

    plan = build("gru")
    assert symrnn.derivation("gru").tex == render_latex(plan)
    assert main(["latex", "gru", "-o", str(tmp_path / "gru.tex")]) == 0
    assert (tmp_path / "gru.tex").read_text() == render_latex(plan)


def test_pdf_export(tmp_path, capsys):
    assert PDFLATEX
    out = tmp_path / "lstm.pdf"
    assert main(["latex", "lstm", "--format", "pdf", "-o", str(out)]) == 0
    assert out.read_bytes().startswith(b"%PDF")


def test_failed_pdf_keeps_the_users_file(tmp_path, capsys, monkeypatch):
    out = tmp_path / "elman.pdf"
    out.write_bytes(b"the user's pdf")
    broken = r"\documentclass{article}\begin{document}\undefinedmacro\end{document}"
    monkeypatch.setattr(symrnn.pipeline, "render_latex", lambda plan, notation=None: broken)
    assert main(["latex", "elman", "--format", "pdf", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "pdflatex failed" in err and "Undefined control sequence" in err and err.count("\n") == 1
    assert out.read_bytes() == b"the user's pdf"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elman.pdf"]


@pytest.mark.parametrize("argv, message", [
    (["latex", "lstn"], "unknown cell 'lstn'"),
    (["latex", "elman", "--format", "docx"], "invalid choice: 'docx'"),
    (["latex", "elman", "-o", "/no/such/folder/e.tex"], "folder '/no/such/folder' does not exist"),
    (["latex", "elman", "--format", "pdf", "-o", "-"], "cannot be written to standard output"),
])
def test_latex_bad_input(capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_committed_markdown_is_up_to_date(cell_name, root):
    from symrnn.pipeline import render_markdown

    path = root / "docs" / "derivations" / f"{cell_name}.md"
    assert path.exists() and path.read_text() == render_markdown(build(cell_name)), (
        f"{path} is stale; run: symrnn latex --format md -o docs/derivations"
    )


def test_markdown_has_the_same_formulas_as_latex():
    from symrnn.pipeline import render_markdown

    plan = build("elman")
    tex, md = render_latex(plan, UNIT), render_markdown(plan, UNIT)
    for line in tex.splitlines():
        if line.startswith(r"\frac{\partial {{s^{t}}_{l}}}{\partial {u}_{i,j}}"):
            assert line in md
            break
    else:
        pytest.fail("no sensitivity of s w.r.t. U in the LaTeX document")


def test_generated_code_cites_labels_the_document_defines(cell_name):
    """From a code line to its equation: every '# eq:...' in the module is a \\label in the .tex."""
    from conftest import rendered

    cited = set(re.findall(r"# (eq:[\w:]+)", rendered(cell_name)))
    defined = set(re.findall(r"\\(?:also)?label\{(eq:[\w:]+)\}", render_latex(build(cell_name))))
    assert any(":adj:" in c for c in cited) and any(":adj:" not in c for c in cited)
    assert cited <= defined, sorted(cited - defined)


def test_renamed_state_compiles(tmp_path):
    """Seed 000 calls the state s, seed 004 calls it h: the document can use either."""
    tex = render_latex(build("elman"), Notation(time="index", rename=(("s", "h"),)))
    assert "{h[t-1]}" in tex and "{s[t" not in tex
    assert r"\label{eq:elman:rtrl:s:U}" in tex  # labels stay those the code cites
    compile_tex(tex, tmp_path)


def test_sums_that_multiply_are_parenthesized():
    from symrnn.pipeline import render_markdown

    md = render_markdown(build("lstm"), UNIT)
    # the adjoint through g = tanh(...): (1 - g^2) times the adjoint of g, never 1 - g^2 * adjoint
    assert r"&= \left(1 - \left({g^{t}}\right)^{2}\right)\, \overline{{g^{t}}}" in md
    assert not re.search(r"&= 1 - \\left\([^&]*?\\right\)\^\{2\}\\, \\overline", md)  # the bug this guards
    assert r"n_{hidden} \times \left(n_{hidden} + n_{in}\right)" in md  # W_f's shape
    # M: 4 matrix products of n_hidden x (n_hidden + n_in), and 3 n_hidden elementwise products
    assert r"M &= 4 n_{hidden}^{2} + 4 n_{hidden} n_{in} + 3 n_{hidden}" in md
    vector = render_markdown(build("lstm"))
    assert r"\odot \left(1 - \left({g^{t}}\right)^{2}\right) \odot" in vector


@pytest.mark.parametrize("time, initial", [("super", "{s^{-1}}"), ("index", "{s[-1]}")])
def test_sensitivity_recursions_start_at_step_minus_one(time, initial):
    """The initial condition of each recursion is at t = -1 in either time notation (it
    said s[t] = 0 in the index notation)."""
    from symrnn.latex import Notation

    tex = render_latex(build("elman"), Notation(time=time, form="unit"))
    assert f"\\frac{{\\partial {{{initial}_{{l}}}}}}{{\\partial {{u}}_{{i,j}}}} = 0" in tex
