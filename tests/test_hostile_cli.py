"""The command line under hostile or careless use: one line ``symrnn: error: ...``, exit
status 2, no traceback, nothing half-written; and the spelling that works where a rule
is broken.  (Issue "Trust": one line, never a traceback.)
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import sympy

import symrnn
import symrnn.lower
from conftest import ROOT
from symrnn import Cell, params, tanh
from symrnn.cli import EXIT_BROKEN_PIPE, EXIT_TERMINATED, MAX_CHECK_ENTRIES, main
from symrnn.errors import CellError
from symrnn.lower import lower
from symrnn.spec import MAX_EXPR_SIZE, SpecError, load_spec
from test_spec import BASE, line_of, spec

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

EQUATION = 'a = "W @ x + U @ h_prev + b"'


def with_equation(rhs: str) -> str:
    """BASE with equation 'a' replaced."""
    return BASE.replace(EQUATION, f'a = "{rhs}"')


def nested(open_: str, inner: str, close: str, n: int) -> str:
    return open_ * n + inner + close * n


# -- expressions too big or too deep for Python's parser or SymPy ------------------------
HUGE = {
    "10,000-term sum": (" + ".join(["h_prev"] * 10_000), "too big or nested too deeply to read"),
    "5,000 unary minuses": ("- " * 5000 + "h_prev", "too big or nested too deeply to read"),
    "100,000 minus signs": ("-" * 100_000 + "h_prev", "too big or nested too deeply to read"),  # MemoryError in ast
    "300 nested parentheses": (nested("(", "h_prev", ")", 300), "too many nested parentheses"),
    "60 nested products": (nested("b * (h_prev + ", "h_prev", ")", 60), "nested more than 50"),
    "80 unary minuses": ("- " * 80 + "h_prev", "nested more than 50"),
    "60 nested tanh": (nested("tanh(", "h_prev", ")", 60), "nested more than 50"),
    "2,500-term sum": (" + ".join(["h_prev"] * 2500), f"at most {MAX_EXPR_SIZE} are allowed"),
}


@pytest.mark.parametrize("case", HUGE)
def test_a_huge_or_deep_expression_is_one_line_naming_file_line_and_limit(case, tmp_path, capsys):
    rhs, message = HUGE[case]
    text = with_equation(rhs)
    path = spec(tmp_path, text)
    assert main(["show", "--spec", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"symrnn: error: {path}:{line_of(text, 'a = ')}")
    assert message in err and "cell 'toy', equation 'a'" in err


def test_a_10000_term_sum_gives_no_traceback_in_a_real_process(tmp_path):
    path = spec(tmp_path, with_equation(HUGE["10,000-term sum"][0]))
    proc = subprocess.run([sys.executable, "-m", "symrnn", "check", "--spec", str(path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr


@pytest.mark.parametrize("rhs, expected", [(" + ".join(["b * h_prev"] * 900), "900*b*h_prev"),
                                           (" * ".join(["h_prev", "b"] * 700), "b**700*h_prev**700")])
def test_long_flat_sums_and_products_within_the_limit_are_read(rhs, expected, tmp_path):
    cell = load_spec(spec(tmp_path, with_equation(f"W @ x + U @ h_prev + ({rhs})")))
    assert expected in str(cell.equations["a"])


def deep_cell(n: int) -> Cell:
    x, h_prev = sympy.symbols("x h_prev")
    W, U = params("W U")
    e = W @ x + U @ h_prev
    for _ in range(n):
        e = tanh(e)
    return Cell(name="deep", inputs={"x": "n_in"}, states={"h": "n_hidden"},
                params={"W": ("n_hidden", "n_in"), "U": ("n_hidden", "n_hidden")}, equations={"h": e})


def test_python_api_a_very_deep_expression_is_a_cell_error():
    with pytest.raises(CellError, match=r"^cell 'deep', equation 'h': the expression is nested more than 50 levels"):
        lower(deep_cell(5000))


def test_python_api_a_recursion_error_while_lowering_is_a_cell_error(monkeypatch):
    monkeypatch.setattr(symrnn.lower, "MAX_DEPTH", 10**6)  # past the depth check: SymPy itself recurses too deep
    with pytest.raises(CellError, match=r"^cell 'deep', equation 'h': the expression is nested too deeply for SymPy"):
        lower(deep_cell(5000))


def test_python_api_expressions_under_the_limit_lower():
    assert len(lower(deep_cell(40)).nodes) > 40


# -- a rule broken: the message offers the spelling that works ----------------------------
SPELLINGS = {
    "rsqrt": ('h = "rsqrt(a)"', "function 'rsqrt' is not allowed", "write (a)**-0.5"),
    "log1p": ('h = "log1p(a)"', "function 'log1p' is not allowed", "write log(1 + a)"),
    "abs": ('h = "abs(a)"', "abs is not differentiable at 0", "write (a**2 + 1e-6)**0.5"),
    "logistic": ('h = "logistic(a)"', "function 'logistic' is not allowed", "write sigmoid(a)"),
    "module function": ('h = "np.tanh(a)"', "'np.tanh' cannot be called", "write tanh(a)"),
    "transpose alone": ('h = "tanh(U.T * a)"', "'U.T': a transpose can only multiply a vector", "write U.T @ v"),
    "vector before @": ('h = "tanh(a * U @ h_prev)"', "reads as (a * U) @ h_prev", "write a * (U @ h_prev)"),
    "xor as power": ('h = "tanh(a) ^ 2"', "^ is not a power", "write tanh(a)**2"),
    "xor on a sum": ('h = "tanh(a + h_prev ^ 2)"', "^ is not a power", "write (a + h_prev)**2"),
    "attribute": ('h = "tanh(a.real)"', "'a.real': attributes are not allowed", "allowed: names, numbers"),
}


@pytest.mark.parametrize("case", SPELLINGS)
def test_a_refused_spelling_comes_with_one_that_works(case, tmp_path):
    new, rule, spelling = SPELLINGS[case]
    text = BASE.replace('h = "tanh(a)"', new)
    with pytest.raises(SpecError) as info:
        load_spec(spec(tmp_path, text))
    assert rule in str(info.value) and spelling in str(info.value)


SCALARS = {
    "scalar @": ('a = "w @ h_prev + b"', "'w' is a scalar, not a matrix; a scalar scales every unit: write w * v"),
    "vector @": ('a = "b @ h_prev"', "'b' is a vector, not a matrix; a vector multiplies a vector elementwise "
                 "(a diagonal matrix): write b * v"),
    "no vector": ('a = "w * 2"', "2*w has no vector in it, so its size is unknown; a scalar parameter scales a vector "
                  "(write w * h_prev), or declare 'w' as a vector"),
    "a number": ('a = "3"', "3 has no vector in it, so its size is unknown; a number scales a vector, e.g. 3 * h_prev"),
}


@pytest.mark.parametrize("case", SCALARS)
def test_a_scalar_where_a_vector_or_matrix_is_needed_says_what_to_write(case, tmp_path):
    new, message = SCALARS[case]
    text = BASE.replace(EQUATION, new).replace('b = ["n_hidden"]', 'b = ["n_hidden"]\nw = []')
    text = text.replace('h = "tanh(a)"', 'h = "tanh(a + U @ h_prev + W @ x + b + w)"')
    with pytest.raises(SpecError) as info:
        load_spec(spec(tmp_path, text))
    assert message in str(info.value)


@pytest.mark.parametrize("function, message", [
    (sympy.tanh, "tanh(a) is SymPy's tanh, not symrnn's: write symrnn.tanh(a) (from symrnn import tanh)"),
    (sympy.log, "log(a) is SymPy's log, not symrnn's: write symrnn.log(a) (from symrnn import log)"),
    (sympy.sinh, "function 'sinh' is not allowed (allowed: sigmoid, tanh, relu, softplus, exp, identity, step, log, sqrt, "
                 "sin, cos)"),
])
def test_python_api_a_sympy_function_says_what_to_write(function, message):
    x, h_prev, a = sympy.symbols("x h_prev a")
    (W,) = params("W")
    cell = Cell(name="api", inputs={"x": "n_in"}, states={"h": "n_hidden"}, params={"W": ("n_hidden", "n_hidden + n_in")},
                equations={"a": W @ (h_prev, x), "h": function(a)})
    with pytest.raises(CellError) as info:
        lower(cell)
    assert message in str(info.value)


# -- standard output: a closed pipe is silence, a full disk one line ----------------------
def symrnn_process(*argv: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "symrnn", *argv], cwd=ROOT, timeout=300, **kwargs)


@pytest.mark.parametrize("argv", [["list"], ["show", "lstm", "gru"], ["--help"], ["--version"]])
def test_a_closed_pipe_ends_quietly(argv):
    read, write = os.pipe()
    os.close(read)  # the reader is gone before the first byte: every write meets a closed pipe
    try:
        proc = symrnn_process(*argv, stdout=write, stderr=subprocess.PIPE, text=True)
    finally:
        os.close(write)
    assert proc.returncode == EXIT_BROKEN_PIPE and proc.stderr == ""


def test_head_of_the_list_in_a_shell_pipe():
    """The command of the issue; whether the pipe is closed before the last write is a race
    (the test above closes it first)."""
    script = f"set -o pipefail; {sys.executable} -m symrnn list | head -1"
    proc = subprocess.run(["bash", "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode in (0, EXIT_BROKEN_PIPE) and proc.stderr == ""
    assert proc.stdout.count("\n") == 1 and proc.stdout.startswith("elman ")


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
@pytest.mark.parametrize("argv", [["list"], ["show", "lstm"], ["check", "single_sigmoid"], ["latex", "elman", "-o", "-"],
                                  ["--version"]])
def test_a_full_device_on_standard_output_is_one_line(argv):
    with open("/dev/full", "w") as full:
        proc = symrnn_process(*argv, stdout=full, stderr=subprocess.PIPE, text=True)
    assert proc.returncode == 2
    assert proc.stderr == "symrnn: error: cannot write to standard output: No space left on device\n"


# -- SIGTERM while writing: the temporary file is removed, the user's file kept -----------
CHILD = """
import os, sys, time
from pathlib import Path

