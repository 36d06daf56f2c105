"""`symrnn check` on every valid cell: an input of the state's size, declared
initializers (parameters and initial states), and one diagnosis for a random
instance that is not finite."""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
import sympy

from symrnn import Cell, CellError, Init, Param, State, exp, params, parse_init, sigmoid, softplus
from symrnn.cells import builtin
from symrnn.cli import main
from symrnn.gradcheck import check_module, nonfinite, random_problem, report
from symrnn.lower import lower
from symrnn.pipeline import build, load_module, module_name, render_cupy, render_numpy
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
def test_an_input_of_the_state_size_is_checked():
    module = module_of(SRU)
    assert module.INPUT_SIZE == "n_hidden" and module.input_size(3, 4, 2) == 4
    problem = random_problem(module)
    assert problem.x.shape == (6, 3, 4)
    results = check_module(module)
    assert results and all(r.ok for r in results), report("sru", results)


def test_rg_lru_from_python_is_checked():
    module = module_of(rg_lru())
    assert module.INPUT_SIZE == "n_hidden" and module.PARAM_INITS == {"Lam": "uniform(4.3, 9.0)"}
    results = check_module(module, seed=2)
    assert all(r.ok for r in results), report("rg_lru", results)


def test_check_command_on_an_input_of_the_state_size(tmp_path, capsys):
    code, out, err = run(capsys, "check", "--spec", spec_file(tmp_path, SRU))
    assert code == 0 and "all checks passed" in out and not err


def test_every_builtin_module_says_its_input_size(module):
    fixed = module.FIXED_DIMS
    n_in, n_hidden, n_out = fixed.get("n_in", 3), fixed.get("n_hidden", 4), fixed.get("n_out", 2)
    # rg_lru (Griffin's RG-LRU) reads an input of the state's width, every other built-in cell n_in
    declared = "n_hidden" if module.CELL == "rg_lru" else "n_in"
    assert module.INPUT_SIZE == (declared if "n_in" not in fixed else str(fixed["n_in"]))
    width = {"n_in": n_in, "n_hidden": n_hidden}[declared]
    assert module.input_size(n_in, n_hidden, n_out) == width
    outputs, _ = module.forward(module.init_params(n_in, n_hidden, n_out), np.ones((2, 1, width)))
    assert set(outputs) == set(module.OUTPUTS)


def test_an_input_of_a_fixed_size_is_checked():
    text = SRU.replace('x = "n_hidden"', "x = 3").replace('W = ["n_hidden", "n_hidden"]', 'W = ["n_hidden", 3]')
    text = text.replace('(1 - r) * x"', '(1 - r) * c"').replace("W_f @ x", "W_f @ h_prev").replace("W_r @ x", "W_r @ h_prev")
    module = module_of(text)
    assert module.INPUT_SIZE == "3" and module.input_size(7, 4) == 3
    assert all(r.ok for r in check_module(module))


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


# -- 2. declared initializers: the generated modules ---------------------------------
def test_builtin_init_params_are_pytorch_s_draws_in_declaration_order(module):
    """The same generator calls as before inits could be declared: one uniform(-b, b)
    per parameter, b = 1/sqrt(n_hidden), in declaration order; a parameter a built-in cell
    declares an init for is drawn as it declares, in its place (rg_lru's Lambda: a uniform draw),
    or is a constant (layer_norm_lstm's gains, 1, and bias, 0), which draws nothing."""
    fixed = module.FIXED_DIMS
    sizes = fixed.get("n_in", 3), fixed.get("n_hidden", 5), fixed.get("n_out", 2)
    assert all(re.fullmatch(r"constant\([\d.]+\)|uniform\(.*, .*\)", text) for text in module.PARAM_INITS.values()), \
        module.PARAM_INITS
    assert module.STATE_INITS == {}
    rng = np.random.default_rng(7)
    bound = 1.0 / np.sqrt(sizes[1])

    def draw(k, s):
        init = module.PARAM_INITS.get(k, "")
        if init.startswith("constant("):
            return np.full(s, float(init[9:-1]), np.float32)
        low, high = map(float, re.fullmatch(r"uniform\((.*), (.*)\)", init).groups()) if init else (-bound, bound)
        return rng.uniform(low, high, s).astype(np.float32)

    expected = {k: draw(k, s) for k, s in module.param_shapes(*sizes).items()}
    got = module.init_params(*sizes, seed=7, dtype=np.float32)
    assert list(got) == list(expected) and all(np.array_equal(got[k], expected[k]) for k in got)
    zeros = module.init_state0(2, *sizes)
    assert set(zeros) == set(module.STATES) and all(not v.any() for v in zeros.values())


