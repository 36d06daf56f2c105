"""Equations files (TOML specs): parsing, the CLI's --spec, and one test per bad input.

Every bad-input case runs the command line in-process and asserts: exit status 2
(0 for the two warnings), one line naming the file and the line, no traceback,
and an output folder left exactly as it was.
"""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import sympy

from conftest import ROOT
from symrnn import Cell, Loss, params, sigmoid, tanh
from symrnn.cells import SPEC_CELLS, builtin, spec_path
from symrnn.cli import main
from symrnn.pipeline import build, render_numpy
from symrnn.spec import SpecError, SpecWarning, load_spec, parse_spec

BASE = """\
# a toy cell for the error tests
[cell]
name = "toy"

[inputs]
x = "n_in"

[states]
h = "n_hidden"

[params]
W = ["n_hidden", "n_in"]
U = ["n_hidden", "n_hidden"]
b = ["n_hidden"]

[equations]
a = "W @ x + U @ h_prev + b"
h = "tanh(a)"
"""


def spec(tmp_path: Path, text: str, name: str = "toy.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def line_of(text: str, marker: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), start=1) if marker in line)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def out(tmp_path) -> Path:
    """An output folder that already holds a module and the package file."""
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "__init__.py").write_text("MODULES = ('old_numpy',)\n")
    (folder / "old_numpy.py").write_text("# the user's module\n")
    return folder


ERRORS = {
    "toml_syntax": (BASE.replace('h = "tanh(a)"', 'h = "tanh(a)'), 'h = "tanh(a)', "not valid TOML"),
    "unknown_symbol": (BASE.replace("U @ h_prev", "U @ h_prv"), "h_prv", "unknown symbol 'h_prv' (did you mean 'h_prev'?)"),
    "state_without_update": (BASE.replace('h = "tanh(a)"\n', ""), 'h = "n_hidden"',
                             "state 'h' has no update equation"),
    "matvec_columns": (BASE.replace("W @ x + U @ h_prev", "U @ x + W @ h_prev"), "U @ x",
                       "U has n_hidden columns but the vector has x (n_in)"),
    "elementwise_sizes": (BASE.replace('b = ["n_hidden"]', 'b = ["n_out"]'), "a = ",
                          "elementwise operation on vectors of different sizes"),
    "reduction_of_another_size": (BASE.replace("U @ h_prev + b", "U @ h_prev + b + sqrt(mean(x**2))"), "a = ",
                                  "(computed from mean(x**2), a reduction: it is one value repeated over the units of what it "
                                  "reduces, and keeps that size; beside a product W @ v, scale the product's operand instead"),
    "function_not_allowed": (BASE.replace("tanh(a)", "sinh(a)"), "sinh(a)", "function 'sinh' is not allowed (allowed: sigmoid, tanh,"),
    "circular": (BASE.replace("+ b\"", "+ b + g\"\ng = \"2 * a\""), "a = ", "circular definition: a -> g -> a"),
    "abs_not_differentiable": (BASE.replace("tanh(a)", "tanh(abs(a))"), "abs(a)", "abs is not differentiable at 0"),
    "sign_not_differentiable": (BASE.replace("tanh(a)", "sign(a) * a"), "sign(a)", "sign is not differentiable at 0"),
}


@pytest.mark.parametrize("command", ["generate", "check", "latex", "show"])
@pytest.mark.parametrize("case", sorted(ERRORS))
def test_bad_spec_is_one_line_with_place_and_status_2(case, command, tmp_path, out, capsys, monkeypatch):
    text, marker, message = ERRORS[case]
    path = spec(tmp_path, text)
    monkeypatch.chdir(out)  # latex writes into the current folder by default
    before = snapshot(out)
    argv = [command, "--spec", str(path)] + (["--out", str(out)] if command == "generate" else [])
    code = main(argv)
    _, err = capsys.readouterr()
    assert code == 2
    assert err.count("\n") == 1 and err.startswith(f"symrnn: error: {path}:{line_of(text, marker)}")
    assert message in err
    assert "Traceback" not in err
    assert snapshot(out) == before


