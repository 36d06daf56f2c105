"""User text in generated files: printed through an escaping function for each destination.

A cell's source and description may hold any printable text (quotes, backslashes,
LaTeX, HTML); the spec path in a "regenerate with" command anything a shell can pass.
None of it may change what a generated module, CUDA source or document does.
(Issue "Trust", item 2.)
"""

from __future__ import annotations

import ast
import re
import shutil
import subprocess

import pytest
import sympy

from symrnn import Cell, Loss, params, tanh
from symrnn.errors import UserError
from symrnn.render import BACKENDS
from symrnn.pipeline import build, compile_pdf, render_cuda, render_latex, render_markdown

HOSTILE = [
    '"""; import os; os.system("id"); """',
    "x\\",
    "'''\\n\\x00 ''' r\"\"\"",
    "# */ // --> <!-- -->",
    "\\def\\a{\\a}\\a",
    "x}\\AtBeginDocument{\\input{/etc/hostname}}%",
    "<script>alert(1)</script> <img src=x onerror=alert(1)>",
    "$x$ ^ { } _ ~ & % # | [a](http://x) *b* `c`",
    "Müller, Łukasz, 中文, 😀",
]


def cell(source: str = "benign", description: str = "benign") -> Cell:
    x, h_prev, h, y, target = sympy.symbols("x h_prev h y target")
    W, U, V = params("W U V")
    return Cell(
        name="hostile", source=source, description=description,
        inputs={"x": "n_in"}, states={"h": "n_hidden"},
        params={"W": ("n_hidden", "n_in"), "U": ("n_hidden", "n_hidden"), "V": ("n_out", "n_hidden")},
        equations={"h": tanh(W @ x + U @ h_prev)}, readout={"y": V @ h}, loss=Loss((y - target) ** 2),
    )


def statements(source: str) -> str:
    """The module's statements, docstrings and string constants left out (they may differ)."""
    tree = ast.parse(source)

    class Strip(ast.NodeTransformer):
        def visit_Constant(self, node):
            return ast.Constant("S") if isinstance(node.value, str) else node

    return ast.dump(Strip().visit(tree))


def c_tokens(source: str) -> list[str]:
    """The CUDA source without its comments, as tokens."""
    return re.sub(r"//[^\n]*", "", source).split()


@pytest.mark.parametrize("text", HOSTILE)
@pytest.mark.parametrize("render", [b.render for b in BACKENDS.values()], ids=list(BACKENDS))
def test_a_module_from_hostile_text_has_exactly_the_template_statements(text, render):
    benign = render(build(cell()))
    hostile = render(build(cell(text, text)), command=f"symrnn generate --spec '{text}\nimport os'")
    assert statements(hostile) == statements(benign)
    ast.parse(hostile)
    namespace: dict = {}
    exec(compile(hostile, "<hostile>", "exec"), namespace)  # it imports and defines what the contract says
    assert namespace["CELL"] == "hostile" and callable(namespace["RNN" if render is BACKENDS["torch"].render else "forward"])


@pytest.mark.parametrize("text", HOSTILE)
def test_cuda_source_from_hostile_text_has_exactly_the_template_code(text):
    benign = render_cuda(build(cell()))
    hostile = render_cuda(build(cell(text, text)), command=f"symrnn generate --spec '{text}\nint evil;'")
    assert c_tokens(hostile) == c_tokens(benign)
    assert all(not line.rstrip().endswith("\\") for line in hostile.splitlines())


@pytest.mark.parametrize("text", HOSTILE)
def test_markdown_from_hostile_text_has_no_html_and_no_markup(text):
    md = render_markdown(build(cell(text)), command=f"symrnn latex --spec '{text}' -->")
    prose = md.split("## 1. Symbols")[0]
    assert "<script" not in prose and "<img" not in prose
    comments = re.findall(r"<!--(.*?)-->", prose, flags=re.S)
    assert len(comments) == 2  # the two header comments, neither ended early
    body = re.sub(r"<!--.*?-->", "", prose, flags=re.S)
    assert "<" not in body and ">" not in body
    assert not re.search(r"(?<!\\)[$*`|]", body.split("Derived by symrnn from ")[1].split(". Every formula")[0])


@pytest.mark.parametrize("text", HOSTILE)
def test_latex_from_hostile_text_is_inert(text):
    tex = render_latex(build(cell(text)), command=f"symrnn latex --spec '{text}'")
    benign = render_latex(build(cell()), command="symrnn latex --spec 'benign'")
    author = re.search(r"\\author\{derived by symrnn from (.*)\}\n", tex).group(1)
    assert "\\input" not in author.replace("\\textbackslash{}input", "")
    assert tex.split("\\maketitle")[1] == benign.split("\\maketitle")[1]


needs_pdflatex = pytest.mark.skipif(shutil.which("pdflatex") is None, reason="pdflatex not installed")


@needs_pdflatex
def test_latex_from_all_hostile_text_compiles_and_leaks_no_file(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("TOPSECRET-42\n")
    text = " ".join(HOSTILE).replace("/etc/hostname", str(secret))
    pdf = compile_pdf(render_latex(build(cell(text[:500]))), tmp_path / "out.pdf")
    assert pdf.read_bytes().startswith(b"%PDF")
    if shutil.which("pdftotext"):
        shown = subprocess.run(["pdftotext", str(pdf), "-"], capture_output=True, text=True).stdout
        assert "TOPSECRET" not in shown


@needs_pdflatex
def test_pdflatex_reads_no_file_outside_its_folder(tmp_path):
    secret = tmp_path / "secret.tex"
    secret.write_text("TOPSECRET-42\n")
    raw = "\\documentclass{article}\\begin{document}\\input{" + str(secret) + "}\\end{document}\n"
    with pytest.raises(UserError, match="pdflatex failed"):
        compile_pdf(raw, tmp_path / "out.pdf")
    assert not (tmp_path / "out.pdf").exists()


@needs_pdflatex
def test_pdflatex_that_loops_forever_is_stopped(tmp_path):
    (tmp_path / "out.pdf").write_bytes(b"%PDF the user's")
    raw = "\\documentclass{article}\\begin{document}\\def\\a{\\a}\\a\\end{document}\n"
    with pytest.raises(UserError, match="did not finish within 3 s"):
        compile_pdf(raw, tmp_path / "out.pdf", timeout=3)
    assert (tmp_path / "out.pdf").read_bytes() == b"%PDF the user's"


@needs_pdflatex
def test_pdflatex_cannot_run_a_shell(tmp_path):
    canary = tmp_path / "PWNED"
    raw = ("\\documentclass{article}\\begin{document}\\immediate\\write18{touch " + str(canary) + "}x\\end{document}\n")
    compile_pdf(raw, tmp_path / "out.pdf")
    assert not canary.exists()


@needs_pdflatex
def test_every_character_of_latin_text_and_beyond_compiles(tmp_path):
    from symrnn.escape import bad_character, tex_text

    chars = [chr(c) for c in [*range(0x20, 0x250), 0x391, 0x3B1, 0x416, 0x5D0, 0x627, 0x4E2D, 0x1F600, 0x2211, 0x221E]]
    text = "".join(c for c in chars if bad_character(c) is None)
    body = "\n\n".join(tex_text(text[i:i + 60]) for i in range(0, len(text), 60))
    raw = "\\documentclass{article}\\begin{document}\n" + body + "\n\\end{document}\n"
    assert compile_pdf(raw, tmp_path / "chars.pdf").read_bytes().startswith(b"%PDF")
