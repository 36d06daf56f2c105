"""Reductions over units (mean, sum, logsumexp; symrnn.reductions) through every layer: the
spec reader and the Python API, derivation (finite differences, BPTT = RTRL), the NumPy
module, the CuPy module's kernels compiled for the host (bit-identical reruns), the
documents, and the softmax cross-entropy loss in float32 at logits ~1e3.  The layer-norm
GRU and the RMSNorm cell below are written in the syntax of docs/spec-format.md as someone
else would write them; the built-in cells' torch oracles are in tests/test_spec_torch.py."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import sympy

from cupy_support import TOL
from host_cupy import host_cupy
from symrnn import Cell, Loss, Param, logsumexp, mean, params, sum_units, tanh
from symrnn.errors import UserError
from symrnn.gradcheck import check_module, random_problem, rel_error
from symrnn.ir import Reduction
from symrnn.passes import ALL
from symrnn.pipeline import build, load_module, render_cupy, render_markdown, render_numpy
from symrnn.spec import parse_spec

from conftest import ROOT

#: layer-normalized GRU (per gate, over its n_hidden units), gains and biases; haste's
#: LayerNormGRU normalizes the stacked projections, this one each gate's
LN_GRU = """\
[cell]
name = "ln_gru"
source = "Ba et al. 2016"
[inputs]
x = "n_in"
[states]
h = "n_hidden"
[params]
W = { shape = ["3*n_hidden", "n_in"], blocks = 3 }
R = { shape = ["3*n_hidden", "n_hidden"], blocks = 3 }
gx = { shape = ["3*n_hidden"], blocks = 3, init = "constant(1)" }
gr = { shape = ["3*n_hidden"], blocks = 3, init = "constant(1)" }
b = { shape = ["3*n_hidden"], blocks = 3 }
[constants]
eps = 1e-5
[equations]
ax_z = "W[0] @ x"
ax_r = "W[1] @ x"
ax_n = "W[2] @ x"
ah_z = "R[0] @ h_prev"
ah_r = "R[1] @ h_prev"
ah_n = "R[2] @ h_prev"
lx_z = "gx[0] * (ax_z - mean(ax_z)) * (mean((ax_z - mean(ax_z))**2) + eps)**-0.5"
lx_r = "gx[1] * (ax_r - mean(ax_r)) * (mean((ax_r - mean(ax_r))**2) + eps)**-0.5"
lx_n = "gx[2] * (ax_n - mean(ax_n)) * (mean((ax_n - mean(ax_n))**2) + eps)**-0.5"
lh_z = "gr[0] * (ah_z - mean(ah_z)) * (mean((ah_z - mean(ah_z))**2) + eps)**-0.5"
lh_r = "gr[1] * (ah_r - mean(ah_r)) * (mean((ah_r - mean(ah_r))**2) + eps)**-0.5"
lh_n = "gr[2] * (ah_n - mean(ah_n)) * (mean((ah_n - mean(ah_n))**2) + eps)**-0.5"
z = "sigmoid(lx_z + lh_z + b[0])"
r = "sigmoid(lx_r + lh_r + b[1])"
n = "tanh(lx_n + r * lh_n + b[2])"
h = "z * h_prev + (1 - z) * n"
"""

#: RMSNorm (Zhang and Sennrich 2019) of an Elman cell's pre-activation, with a softmax readout
RMS_ELMAN = """\
[cell]
name = "rms_elman"
source = "Zhang and Sennrich 2019"
[inputs]
x = "n_in"
[states]
h = "n_hidden"
[params]
W = ["n_hidden", "n_in"]
U = ["n_hidden", "n_hidden"]
g = { shape = ["n_hidden"], init = "constant(1)" }
V = ["n_out", "n_hidden"]
[equations]
a = "W @ x + U @ h_prev"
h = "tanh(g * a * (mean(a**2) + 1e-6)**-0.5)"
[readout]
z = "V @ h"
logp = "z - logsumexp(z)"
[loss]
expr = "-target * logp"
target_of = "logp"
"""

#: the sum over units and a reduction of a state and of the input (wrapped in nodes of their own)
SUMS = """\
[cell]
name = "sums"
[inputs]
x = "n_hidden"
[states]
h = "n_hidden"
[params]
U = ["n_hidden", "n_hidden"]
b = ["n_hidden"]
[equations]
s = "sum(h_prev * x) / 4"
h = "tanh(U @ h_prev + s * b + mean(x) - logsumexp(h_prev))"
"""

#: reductions of values that are the same at every unit (their softmax weight is 1/n at each;
#: the NumPy module keeps such values as (B, 1): a random cell caught the sum over units of
#: a (B, 1) adjoint taken as one unit's)
NESTED = """\
[cell]
name = "nested"
[inputs]
x = "n_hidden"
[states]
h = "n_hidden"
[params]
U = ["n_hidden", "n_hidden"]
b = ["n_hidden"]
[equations]
u = "logsumexp(h_prev)"
s = "logsumexp(2 * u) + mean(logsumexp(x))"
h = "tanh(U @ h_prev + s * b + sigmoid(s) * h_prev)"
"""

#: scalar parameters in values the same at every unit, in the loop (of the state's mean), on the
#: input side (of the input's mean and root mean square) and in a readout: their gradients sum
#: every unit's share of an adjoint the NumPy module holds as one value per row
SCALARS = """\
[cell]
name = "scalars"
[inputs]
x = "n_in"
[states]
h = "n_hidden"
[params]
W = ["n_hidden", "n_in"]
U = ["n_hidden", "n_hidden"]
W2 = ["n_hidden", "n_in"]
s = { shape = [], init = "constant(0.7)" }
t = { shape = [], init = "constant(0.2)" }
s2 = { shape = [], init = "constant(0.4)" }
t2 = { shape = [], init = "constant(-0.3)" }
s3 = { shape = [], init = "constant(1.1)" }
[equations]
m = "mean(h_prev)"
u = "s * m + t + sigmoid(s) * m**2"
q = "s2 * mean(W2 @ x) + t2 * sqrt(mean((W2 @ x)**2) + 1)"
h = "tanh(W @ x + U @ h_prev + u + q)"
[readout]
z = "h * (s3 * mean(h) + t)"
"""

#: a coefficient of the backward recursion made of parameters alone (``params / 3``, hoisted once,
#: a 0-d array) multiplying a uniform value's adjoint: taken out of the mean over the units (a
#: random cell caught it inside one, a mean over no axis)
HOISTED = """\
[cell]
name = "hoisted"
[inputs]
x = "n_in"
[states]
h = "n_hidden"
[params]
s = []
r = ["n_hidden"]
W = ["n_hidden", "n_hidden + n_in"]
b = ["n_hidden"]
[equations]
u = "s * (sum(h_prev) / 3)"
v = "u"
t0 = "sum(r * v) / 3"
h = "tanh(mean(W @ (h_prev, x)) + t0 + b * h_prev)"
"""

CELLS = {"ln_gru": LN_GRU, "rms_elman": RMS_ELMAN, "sums": SUMS, "nested": NESTED, "scalars": SCALARS,
         "hoisted": HOISTED}


def module_of(text: str):
    plan = build(parse_spec(text, "cell.toml"))
    return plan, load_module(render_numpy(plan), plan.graph.cell)


@pytest.fixture(scope="module")
def host_xp(tmp_path_factory):
    return host_cupy(tmp_path_factory.mktemp("reduction_kernels"))


def run_cupy(source: str, xp, name: str, pr):
    saved = sys.modules.get("cupy")
    sys.modules["cupy"] = xp
    try:
        cu = load_module(source, name)
        out, cache = cu.forward(pr.params, pr.x, pr.state0)
        return out, cu.backward(pr.params, cache, pr.grad_outputs)
    finally:
        if saved is None:
            sys.modules.pop("cupy")
        else:
            sys.modules["cupy"] = saved


@pytest.mark.parametrize("name", sorted(CELLS))
def test_cells_with_reductions_pass_finite_differences_and_rtrl(name):
    plan, module = module_of(CELLS[name])
    assert any(isinstance(n, Reduction) for n in plan.graph.nodes)
    results = check_module(module, seed=1, T=5, B=2)
    bad = [(r.check, r.name, r.error) for r in results if not r.error <= r.tol]
    assert results and not bad, bad


@pytest.mark.parametrize("name", sorted(CELLS))
def test_uniform_adjoints_as_means_compute_the_same_values(name):
    """compact_unit_adjoints (uniform values' adjoints as their means over the units) on and off."""
    plan, module = module_of(CELLS[name])
    off = load_module(render_numpy(plan, passes=ALL - {"compact_unit_adjoints"}), f"{plan.graph.cell}_full_width")
    pr = random_problem(module, T=5, B=3, seed=2)
    results = []
    for m in (module, off):
        out, cache = m.forward(pr.params, pr.x, pr.state0)
        results.append((out, m.backward(pr.params, cache, pr.grad_outputs)))
    (out, grads), (out_off, grads_off) = results
    assert set(grads) == set(grads_off)
    assert all(rel_error(out[k], out_off[k]) <= 1e-12 for k in out_off)
    bad = {k: rel_error(grads[k], grads_off[k]) for k in grads_off if not rel_error(grads[k], grads_off[k]) <= 1e-12}
    assert not bad, bad


@pytest.mark.parametrize("name", sorted(CELLS))
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_cupy_kernels_with_reductions_match_numpy_on_the_host(host_xp, name, dtype):
    plan, ref = module_of(CELLS[name])
    source = render_cupy(plan)
    pr = random_problem(ref, T=4, B=3, seed=2, dtype=dtype)
    out_ref, cache = ref.forward(pr.params, pr.x, pr.state0)
    grads_ref = ref.backward(pr.params, cache, pr.grad_outputs)
    out, grads = run_cupy(source, host_xp, f"{name}_cupy", pr)
    errors = {k: rel_error(np.asarray(out[k]), out_ref[k]) for k in out_ref}
    errors |= {"d_" + k: rel_error(np.asarray(grads[k]), grads_ref[k]) for k in grads_ref}
    bad = {k: e for k, e in errors.items() if not e <= TOL[dtype]}
    assert not bad, bad


def test_cupy_reruns_are_bit_identical(host_xp):
    plan = build("layer_norm_lstm")
    ref = load_module(render_numpy(plan), "layer_norm_lstm")
    pr = random_problem(ref, T=4, B=3, seed=3, dtype=np.float32)
    source = render_cupy(plan)
    first, second = (run_cupy(source, host_xp, "layer_norm_lstm_cupy", pr) for _ in range(2))
    for a, b in zip(first, second):
        for k in a:
            assert np.array_equal(np.asarray(a[k]), np.asarray(b[k])), k


def _logits_problem(module, dtype, scale=1e3):
    """An instance of elman_classifier whose logits are ~``scale``: one-hot targets, one step unlabelled."""
    rng = np.random.default_rng(0)
    T, B, n_in, n_hidden, n_out = 5, 4, 3, 6, 5
    p = module.init_params(n_in, n_hidden, n_out, seed=0)
    p = {k: v.astype(np.float64) for k, v in p.items()}
    p["V"] = scale * np.sign(p["V"])  # h in (-1, 1): logits of a few times scale
    x = rng.standard_normal((T, B, n_in))
    target = np.eye(n_out)[rng.integers(0, n_out, (T, B))]
    target[0] = 0.0  # no label at step 0
    return ({k: v.astype(dtype) for k, v in p.items()}, x.astype(dtype), target.astype(dtype))


def test_cross_entropy_is_stable_for_large_logits_in_float32():
    module = load_module(render_numpy(build("elman_classifier")), "elman_classifier")
    loss64, grads64 = module.loss_and_grads(*_logits_problem(module, np.float64))
    p32, x32, t32 = _logits_problem(module, np.float32)
    out, _ = module.forward(p32, x32)
    z = out["z"].astype(np.float32)
    assert np.abs(z).max() > 500  # the logits are large
    with np.errstate(over="ignore"):
        naive = np.log(np.sum(np.exp(z), axis=-1))
    assert not np.all(np.isfinite(naive))  # the unshifted formula overflows in float32
    loss32, grads32 = module.loss_and_grads(p32, x32, t32)
    assert np.isfinite(loss32) and loss32 > 100
    assert rel_error(np.float64(loss32), loss64) < 1e-5
    for k in grads64:
        assert np.all(np.isfinite(grads32[k])), k
        assert rel_error(grads32[k].astype(np.float64), grads64[k]) < 1e-4, k


def test_cross_entropy_of_large_logits_on_the_cupy_kernels(host_xp):
    plan = build("elman_classifier")
    ref = load_module(render_numpy(plan), "elman_classifier")
    p, x, target = _logits_problem(ref, np.float32)
    saved = sys.modules.get("cupy")
    sys.modules["cupy"] = host_xp
    try:
        cu = load_module(render_cupy(plan), "elman_classifier_cupy")
        loss, grads = cu.loss_and_grads(p, x, target)
    finally:
        sys.modules.pop("cupy") if saved is None else sys.modules.__setitem__("cupy", saved)
    loss_ref, grads_ref = ref.loss_and_grads(p, x, target)
    assert np.isfinite(loss) and rel_error(np.float64(loss), np.float64(loss_ref)) < 1e-5
    for k in grads_ref:
        assert np.all(np.isfinite(np.asarray(grads[k]))) and rel_error(np.asarray(grads[k]), grads_ref[k]) < 1e-4, k


def test_python_api_cell_gives_the_spec_cells_module():
    a, h_prev, x, target = sympy.symbols("a h_prev x target")
    W, U, g, V = params("W U g V")
    z, logp = sympy.symbols("z logp")
    cell = Cell(
        name="rms_elman", source="Zhang and Sennrich 2019", inputs={"x": "n_in"}, states={"h": "n_hidden"},
        params={"W": Param(("n_hidden", "n_in")), "U": Param(("n_hidden", "n_hidden")),
                "g": Param(("n_hidden",), init="constant(1)"), "V": Param(("n_out", "n_hidden"))},
        equations={"a": W @ x + U @ h_prev, "h": tanh(g * a * (mean(a**2) + sympy.Float(1e-6)) ** sympy.Float(-0.5))},
        readout={"z": V @ sympy.Symbol("h"), "logp": z - logsumexp(z)},
        loss=Loss(-target * logp, target_of="logp"),
    )
    assert render_numpy(build(cell)) == render_numpy(build(parse_spec(RMS_ELMAN, "cell.toml")))
    assert str(sum_units(a)) == "sum(a)" and str(mean(a)) == "mean(a)"


def test_documents_print_reductions_as_a_reader_writes_them():
    md = render_markdown(build(parse_spec(RMS_ELMAN, "cell.toml")))
    assert r"\frac{1}{n}\sum_{j}" in md  # the mean
    assert r"\log\sum_{j} \exp" in md  # logsumexp
    assert r"\sum_{j}" in md.split("Reverse mode")[1]  # the adjoint of a reduction: the sum over units of its adjoint
    md = render_markdown(build(parse_spec(SUMS, "cell.toml")))
    assert r"\sum_{j} " in md and r"\frac{1}{n}" in md


@pytest.mark.parametrize("equation, message", [
    ("mean(a, a)", "mean(...) takes exactly one argument"),
    ("sum()", "sum(...) takes exactly one argument"),
    ("mean", "'mean' is a function; write mean(...)"),
    ("tanh(mean(2.0))", "has no vector in it"),
])
def test_bad_reductions_are_one_line_errors(equation, message):
    text = SUMS.replace('s = "sum(h_prev * x) / 4"', f'a = "h_prev"\ns = "{equation} + a"')
    with pytest.raises(UserError) as exc:
        build(parse_spec(text, "cell.toml"))
    assert message in str(exc.value) and "\n" not in str(exc.value), str(exc.value)
    assert "cell.toml:" in str(exc.value)


def test_a_reduction_in_the_loss_is_refused_with_the_readout_to_write(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text(RMS_ELMAN.replace('expr = "-target * logp"', 'expr = "-target * (z - logsumexp(z))"'))
    proc = subprocess.run([sys.executable, "-m", "symrnn", "check", "--spec", str(path)], capture_output=True,
                          text=True, cwd=ROOT)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert f"{path}:" in proc.stderr and "compute it in a readout" in proc.stderr and proc.stderr.count("\n") == 1


def test_a_value_may_still_be_called_sum():
    text = SUMS.replace('s = "sum(h_prev * x) / 4"', 'sum = "h_prev * x"\ns = "sum(sum) / 4"')
    plan, module = module_of(text)
    assert [n.operand for n in plan.graph.nodes if isinstance(n, Reduction) and n.reduce is sum_units] == ["sum"]
    results = check_module(module, seed=0, T=4, B=2)
    assert not [r for r in results if not r.error <= r.tol]