def test_the_column_is_named_where_an_expression_is_wrong(tmp_path):
    text = ERRORS["abs_not_differentiable"][0]
    path = spec(tmp_path, text)
    line = line_of(text, "abs(a)")
    col = text.splitlines()[line - 1].index("abs(a)") + 1
    with pytest.raises(SpecError, match=rf"^{path}:{line}:{col}: cell 'toy', equation 'h': abs is not differentiable at 0; "
                                        r"for a smooth absolute value write \(a\*\*2 \+ 1e-6\)\*\*0\.5"):
        load_spec(path)


@pytest.mark.parametrize("case", ["toml_syntax", "unknown_symbol"])
def test_console_has_no_traceback(case, tmp_path, out):
    text, marker, message = ERRORS[case]
    path = spec(tmp_path, text)
    before = snapshot(out)
    proc = subprocess.run([sys.executable, "-m", "symrnn", "generate", "--spec", str(path), "--out", str(out)],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"symrnn: error: {path}:{line_of(text, marker)}") and message in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1
    assert snapshot(out) == before


WARNINGS = {
    "unused_parameter": (BASE.replace('b = ["n_hidden"]', 'b = ["n_hidden"]\nV = ["n_out", "n_hidden"]'), "V = ",
                         "cell 'toy': parameter 'V' is declared and never used"),
    "not_recurrent": (BASE.replace("W @ x + U @ h_prev + b", "W @ x + U @ x2 + b").replace('U = ["n_hidden", "n_hidden"]', 'U = ["n_hidden", "n_in"]')
                      .replace("x2", "x"), 'h = "tanh(a)"',
                      "cell 'toy', equation 'h': the update of state 'h' reads no state at t-1 (h_prev), so it is not recurrent"),
}


@pytest.mark.parametrize("case", sorted(WARNINGS))
def test_warnings_are_one_line_and_do_not_stop_generation(case, tmp_path, out, capsys):
    text, marker, message = WARNINGS[case]
    path = spec(tmp_path, text)
    code = main(["generate", "--spec", str(path), "--out", str(out)])
    _, err = capsys.readouterr()
    assert code == 0
    assert err == f"symrnn: warning: {path}:{line_of(text, marker)}: {message}\n"
    assert (out / "toy_numpy.py").is_file() and (out / "old_numpy.py").read_text() == "# the user's module\n"
    with pytest.warns(SpecWarning, match="parameter 'V'|not recurrent"):
        load_spec(path)


@pytest.mark.parametrize(
    "change, marker, message",
    [
        (("[equations]", "[equation]"), "[equation]", "unknown table (did you mean 'equations'?)"),
        (('W = ["n_hidden", "n_in"]', 'W = "n_hidden"'), "W = ", "expected a shape"),
        (('h = "tanh(a)"', "h = 3"), "h = 3", "expected an expression in quotes"),
        (('h = "tanh(a)"', 'h = "tanh(a) ^ 2"'), 'h = "tanh', "use ** for powers"),
        (('h = "tanh(a)"', 'h = "tanh(a) ** U"'), 'h = "tanh', "matrix 'U' can only multiply a vector"),
        (('h = "tanh(a)"', 'h = "(-2) ** a"'), 'h = "(-2)', "a power with an expression as exponent needs a positive base"),
        (('h = "tanh(a)"', 'h = "tanh(a, a)"'), 'h = "tanh', "tanh(...) takes exactly one argument"),
        (('h = "tanh(a)"', 'h = "tanh(a) + target"'), 'h = "tanh', "'target' is only available in the loss"),
        (('h = "tanh(a)"', 'h = "tanh(x @ W)"'), 'h = "tanh', "the left of @ must be a parameter matrix"),
        (('h = "tanh(a)"', 'h = "tanh((a, x))"'), 'h = "tanh', "a tuple (a, b) is only allowed after @"),
        (('h = "tanh(a)"', 'h = "tanh"'), 'h = "tanh', "'tanh' is a function; write tanh(...)"),
        (('h = "tanh(a)"', 'h = "tanh(a) * U"'), 'h = "tanh', "matrix 'U' can only multiply a vector"),
        (('h = "tanh(a)"', 'h_prev = "tanh(a)"'), "h_prev = ", "'h_prev' is the value of state 'h' at t-1"),
        (('name = "toy"', 'name = "toy cell"'), "name = ", "not a valid cell name"),
        (("[equations]", "[constants]\nb = 1.0\n[equations]"), "b = 1.0", "'b' is already the name of"),
        (("[equations]", "[constants]\nk = \"two\"\n[equations]"), "k = ", "expected a number"),
    ],
)
def test_more_bad_input_names_the_line(change, marker, message, tmp_path):
    text = BASE.replace(*change)
    with pytest.raises(SpecError) as info:
        load_spec(spec(tmp_path, text))
    assert str(info.value).startswith(f"{tmp_path / 'toy.toml'}:{line_of(text, marker)}")
    assert message in str(info.value)


