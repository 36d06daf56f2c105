"""The command line under hostile or careless use: one line ``symrnn: error: ...``, exit
status 2, no traceback, nothing half-written; and the spelling that works where a rule
is broken.  (Issue "Trust": one line, never a traceback.)
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import sympy

import symrnn.lower
from conftest import ROOT
from symrnn import Cell, params, tanh
from symrnn.cli import main
from symrnn.errors import CellError
from symrnn.lower import lower
from symrnn.spec import MAX_EXPR_SIZE, SpecError, load_spec
from test_spec import BASE, line_of, spec

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
    "sqrt": ('h = "sqrt(a)"', "function 'sqrt' is not allowed", "write (a)**0.5"),
    "log of 1 + exp": ('h = "log(1 + exp(a))"', "function 'log' is not allowed", "; write softplus(a)"),
    "log": ('h = "log(h_prev)"', "function 'log' is not allowed", "there is no log; log(1 + exp(z)) is written softplus(z)"),
    "logistic": ('h = "logistic(a)"', "function 'logistic' is not allowed", "write sigmoid(a)"),
    "module function": ('h = "np.tanh(a)"', "'np.tanh' cannot be called", "write tanh(a)"),
    "transpose": ('h = "tanh(W.T @ h_prev)"', "'W.T': there is no transpose",
                  'W_T = ["n_in", "n_hidden"], and write W_T @ v'),
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
    (sympy.log, "function 'log' is not allowed (allowed: sigmoid, tanh, relu, softplus, exp, identity, step); "
                "there is no log; log(1 + exp(z)) is written softplus(z)"),
])
def test_python_api_a_sympy_function_says_what_to_write(function, message):
    x, h_prev, a = sympy.symbols("x h_prev a")
    (W,) = params("W")
    cell = Cell(name="api", inputs={"x": "n_in"}, states={"h": "n_hidden"}, params={"W": ("n_hidden", "n_hidden + n_in")},
                equations={"a": W @ (h_prev, x), "h": function(a)})
    with pytest.raises(CellError) as info:
        lower(cell)
    assert message in str(info.value)
