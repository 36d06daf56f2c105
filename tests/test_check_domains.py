"""`symrnn check` on every valid cell: an input of the state's size, declared
initializers (parameters and initial states), and one diagnosis for a random
instance that is not finite."""

from __future__ import annotations

import re

import numpy as np
import pytest
import sympy

from symrnn import Cell, CellError, Init, Param, State, exp, params, parse_init, sigmoid, softplus
from symrnn.cli import main
from symrnn.lower import lower
from symrnn.pipeline import build, load_module, module_name, render_numpy
from symrnn.spec import SpecError, load_spec, parse_spec

# -- cells --------------------------------------------------------------------------
#: simple recurrent unit (Lei et al. 2018): the highway (1 - r) * x needs x of the state's size
SRU = """\
[cell]
name = "sru"

[inputs]
x = "n_hidden"

[states]
c = "n_hidden"
h = "n_hidden"

[params]
W = ["n_hidden", "n_hidden"]
W_f = ["n_hidden", "n_hidden"]
b_f = ["n_hidden"]
W_r = ["n_hidden", "n_hidden"]
b_r = ["n_hidden"]

[equations]
f = "sigmoid(W_f @ x + b_f)"
r = "sigmoid(W_r @ x + b_r)"
c = "f * c_prev + (1 - f) * (W @ x)"
h = "r * tanh(c) + (1 - r) * x"
"""

#: a linear recurrent unit with a decay lam = exp(-nu) and the input gain sqrt(1 - lam^2):
#: nu > 0 is needed (lam < 1); nu in [0.001, 0.1) is lam in (0.905, 0.999]
LRU = """\
[cell]
name = "lru"

[inputs]
x = "n_in"

[states]
h = "n_hidden"

[params]
nu = { shape = ["n_hidden"], init = "uniform(0.001, 0.1)" }
B_x = ["n_hidden", "n_in"]
V = ["n_out", "n_hidden"]

[equations]
lam = "exp(-nu)"
h = "lam * h_prev + (1 - lam**2)**0.5 * (B_x @ x)"

[readout]
y = "V @ h"
"""
LRU_BARE = LRU.replace('nu = { shape = ["n_hidden"], init = "uniform(0.001, 0.1)" }', 'nu = ["n_hidden"]')

#: a running variance v of the pre-activation normalises it: v must start >= 0
RMS = """\
[cell]
name = "rms_rnn"

[inputs]
x = "n_in"

[states]
v = { size = "n_hidden", init = "uniform(0.5, 1.5)" }
h = "n_hidden"

[params]
W = ["n_hidden", "n_in"]
U = ["n_hidden", "n_hidden"]
W_f = ["n_hidden", "n_in"]
b_f = ["n_hidden"]

[equations]
a = "W @ x + U @ h_prev"
f = "sigmoid(W_f @ x + b_f)"
v = "f * v_prev + (1 - f) * a**2"
h = "tanh(a / (v + 0.001)**0.5)"
"""
RMS_BARE = RMS.replace('v = { size = "n_hidden", init = "uniform(0.5, 1.5)" }', 'v = "n_hidden"')


def rg_lru(init: bool = True) -> Cell:
    """Griffin's RG-LRU (De et al. 2024) in the Python API: x has the state's size, and
    a = sigmoid(Lam)^(8 r) is written exp(-8 r softplus(-Lam)); Lam is declared so that
    a^8 lies in about (0.9, 0.999)."""
    x, h_prev, r, i, a = sympy.symbols("x h_prev r i a")
    W_a, b_a, W_x, b_x, Lam = params("W_a b_a W_x b_x Lam")
    return Cell(
        name="rg_lru", inputs={"x": "n_hidden"}, states={"h": State("n_hidden", init="uniform(-0.5, 0.5)")},
        params={"W_a": ("n_hidden", "n_hidden"), "b_a": ("n_hidden",), "W_x": ("n_hidden", "n_hidden"),
                "b_x": ("n_hidden",), "Lam": Param(("n_hidden",), init="uniform(4.3, 9.0)" if init else None)},
        equations={"r": sigmoid(W_a @ x + b_a), "i": sigmoid(W_x @ x + b_x), "a": exp(-8 * r * softplus(-Lam)),
                   "h": a * h_prev + (1 - a**2) ** 0.5 * (i * x)},
    )