def test_missing_file_and_missing_table(tmp_path, capsys):
    assert main(["show", "--spec", str(tmp_path / "nope.toml")]) == 2
    assert "spec file" in capsys.readouterr().err
    with pytest.raises(SpecError, match=r"missing table \[equations\]"):
        parse_spec(BASE.split("[equations]")[0], "t.toml")


def test_nothing_in_the_file_is_executed(tmp_path):
    canary = tmp_path / "canary"
    for expr in (f"__import__('os').system('touch {canary}')", "(lambda: 1)()", "x.__class__", "[x for x in h_prev]"):
        text = BASE.replace('"tanh(a)"', repr(expr).replace("'", '"') if "'" not in expr else f"'{expr}'")
        with pytest.raises(SpecError, match=r"toy.toml:\d+"):
            parse_spec(text, "toy.toml")
    assert not canary.exists()


def test_equations_in_any_order_and_over_several_lines():
    ordered = parse_spec(BASE, "a.toml")
    text = BASE.replace('a = "W @ x + U @ h_prev + b"\nh = "tanh(a)"', 'h = "tanh(a)"\na = """\nW @ x\n  + U @ h_prev\n  + b"""')
    shuffled = parse_spec(text, "b.toml")
    assert list(shuffled.equations) == ["a", "h"]
    assert render_numpy(build(shuffled)) == render_numpy(build(ordered))
    with pytest.raises(SpecError, match=rf"b.toml:{line_of(text, '+ U @')}:\d+: .*unknown symbol 'h_prv'"):
        parse_spec(text.replace("U @ h_prev", "U @ h_prv"), "b.toml")


def test_constants_and_set(tmp_path, capsys):
    path = spec_path("lstm_forget_bias")
    assert sympy.Float(1.0) in builtin("lstm_forget_bias").equations["f"].atoms(sympy.Float)
    two = load_spec(path, {"forget_bias": 2.5})
    assert sympy.Float(2.5) in two.equations["f"].atoms(sympy.Float)
    with pytest.raises(SpecError, match="no constant 'forget_bais' to set .did you mean 'forget_bias'"):
        load_spec(path, {"forget_bais": 2.0})
    assert main(["generate", "--spec", str(path), "--set", "forget_bias=2.5", "--out", str(tmp_path)]) == 0
    text = (tmp_path / "lstm_forget_bias_numpy.py").read_text()
    assert "np.negative(pre_f + 2.5, out=f)  # eq:lstm_forget_bias:f" in text
    assert f"symrnn generate --spec {path} --set forget_bias=2.5" in text.splitlines()[2]
    assert main(["generate", "--set", "forget_bias=2", "--out", str(tmp_path)]) == 2
    assert "give --spec FILE" in capsys.readouterr().err