def test_declared_inits_are_drawn_by_init_params():
    text = (LRU.replace('B_x = ["n_hidden", "n_in"]', 'B_x = { shape = ["n_hidden", "n_in"], init = "normal(0, 0.01)" }')
            .replace('V = ["n_out", "n_hidden"]', 'V = { shape = ["n_out", "n_hidden"], init = "constant(0.25)" }'))
    module = module_of(text)
    assert module.PARAM_INITS == {"nu": "uniform(0.001, 0.1)", "B_x": "normal(0, 0.01)", "V": "constant(0.25)"}
    p = module.init_params(3, 50, 2, seed=1)
    assert p["nu"].min() >= 0.001 and p["nu"].max() < 0.1
    assert abs(p["B_x"].std() - 0.01) < 0.002 and np.all(p["V"] == 0.25)
    rng = np.random.default_rng(1)  # in declaration order; constant draws nothing
    assert np.array_equal(p["nu"], rng.uniform(0.001, 0.1, (50,))) and np.array_equal(p["B_x"], rng.normal(0, 0.01, (50, 3)))
    assert "bound" not in render_numpy(build(parse_spec(text, "lru.toml")))  # every parameter is declared
    s0 = module_of(RMS).init_state0(4, 3, 5, seed=2, dtype=np.float32)
    assert s0["v"].shape == (4, 5) and s0["v"].dtype == np.float32 and 0.5 <= s0["v"].min() and s0["v"].max() < 1.5
    assert not s0["h"].any()


def test_the_cupy_module_draws_what_the_numpy_module_draws(tmp_path, monkeypatch):
    from host_cupy import host_cupy

    monkeypatch.setitem(__import__("sys").modules, "cupy", host_cupy(tmp_path))
    for cell in (parse_spec(LRU, "lru.toml"), parse_spec(RMS, "rms.toml"), rg_lru(), builtin("lstm_torch")):
        plan = build(cell)
        ref, cu = load_module(render_numpy(plan), cell.name), load_module(render_cupy(plan), cell.name + "_cupy")
        assert (cu.INPUT_SIZE, cu.PARAM_INITS, cu.STATE_INITS) == (ref.INPUT_SIZE, ref.PARAM_INITS, ref.STATE_INITS)
        for dtype in (np.float32, np.float64):
            a, b = ref.init_params(3, 4, 2, seed=5, dtype=dtype), cu.init_params(3, 4, 2, seed=5, dtype=dtype)
            assert list(a) == list(b) and all(np.array_equal(a[k], b[k]) and b[k].dtype == dtype for k in a), cell.name
            a, b = ref.init_state0(2, 3, 4, 2, seed=5, dtype=dtype), cu.init_state0(2, 3, 4, 2, seed=5, dtype=dtype)
            assert list(a) == list(b) and all(np.array_equal(a[k], b[k]) for k in a), cell.name