def module_of(cell: Cell | str):
    cell = parse_spec(cell, "cell.toml") if isinstance(cell, str) else cell
    return load_module(render_numpy(build(cell)), module_name(cell.name))


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def spec_file(tmp_path, text: str, name: str = "cell.toml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def line_of(text: str, fragment: str) -> int:
    return next(n for n, line in enumerate(text.splitlines(), start=1) if fragment in line)


# -- 1. the input's size -----------------------------------------------------------


_USES_N_IN = SRU.replace('b_r = ["n_hidden"]', 'b_r = ["n_hidden"]\nP = ["n_in", "n_hidden"]\nQ = ["n_hidden", "n_in"]').replace(
    'h = "r * tanh(c) + (1 - r) * x"', 'h = "r * tanh(c + Q @ (P @ h_prev)) + (1 - r) * x"')


@pytest.mark.parametrize("text, message", [
    (SRU.replace('name = "sru"', 'name = "sru"\ndims = { n_in = 2 }'), "the input has size n_hidden, but dims fixes n_in = 2"),
    (_USES_N_IN, "the input has size n_hidden, but n_in appears in params['P']"),
    (SRU.replace('x = "n_hidden"', 'x = "n_hidden + n_in"').replace('["n_hidden", "n_hidden"]', '["n_hidden", "n_hidden + n_in"]')
     .replace("(1 - r) * x", "(1 - r) * c"), "the input has size n_hidden + n_in"),
], ids=["fixed_n_in", "n_in_in_a_shape", "n_in_in_the_input"])
def test_an_input_size_the_module_cannot_read_is_refused(text, message):
    """A generated module takes n_in from x's width: an input that is not n_in, with n_in
    used elsewhere, would give a module that rejects its own parameters."""
    with pytest.raises(SpecError) as info:
        parse_spec(text, "sru.toml")
    assert str(info.value).startswith(f"sru.toml:{line_of(text, 'x = ')}: cell 'sru', inputs['x']: ")
    assert message in str(info.value) and "\n" not in str(info.value)


# -- 2. declared initializers: the syntax --------------------------------------------
@pytest.mark.parametrize("text, shown, code", [
    ("uniform(0.9, 0.999)", "uniform(0.9, 0.999)", "rng.uniform(0.9, 0.999, s)"),
    ("normal(0, 1/sqrt(n_hidden))", "normal(0, 1 / sqrt(n_hidden))", "rng.normal(0, 1 / np.sqrt(n_hidden), s)"),
    ("constant(1.0)", "constant(1.0)", "np.full(s, 1.0)"),
    (" uniform( -1/sqrt(n_hidden) ,1e-1 ) ", "uniform(-1 / sqrt(n_hidden), 0.1)", "rng.uniform(-1 / np.sqrt(n_hidden), 0.1, s)"),
    ("uniform(-sqrt(6 / (n_in + n_hidden)), sqrt(6 / (n_in + n_hidden)))",
     "uniform(-sqrt(6 / (n_in + n_hidden)), sqrt(6 / (n_in + n_hidden)))",
     "rng.uniform(-np.sqrt(6 / (n_in + n_hidden)), np.sqrt(6 / (n_in + n_hidden)), s)"),
])
def test_inits_that_work(text, shown, code):
    init = parse_init(text)
    assert init.text == shown and init.code("s") == code


BAD_INITS = [
    ("uniform(0.999, 0.9)", "needs low < high, got low = 0.999, high = 0.9"),
    ("uniform(1, 1)", "needs low < high"),
    ("uniform(0.5 - 1/sqrt(n_hidden), 0.1)", "needs low < high for every size"),
    ("normal(0, 0)", "needs std > 0, got std = 0"),
    ("normal(0, n_hidden - 1)", "needs std > 0 for every size"),
    ("uniform(0.9)", "uniform takes 2 arguments (low, high)"),
    ("uniform(low=0.9, high=1)", "written in order without names"),
    ("beta(1, 2)", "unknown initializer 'beta' (allowed: uniform, normal, constant)"),
    ("uniform(0, 1/(n_hidden - 1))", "divides by n_hidden - 1, which may be 0"),
    ("uniform(0, sqrt(-1))", "of a value that may be negative"),
    ("uniform(0, 1e999)", "is not a finite number"),
    ("constant(1e300 * 1e300)", "is not a finite number"),
    ("uniform(0, 2**3)", "is not allowed in an argument"),
    ("uniform(0, h)", "unknown name 'h'"),
    ("uniform(0, 1) + 1", "is not allowed"),
    ("uniform(0, 1", "cannot be read"),
    ("constant(True)", "is not allowed in an argument"),
    ("uniform(0, (1).real)", "is not allowed in an argument"),
    ("uniform(0, " + "1 + " * 60 + "1)", "is too long"),
]


@pytest.mark.parametrize("table", ["params", "states"])
@pytest.mark.parametrize("init, message", BAD_INITS)
def test_a_bad_init_is_one_line_naming_the_file_and_line(table, init, message, tmp_path):
    if table == "params":
        old, new = 'nu = { shape = ["n_hidden"], init = "uniform(0.001, 0.1)" }', f'nu = {{ shape = ["n_hidden"], init = "{init}" }}'
        text, where = LRU.replace(old, new), "params['nu']"
    else:
        old, new = 'v = { size = "n_hidden", init = "uniform(0.5, 1.5)" }', f'v = {{ size = "n_hidden", init = "{init}" }}'
        text, where = RMS.replace(old, new), "states['v']"
    assert text != (LRU if table == "params" else RMS)
    path = spec_file(tmp_path, text)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    error = str(info.value)
    assert error.startswith(f"{path}:{line_of(text, init)}: cell '") and f"{where}: init " in error
    assert message in error and "\n" not in error


@pytest.mark.parametrize("init", ["__import__('os').system('touch {canary}')", "uniform(0, __import__('os').system('touch {canary}'))",
                                  "uniform(0, [c for c in ()])"])
def test_an_init_is_never_evaluated(init, tmp_path, capsys):
    canary = tmp_path / "PWNED"
    init = init.format(canary=canary)
    text = LRU.replace('init = "uniform(0.001, 0.1)"', f'init = "{init}"')
    out = tmp_path / "out"
    code, _, err = run(capsys, "generate", "--spec", spec_file(tmp_path, text), "--out", str(out))
    assert code == 2 and err.count("\n") == 1 and err.startswith("symrnn: error: ") and "init" in err
    assert not canary.exists() and not out.exists()


@pytest.mark.parametrize("old, new, message", [
    ('init = "uniform(0.001, 0.1)"', "init = 0.5", "init: expected an initializer in quotes, such as init = \"uniform(0.9, 0.999)\", \"normal(0, 0.1)\" or \"constant(1.0)\", got a number"),
    ('init = "uniform(0.001, 0.1)"', 'init = "uniform(0.001, 0.1)", scale = 2', "unknown key 'scale'"),
    ('h = "n_hidden"', 'h = { init = "uniform(0, 1)" }', 'expected a size such as "n_hidden", or { size = '),
    ('h = "n_hidden"', 'h = { size = "n_hidden", init = ["uniform(0, 1)"] }', "expected an initializer in quotes"),
    ('h = "n_hidden"', 'h = { size = "n_hidden", start = 1 }', "unknown key 'start'"),
])
def test_bad_init_tables_name_the_line(old, new, message, tmp_path):
    text = LRU.replace(old, new)
    assert text != LRU
    with pytest.raises(SpecError) as info:
        parse_spec(text, "lru.toml")
    assert str(info.value).startswith(f"lru.toml:{line_of(text, new[:6])}: [") and message in str(info.value)


def test_the_python_api_declares_inits():
    good = lower(rg_lru())
    assert good.param("Lam").init == parse_init("uniform(4.3, 9.0)") and good.states[0].init.text == "uniform(-0.5, 0.5)"
    cell = rg_lru()
    again = Cell(**{**cell.__dict__, "params": {**cell.params, "Lam": Param(("n_hidden",), init=Init("uniform", ("4.3", "9.0")))}})
    assert lower(again).param("Lam").init == good.param("Lam").init
    for bad, where in ((Param(("n_hidden",), init="uniform(9.0, 4.3)"), "params['Lam']"),
                       (Param(("n_hidden",), init=(4.3, 9.0)), "params['Lam']"),
                       (Param(("n_hidden",), init=Init("eval", ("1",))), "params['Lam']")):
        broken = Cell(**{**cell.__dict__, "params": {**cell.params, "Lam": bad}})
        with pytest.raises(CellError, match=re.escape(f"cell 'rg_lru', {where}: ")):
            lower(broken)
    broken = Cell(**{**cell.__dict__, "states": {"h": State("n_hidden", init="normal(0, -1)")}})
    with pytest.raises(CellError, match=re.escape("cell 'rg_lru', states['h']: init 'normal(0, -1)': needs std > 0")):
        lower(broken)


def test_show_prints_the_declared_inits(tmp_path, capsys):
    code, out, _ = run(capsys, "show", "--spec", spec_file(tmp_path, RMS))
    assert code == 0 and "init: v ~ uniform(0.5, 1.5)" in out