def test_generate_check_latex_show_accept_a_spec_beside_built_in_names(tmp_path, capsys):
    path = spec(tmp_path, BASE)
    assert main(["generate", "elman", "--spec", str(path), "--out", str(tmp_path / "gen")]) == 0
    assert sorted(p.name for p in (tmp_path / "gen").glob("*.py")) == ["__init__.py", "elman_numpy.py", "toy_numpy.py"]
    header = (tmp_path / "gen" / "toy_numpy.py").read_text().splitlines()[:3]
    assert header[0].startswith("# Generated by symrnn from the cell 'toy' (user-defined)")
    assert header[2] == f"#     symrnn generate --spec {path}"
    capsys.readouterr()
    assert main(["check", "--spec", str(path)]) == 0
    out = capsys.readouterr().out
    assert "cell toy" in out and "all checks passed" in out and "cell elman" not in out
    assert main(["show", "mgu", "--spec", str(path)]) == 0
    out = capsys.readouterr().out
    assert "cell mgu  (Zhou et al. 2016)" in out and "step     a = b + U @ h_prev + W @ x" in out
    assert f"spec file: {spec_path('mgu')} (copy it to start a variant)" in out
    assert main(["latex", "--spec", str(path), "--format", "md", "-o", "-"]) == 0
    assert f"<!-- Regenerate with: symrnn latex --spec {path} --format md -o docs/derivations -->" in capsys.readouterr().out
    assert main(["show", "--spec", str(path), "--spec", str(path)]) == 2
    assert "two cells are named 'toy'" in capsys.readouterr().err
    assert main(["show"]) == 2


# -- the shipped spec files -----------------------------------------------------------


@pytest.mark.parametrize("name", SPEC_CELLS)
def test_shipped_spec_cites_its_reference_and_is_named_like_its_file(name):
    text = spec_path(name).read_text()
    header = text.split("[cell]")[0]
    assert "Reference:" in header and any(str(year) in header for year in range(1990, 2030))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no unused parameter, every state recurrent
        assert load_spec(spec_path(name)).name == name


def test_shipped_specs_are_listed():
    listed = [line.split()[0] for line in subprocess.run(
        [sys.executable, "-m", "symrnn", "list"], capture_output=True, text=True, cwd=ROOT, check=True).stdout.splitlines()]
    assert set(SPEC_CELLS) <= set(listed)


# -- the same cell through the Python API gives the same module, byte for byte ----------

x, h_prev, c_prev, h, c, y, target = sympy.symbols("x h_prev c_prev h c y target")


def mgu_api() -> Cell:
    f, h_tilde = sympy.symbols("f h_tilde")
    W_f, b_f, W_h, b_h, V, b_y = params("W_f b_f W_h b_h V b_y")
    return Cell(
        name="mgu", source="Zhou et al. 2016",
        description="f = sigma(W_f [h_{t-1}; x_t] + b_f), h~ = tanh(W_h [f h_{t-1}; x_t] + b_h), "
        "h = (1 - f) h + f h~; y = V h + b_y",
        inputs={"x": "n_in"}, states={"h": "n_hidden"},
        params={"W_f": ("n_hidden", "n_hidden + n_in"), "b_f": ("n_hidden",), "W_h": ("n_hidden", "n_hidden + n_in"),
                "b_h": ("n_hidden",), "V": ("n_out", "n_hidden"), "b_y": ("n_out",)},
        equations={"f": sigmoid(W_f @ (h_prev, x) + b_f), "h_tilde": tanh(W_h @ (f * h_prev, x) + b_h),
                   "h": (1 - f) * h_prev + f * h_tilde},
        readout={"y": V @ h + b_y},
        loss=Loss((y - target) ** 2 / 2, reduction="mean"),
    )


def lstm_forget_bias_api() -> Cell:
    i, f, g, o = sympy.symbols("i f g o")
    W_i, W_f, W_g, W_o, b_i, b_f, b_g, b_o, V, b_y = params("W_i W_f W_g W_o b_i b_f b_g b_o V b_y")
    hx = (h_prev, x)
    return Cell(
        name="lstm_forget_bias", source="Jozefowicz et al. 2015",
        description="LSTM with f = sigma(W_f [h; x] + b_f + forget_bias); y = V h + b_y, "
        "L = mean over t of (y - target)^2 / 2",
        inputs={"x": "n_in"}, states={"h": "n_hidden", "c": "n_hidden"},
        params={**{f"W_{k}": ("n_hidden", "n_hidden + n_in") for k in "ifgo"}, **{f"b_{k}": ("n_hidden",) for k in "ifgo"},
                "V": ("n_out", "n_hidden"), "b_y": ("n_out",)},
        equations={"i": sigmoid(W_i @ hx + b_i), "f": sigmoid(W_f @ hx + b_f + 1.0), "g": tanh(W_g @ hx + b_g),
                   "o": sigmoid(W_o @ hx + b_o), "c": f * c_prev + i * g, "h": o * tanh(c)},
        readout={"y": V @ h + b_y},
        loss=Loss((y - target) ** 2 / 2, reduction="mean"),
    )