real_replace = os.replace

def slow_replace(src, dst):  # the temporary file is written: tell the test, then wait for SIGTERM
    Path(sys.argv[1]).write_text(str(src))
    time.sleep(120)
    real_replace(src, dst)

os.replace = slow_replace
from symrnn.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize("command, written", [("generate", "elman_numpy.py"), ("latex", "elman.tex")])
def test_sigterm_while_writing_leaves_no_temporary_file(command, written, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / written).write_text("the user's file\n")
    marker = tmp_path / "writing"
    argv = [command, "elman", "--out" if command == "generate" else "-o", str(out)]
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(marker), *argv], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert marker.exists(), proc.communicate(timeout=10)
        assert Path(marker.read_text()).is_file()  # mid-write: the temporary file is there
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == EXIT_TERMINATED and err == "symrnn: terminated\n"
    assert sorted(p.name for p in out.iterdir()) == [written]
    assert (out / written).read_text() == "the user's file\n"


# -- check: an instance too big to allocate is refused before it is ---------------------
HUGE_CELL = BASE.replace('name = "toy"', 'name = "toy"\ndims = { n_hidden = 100000 }')


def test_check_refuses_an_instance_too_big_for_memory(tmp_path, capsys):
    assert main(["check", "--spec", str(spec(tmp_path, HUGE_CELL))]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert "cell 'toy' is too big to check: with n_hidden = 100000 fixed by the cell" in err
    assert f"at most {MAX_CHECK_ENTRIES:,}" in err


def test_check_runs_a_cell_that_fixes_a_real_size(tmp_path, capsys):
    text = BASE.replace('name = "toy"', 'name = "toy"\ndims = { n_hidden = 20 }')
    assert main(["check", "--spec", str(spec(tmp_path, text))]) == 0
    assert "all checks passed" in capsys.readouterr().out


def test_check_out_of_memory_is_one_line(monkeypatch, capsys):
    import symrnn.gradcheck

    def exhausted(module, seed=0):
        raise MemoryError()

    monkeypatch.setattr(symrnn.gradcheck, "check_module", exhausted)
    assert main(["check", "single_sigmoid"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "check: cell 'single_sigmoid': out of memory while checking" in err


# -- --rename: a name of the cell, shown as no other ---------------------------------------
@pytest.mark.parametrize("renames, message", [
    (["nosuch=q"], "--rename nosuch=q: cell 'elman' has no name 'nosuch'; its names: x, s, s_prev, U, W, V, z, y"),
    (["s=x"], "--rename s=x: cell 'elman' already has a name 'x' (the input), so the document would show both as x"),
    (["z=s_prev"], "--rename z=s_prev: cell 'elman' already has a name 's_prev' (state 's' at t-1)"),
    (["s=q", "U=q"], "--rename s=q and --rename U=q: two names of cell 'elman' would be shown as q"),
    (["s=h", "W=h_prev"], "--rename s=h and --rename W=h_prev: two names of cell 'elman' would be shown as h_prev"),
    (["s_prev=q"], "'s_prev' is state 's' at t-1, written with the state's name; rename the state: --rename s=q"),
    (["s=q", "s=r"], "'s' is renamed twice (s=q and s=r)"),
    (["s=h\u00e9"], "--rename 's=h\u00e9': expected NAME=SHOWN, each of ASCII letters, digits and _"),
    (["\u0161=h"], "expected NAME=SHOWN"),
    (["s=h!"], "expected NAME=SHOWN"),
    (["s="], "expected NAME=SHOWN"),
])
def test_a_rename_that_cannot_work_is_one_line(renames, message, tmp_path, capsys):
    argv = ["latex", "elman", "-o", str(tmp_path / "elman.tex")]
    for item in renames:
        argv += ["--rename", item]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert list(tmp_path.iterdir()) == []


def test_a_rename_among_several_cells_must_name_one_of_them(tmp_path, capsys):
    assert main(["latex", "elman", "lstm", "--rename", "hh=q", "-o", str(tmp_path)]) == 2
    assert "none of the 2 cells exported has a name 'hh' (did you mean 'h'?)" in capsys.readouterr().err


@pytest.mark.parametrize("renames", [["s=h"], ["s=x", "x=s"], ["s=h", "z=a"]])
def test_renames_that_keep_names_apart_are_written(renames, capsys):
    argv = ["latex", "elman", "-o", "-"]
    for item in renames:
        argv += ["--rename", item]
    assert main(argv) == 0
    assert r"\begin{document}" in capsys.readouterr().out


# -- the version ---------------------------------------------------------------------------
def test_version_is_printed_and_matches_the_package():
    proc = symrnn_process("--version", capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout == f"symrnn {symrnn.__version__}\n" and proc.stderr == ""
    assert symrnn.__version__ == tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


# -- a newcomer's first look -----------------------------------------------------------------
def test_help_of_the_package_is_short_and_every_name_stays_importable():
    import pydoc

    text = pydoc.render_doc(symrnn, renderer=pydoc.plaintext)
    # a few hundred lines: the API classes (Cell, Param, State, Init, Loss, UserError); one SymPy class adds thousands
    assert len(text.splitlines()) <= 600, "help(symrnn) documents a SymPy class again (thousands of lines)"
    assert "The API, by task" in text and "load_spec" in text
    for name in ("Block", "MatVec", "ParamSymbol", "CellError", "InternalError", "SpecError", "SpecWarning",
                 *symrnn.OPS, *symrnn.__all__):
        assert hasattr(symrnn, name), name


def test_the_license_is_the_one_pyproject_names():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    text = (ROOT / "LICENSE").read_text()
    assert project["license"] == {"text": "MIT"}
    assert text.startswith("MIT License\n\nCopyright (c) 2026 the symrnn authors\n")
    assert "THE SOFTWARE IS PROVIDED \"AS IS\", WITHOUT WARRANTY OF ANY KIND" in text