# -- 3. the random instance lies inside the declared ranges ---------------------------
def test_random_problem_draws_inside_the_declared_ranges_and_doubles_the_rest():
    module = module_of(LRU)
    problem = random_problem(module, seed=4)
    default = module.init_params(3, 4, 2, seed=4)
    assert np.array_equal(problem.params["nu"], default["nu"]) and 0.001 <= problem.params["nu"].min()
    assert problem.params["nu"].max() < 0.1
    for k in ("B_x", "V"):  # undeclared: as strongly as the built-in cells are checked
        assert np.array_equal(problem.params[k], 2.0 * default[k])
    problem = random_problem(module_of(RMS), seed=4, B=5)
    assert 0.5 <= problem.state0["v"].min() and problem.state0["v"].max() < 1.5 and problem.state0["v"].shape == (5, 4)
    assert problem.state0["h"].min() < 0  # undeclared: 0.5 N(0, 1), as before


# -- 4, 5. a domain the check must respect; one diagnosis when it is not finite ---------
@pytest.mark.parametrize("bare, declared, output", [(LRU_BARE, LRU, "h"), (RMS_BARE, RMS, "h")], ids=["lru", "rms_normaliser"])
def test_check_fails_without_the_declared_range_and_passes_with_it(bare, declared, output, tmp_path, capsys):
    results = check_module(module_of(bare))
    assert len(results) == 1 and not results[0].ok
    name = parse_spec(bare, "x.toml").name
    assert results[0].detail == (f"cell '{name}': the random instance gives non-finite outputs (first at step t = 0, "
                                 f"output '{output}'); declare an init range for its parameters (or initial states), "
                                 "e.g. init = \"uniform(0.9, 0.999)\", see docs/spec-format.md")
    code, out, err = run(capsys, "check", "--spec", spec_file(tmp_path, bare))
    assert code == 1 and out.count("FAIL") == 1 and "non-finite outputs" in out and "RuntimeWarning" not in err
    results = check_module(module_of(declared))
    assert all(r.ok for r in results) and len(results) > 5
    code, out, _ = run(capsys, "check", "--spec", spec_file(tmp_path, declared))
    assert code == 0 and "all checks passed" in out


def test_a_declared_range_that_is_not_enough_is_named():
    module = module_of(LRU.replace('init = "uniform(0.001, 0.1)"', 'init = "uniform(-0.5, 0.1)"'))
    (result,) = check_module(module)
    assert "non-finite outputs" in result.detail and "its declared inits do not keep it finite; narrow them" in result.detail


def test_a_non_finite_loss_is_diagnosed_once():
    text = LRU + '\n[loss]\nexpr = "exp(1000 * (y - target)**2)"\n'
    module = module_of(text)
    problem = random_problem(module)
    assert nonfinite(module, problem).startswith("cell 'lru': the random instance gives a non-finite loss (inf); ")
    (result,) = check_module(module)
    assert not result.ok and math.isinf(result.error)
    text = report("lru", [result])
    assert text.splitlines() == ["cell lru", "  FAIL: " + result.detail, "  0 passed, 1 failed"]


def test_a_finite_instance_has_no_diagnosis(module):
    assert nonfinite(module, random_problem(module, seed=1)) is None


def test_the_cupy_module_runs_an_input_of_the_state_size(tmp_path, monkeypatch):
    """SRU's CuPy module (its CUDA source compiled for the host) on x of n_hidden columns."""
    from host_cupy import host_cupy
    from symrnn.gradcheck import rel_error

    monkeypatch.setitem(__import__("sys").modules, "cupy", host_cupy(tmp_path))
    plan = build(parse_spec(SRU, "sru.toml"))
    ref, cu = load_module(render_numpy(plan), "sru"), load_module(render_cupy(plan), "sru_cupy")
    problem = random_problem(ref, seed=1)
    out_ref, cache_ref = ref.forward(problem.params, problem.x, problem.state0)
    out, cache = cu.forward(problem.params, problem.x, problem.state0)
    grads_ref, grads = ref.backward(problem.params, cache_ref, problem.grad_outputs), cu.backward(problem.params, cache, problem.grad_outputs)
    errors = {k: rel_error(out[k], out_ref[k]) for k in out_ref} | {"d_" + k: rel_error(grads[k], grads_ref[k]) for k in grads_ref}
    assert max(errors.values()) <= 1e-10, errors