@pytest.mark.parametrize("api", [mgu_api, lstm_forget_bias_api], ids=lambda f: f.__name__)
def test_python_api_and_spec_file_give_identical_modules(api):
    from_api = render_numpy(build(api()))
    from_spec = render_numpy(build(load_spec(spec_path(api().name))))
    assert from_api == from_spec
    assert from_spec == (ROOT / "generated" / f"{api().name}_numpy.py").read_text()


# -- built-in cells written in Python, written again as spec files: the same module ------

PYTHON_BUILTINS_AS_SPECS = {
    # scalars ([]), fixed dimensions, a readout and a mean loss
    "single_sigmoid": '''
[cell]
name = "single_sigmoid"
source = "seed 002"
description = "one sigmoid hidden unit: a = w x + v h^{t-1} + b, h = sigma(a), y = u h + d; L = mean over time of (target - y)^2 / 2"
dims = { n_in = 1, n_hidden = 1, n_out = 1 }
[inputs]
x = "n_in"
[states]
h = "n_hidden"
[params]
w = []
v = []
b = []
u = []
d = []
[equations]
a = "w * x + v * h_prev + b"
h = "sigmoid(a)"
[readout]
y = "u * h + d"
[loss]
expr = "(target - y)**2 / 2"
reduction = "mean"
''',
    # row blocks ({ shape, blocks }), W[k] @ x and b[k]
    "gru_torch": '''
[cell]
name = "gru_torch"
source = "PyTorch nn.GRU"
description = "gates r, z, n stacked in that order; reset applied after the recurrent product, h = (1 - z) n + z h"
[inputs]
x = "n_in"
[states]
h = "n_hidden"
[params]
weight_ih_l0 = { shape = ["3*n_hidden", "n_in"], blocks = 3 }
weight_hh_l0 = { shape = ["3*n_hidden", "n_hidden"], blocks = 3 }
bias_ih_l0 = { shape = ["3*n_hidden"], blocks = 3 }
bias_hh_l0 = { shape = ["3*n_hidden"], blocks = 3 }
[equations]
r = "sigmoid(weight_ih_l0[0] @ x + bias_ih_l0[0] + weight_hh_l0[0] @ h_prev + bias_hh_l0[0])"
z = "sigmoid(weight_ih_l0[1] @ x + bias_ih_l0[1] + weight_hh_l0[1] @ h_prev + bias_hh_l0[1])"
n = "tanh(weight_ih_l0[2] @ x + bias_ih_l0[2] + r * (weight_hh_l0[2] @ h_prev + bias_hh_l0[2]))"
h = "(1 - z) * n + z * h_prev"
''',
    # a concatenation with an operand computed in the step, equations out of order
    "gru": '''
[cell]
name = "gru"
source = "seed 003"
description = "GRU: (z; r) = sigma(W_rz [h_{t-1}; x_t] + b_rz), h~ = tanh(W_h [r h_{t-1}; x_t] + b_h), h = (1 - z) h + z h~"
[inputs]
x = "n_in"
[states]
h = "n_hidden"
[params]
W_rz = { shape = ["2*n_hidden", "n_hidden + n_in"], blocks = 2 }
b_rz = { shape = ["2*n_hidden"], blocks = 2 }
W_h = ["n_hidden", "n_hidden + n_in"]
b_h = ["n_hidden"]
[equations]
h = "(1 - z) * h_prev + z * h_tilde"
z = "sigmoid(W_rz[0] @ (h_prev, x) + b_rz[0])"
h_tilde = "tanh(W_h @ (r * h_prev, x) + b_h)"
r = "sigmoid(W_rz[1] @ (h_prev, x) + b_rz[1])"
''',
}


@pytest.mark.parametrize("name", sorted(PYTHON_BUILTINS_AS_SPECS))
def test_python_built_ins_written_as_spec_files_give_the_same_module(name):
    cell = parse_spec(PYTHON_BUILTINS_AS_SPECS[name], f"{name}.toml")
    assert render_numpy(build(cell)) == (ROOT / "generated" / f"{name}_numpy.py").read_text()
