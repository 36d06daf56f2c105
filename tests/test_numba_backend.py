"""The numba backend (generated/<cell>_numba.py): the same values as the NumPy module
(outputs and every gradient, float64 at 1e-12 and float32 at the float32 tolerance) for
every built-in cell, finite differences, torch autograd for the torch-convention cells,
random spec cells, reruns bit-identical, a cell it cannot do refused in one line.

The committed modules are imported from generated/ (compiled on the first call, then
cached in generated/__pycache__); the random cells are written to a temporary folder
(numba caches only functions of a module that lives in a file)."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import sympy
from hypothesis import HealthCheck, Phase, assume, given, settings
from hypothesis import strategies as st

import cupy_support
from conftest import CELLS
from test_ops import inside
from test_spec_random_cells import spec_text
from symrnn.errors import CellError, UserError
from symrnn.gradcheck import finite_differences, random_problem, rel_error, rtrl_vs_bptt, with_lengths
from symrnn.ops import OPS
from symrnn.pipeline import build, load_module, render_numpy
from symrnn.render import render_numba
from symrnn.spec import SpecWarning, parse_spec

TOL = {np.float64: 1e-12, np.float32: 2e-5}


def numba_module(cell: str):
    return importlib.import_module(f"generated.{cell}_numba")


def numpy_module(cell: str):
    return importlib.import_module(f"generated.{cell}_numpy")


def compare(ref, mod, dtype, seed=0, T=5, B=3):
    """Relative errors of ``mod`` against ``ref`` on one random problem, per output and gradient."""
    pr = random_problem(ref, T=T, B=B, seed=seed, dtype=dtype)
    out_ref, cache_ref = ref.forward(pr.params, pr.x, pr.state0)
    grads_ref = ref.backward(pr.params, cache_ref, pr.grad_outputs)
    out, cache = mod.forward(pr.params, pr.x, pr.state0)
    grads = mod.backward(pr.params, cache, pr.grad_outputs)
    assert set(out) == set(out_ref) and set(grads) == set(grads_ref)
    for k in grads:
        assert grads[k].dtype == dtype and grads[k].shape == grads_ref[k].shape, k
    errors = {k: rel_error(out[k], out_ref[k]) for k in out_ref}
    errors |= {"d_" + k: rel_error(grads[k], grads_ref[k]) for k in grads_ref}
    return errors


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("cell", CELLS)
def test_matches_the_numpy_module(cell, dtype):
    errors = compare(numpy_module(cell), numba_module(cell), dtype)
    bad = {k: e for k, e in errors.items() if not e <= TOL[dtype]}
    assert not bad, bad


@pytest.mark.parametrize("steps", ["lengths", "lengths reversed"])
@pytest.mark.parametrize("cell", CELLS)
def test_matches_the_numpy_module_with_lengths(cell, steps):
    """Variable lengths (0, 1, T, unsorted), read forwards and backwards, with cotangents of
    the final states: outputs, final states and every gradient as the NumPy module's."""
    errors = cupy_support.compare(numba_module(cell), np, cell, np.float64, steps=steps)
    bad = {k: e for k, e in errors.items() if not e <= TOL[np.float64]}
    assert not bad, bad


@pytest.mark.parametrize("cell", CELLS)
def test_finite_differences(cell):
    mod = numba_module(cell)
    pr = random_problem(mod, T=4, B=2, seed=3)
    results = finite_differences(mod, pr)
    assert results and all(r.ok for r in results), [r for r in results if not r.ok]


@pytest.mark.parametrize("reverse", [False, True], ids=["forwards", "reversed"])
@pytest.mark.parametrize("cell", ["lstm_torch", "indrnn", "gru_nobias"])
def test_finite_differences_with_lengths(cell, reverse):
    mod = numba_module(cell)
    pr = with_lengths(mod, random_problem(mod, T=5, B=4, seed=1), [5, 0, 1, 3], reverse, seed=2)
    results = finite_differences(mod, pr)
    assert results and all(r.ok for r in results), [r for r in results if not r.ok]


def test_loss_and_grads_matches_numpy():
    cell = next(c for c in CELLS if hasattr(numpy_module(c), "loss_and_grads"))
    ref, mod = numpy_module(cell), numba_module(cell)
    pr = random_problem(ref, T=4, B=2, seed=1)
    loss_ref, grads_ref = ref.loss_and_grads(pr.params, pr.x, pr.target, pr.state0)
    loss, grads = mod.loss_and_grads(pr.params, pr.x, pr.target, pr.state0)
    assert abs(loss - loss_ref) <= 1e-12 * abs(loss_ref)
    assert all(rel_error(grads[k], grads_ref[k]) <= 1e-12 for k in grads_ref)


@pytest.mark.parametrize("cell", ["elman", "lstm_torch", "indrnn"])
def test_reruns_are_bit_identical(cell):
    mod = numba_module(cell)
    pr = random_problem(mod, T=5, B=3, seed=2)
    runs = []
    for _ in range(2):
        out, cache = mod.forward(pr.params, pr.x, pr.state0)
        runs.append((out, mod.backward(pr.params, cache, pr.grad_outputs)))
    (o1, g1), (o2, g2) = runs
    assert all(np.array_equal(o1[k], o2[k]) for k in o1) and all(np.array_equal(g1[k], g2[k]) for k in g1)


def test_outputs_are_read_only_and_cache_private():
    mod = numba_module("elman")
    pr = random_problem(mod, T=3, B=2, seed=0)
    x = pr.x.copy()
    out, cache = mod.forward(pr.params, x, pr.state0)
    with pytest.raises(ValueError):
        next(iter(out.values()))[0, 0, 0] = 1.0
    x[...] = 0.0  # the cache has its own x
    ref_out, ref_cache = mod.forward(pr.params, pr.x, pr.state0)
    g1, g2 = mod.backward(None, cache, pr.grad_outputs), mod.backward(None, ref_cache, pr.grad_outputs)
    assert all(np.array_equal(g1[k], g2[k]) for k in g1)


@pytest.mark.parametrize("cell", ["rnn_tanh_torch", "lstm_torch", "gru_torch"])
def test_matches_torch_autograd(cell):
    torch = pytest.importorskip("torch")
    mod = numba_module(cell)
    n_in, n_hidden, T, B = 4, 5, 6, 3
    torch.manual_seed(0)
    net = {"rnn_tanh_torch": lambda: torch.nn.RNN(n_in, n_hidden), "lstm_torch": lambda: torch.nn.LSTM(n_in, n_hidden),
           "gru_torch": lambda: torch.nn.GRU(n_in, n_hidden)}[cell]().double()
    params = {k: v.detach().numpy().copy() for k, v in net.state_dict().items()}
    rng = np.random.default_rng(4)
    x = rng.standard_normal((T, B, n_in))
    out, cache = mod.forward(params, x)
    go = rng.standard_normal(out["h"].shape)
    grads = mod.backward(params, cache, {"h": go})
    x_t = torch.tensor(x, requires_grad=True)
    y, _ = net(x_t)
    (y * torch.tensor(go)).sum().backward()
    assert rel_error(out["h"], y.detach().numpy()) <= 1e-12
    assert rel_error(grads["x"], x_t.grad.numpy()) <= 1e-10
    for name, t in net.named_parameters():
        assert rel_error(grads[name], t.grad.numpy()) <= 1e-10, name


@pytest.mark.parametrize("name", sorted(OPS))
def test_every_op_has_a_numba_spelling_that_matches_its_formula(name):
    op = OPS[name]
    assert "{x}" in op.numba
    for value in inside(op, (-2.5, -0.3, 0.0, 0.8, 3.1)):  # the op's domain (log, sqrt: a > 0)
        value = float(value)
        got = eval(op.numba.format(x="a", one="1.0", zero="0.0", exp="np.exp", tanh="np.tanh"), {"np": np, "a": value})  # noqa: S307 - our own string
        a = sympy.Symbol("a")
        want = float(op.formula(a).subs(a, value).rewrite(sympy.Piecewise)) if name != "step" else float(value > 0)
        assert abs(got - want) <= 1e-12 * max(1.0, abs(want)), (name, value)


@pytest.mark.parametrize("exponent", ["-0.5", "0.5", "-1.5", "1.5", "2.5", "-3.5", "3/2", "-1/2", "0.25", "4.5"])
def test_a_power_prints_as_numba_computes_it(exponent):
    """x ** e in a kernel, compiled, against NumPy's power in float64 and float32: a half-integer
    e (a Float from a spec, or a Rational) as a square root times a power (no scalar libm pow),
    other exponents through **; within 2 ulp of float64's power, and of float32's."""
    numba = pytest.importorskip("numba")
    from symrnn.backends.numba_backend import numba_code

    x = sympy.Symbol("x")
    e = sympy.Rational(exponent) if "/" in exponent else sympy.Float(exponent)
    code = numba_code((x + 1) ** e)
    assert ("np.sqrt" in code) == (float(2 * e) % 2 == 1 and abs(float(e)) < 4), code
    kernel = numba.njit(eval(f"lambda x, S: {code}", {"np": np}))  # noqa: S307 - our own printer's output
    values = np.array([0.1, 0.7, 1.0, 2.3, 17.0, 1e3])
    for dtype in (np.float64, np.float32):
        got = np.array([kernel(dtype(v), dtype) for v in values.astype(dtype)]).astype(dtype)  # numba returns Python floats
        want = np.power(values.astype(dtype) + dtype(1), dtype(float(e)))
        ulp = np.spacing(np.abs(want).astype(dtype)).astype(np.float64)
        assert np.max(np.abs(got.astype(np.float64) - want) / ulp) <= 2, (exponent, dtype, got, want)


def test_an_op_without_a_numba_spelling_is_refused_in_one_line(monkeypatch):
    monkeypatch.setattr(OPS["tanh"], "numba", "")
    with pytest.raises(CellError) as info:
        render_numba(build("elman"))
    assert "NumPy backend" in str(info.value) and "\n" not in str(info.value)


def load_file_module(source: str, name: str, folder):
    """``source`` as a module in a file of ``folder`` (registered, as an import would)."""
    path = folder / f"{name}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


_COUNT = iter(range(10**6))


@settings(max_examples=6, deadline=None, derandomize=True, phases=(Phase.generate,),
          suppress_health_check=list(HealthCheck))
@given(text=spec_text(), sizes=st.sampled_from([(2, 3, 2), (3, 3, 3), (2, 2, 3)]))
def test_random_cells_match_numpy(tmp_path_factory, text, sizes):
    n_in, n_hidden, n_out = sizes
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SpecWarning)
        try:
            cell = parse_spec(text, "random_cell.toml")
        except UserError:
            assume(False)
    plan = build(cell)
    try:
        source = render_numba(plan)
    except CellError as exc:
        assert "NumPy backend" in str(exc) and "\n" not in str(exc), str(exc)
        assume(False)
    ref = load_module(render_numpy(plan), "random_cell")
    mod = load_file_module(source, f"random_cell_numba_{next(_COUNT)}", tmp_path_factory.mktemp("numba_cells"))
    pr = random_problem(ref, T=4, B=2, seed=5, n_in=n_in, n_hidden=n_hidden, n_out=n_out)
    out_ref, cache_ref = ref.forward(pr.params, pr.x, pr.state0)
    grads_ref = ref.backward(pr.params, cache_ref, pr.grad_outputs)
    out, cache = mod.forward(pr.params, pr.x, pr.state0)
    grads = mod.backward(pr.params, cache, pr.grad_outputs)
    errors = {k: rel_error(out[k], out_ref[k]) for k in out_ref}
    errors |= {"d_" + k: rel_error(grads[k], grads_ref[k]) for k in grads_ref}
    bad = {k: e for k, e in errors.items() if not e <= 1e-12}
    assert not bad, f"{bad}\n{text}"
    assert kernel_overlaps([Path(mod.__file__)], sizes) == [], text



@pytest.mark.parametrize("cell", ["elman", "lstm_torch", "indrnn", "gru_nobias"])
def test_rtrl_grads_equal_backward(cell):
    """rtrl_grads (the NumPy module's, forward mode) against this module's backward."""
    mod = numba_module(cell)
    pr = random_problem(mod, T=4, B=2, seed=6)
    results = rtrl_vs_bptt(mod, pr)
    assert results and all(r.ok for r in results), [r for r in results if not r.ok]
    if hasattr(mod, "loss_and_grads"):
        loss, grads = mod.loss_and_grads(pr.params, pr.x, pr.target, pr.state0)
        rtrl_loss, rtrl = mod.rtrl_loss_and_grads(pr.params, pr.x, pr.target, pr.state0)
        assert rel_error(loss, rtrl_loss) < 1e-12
        assert max(rel_error(rtrl[k], grads[k]) for k in grads) < 1e-10


def test_float32_exp_and_tanh_within_their_stated_errors():
    """The kernels' float32 exp and tanh (pure arithmetic, vectorized) against float64 NumPy on
    every 4096-th float32 bit pattern and the special values: at most 1 ulp (exp) and 7 ulp
    (tanh) where the result is a normal float32 (the template's claim; every float32:
    benchmarks/float32_math.py), NaN stays NaN, overflow is inf, underflow 0."""
    numba = pytest.importorskip("numba")
    mod = numba_module("lstm_torch")
    exp32, tanh32 = mod._exp_float32, mod._tanh_float32

    @numba.njit
    def apply(x, e, t):
        for i in range(x.size):
            e[i] = exp32(x[i])
            t[i] = tanh32(x[i])

    bits = np.arange(0, 1 << 32, 4096, dtype=np.uint64).astype(np.uint32).view(np.float32)
    special = np.array([0.0, -0.0, 1e-45, -1e-45, 0.0004, -0.0004, 7.905311, 88.72283, 88.7229, -87.33654, -87.3366,
                        -103.98, np.inf, -np.inf, np.nan], np.float32)
    x = np.concatenate([bits, special])
    e, t = np.empty_like(x), np.empty_like(x)
    apply(x, e, t)
    with np.errstate(all="ignore"):
        x64 = x.astype(np.float64)
        for got, ref, bound in ((e, np.exp(x64), 1.0), (t, np.tanh(x64), 7.0)):
            normal = (np.abs(ref) >= np.finfo(np.float32).tiny) & (np.abs(ref) <= np.finfo(np.float32).max)
            ulp = np.spacing(np.abs(ref[normal]).astype(np.float32)).astype(np.float64)
            assert np.max(np.abs(got[normal] - ref[normal]) / ulp) <= bound
            nan = np.isnan(x)
            assert np.all(np.isnan(got[nan])) and not np.any(np.isnan(got[~nan]))
        assert np.all(e[np.exp(x64) > np.finfo(np.float32).max] == np.inf)
        assert np.all(e[np.exp(x64) < np.finfo(np.float32).tiny] <= np.finfo(np.float32).tiny)
        assert np.all(np.abs(t[~np.isnan(x)]) <= 1)


def test_float64_exp_and_tanh_within_their_stated_errors():
    """The kernels' float64 exp and tanh (pure arithmetic, vectorized) against exact values
    (mpmath at 120 bits) on a seeded sample over exp's whole range and tanh's formulas (tiny x,
    the switch at |x| = 0.625): at most 2 ulp where the exact value is a normal float64 (the
    template's claim; a larger sample: benchmarks/float64_math.py); 0 and -0, +-inf, NaN,
    overflow to inf, underflow to 0 below -708.4, |tanh| <= 1."""
    numba = pytest.importorskip("numba")
    mpmath = pytest.importorskip("mpmath")
    mod = numba_module("lstm_torch")
    exp64, tanh64 = mod._exp_float64, mod._tanh_float64

    @numba.njit
    def apply(x, e, t):
        for i in range(x.size):
            e[i] = exp64(x[i])
            t[i] = tanh64(x[i])

    rng = np.random.default_rng(0)
    n = 1500
    tiny = np.ldexp(rng.uniform(-1, 1, n), -rng.integers(1, 61, n))
    x = np.concatenate([rng.uniform(-745, 710, n), rng.uniform(-30, 30, n), rng.uniform(0.6, 0.65, n) * rng.choice([-1.0, 1.0], n),
                        rng.uniform(-2, 2, n), tiny])
    e, t = np.empty_like(x), np.empty_like(x)
    apply(x, e, t)
    mpmath.mp.prec = 120
    worst = {"exp": 0.0, "tanh": 0.0}
    for xi, ei, ti in zip(x, e, t):
        for name, got, exact in (("exp", ei, mpmath.exp), ("tanh", ti, mpmath.tanh)):
            ref = exact(mpmath.mpf(float(xi)))
            r = abs(float(ref))
            if np.finfo(np.float64).tiny <= r <= np.finfo(np.float64).max:
                worst[name] = max(worst[name], float(abs(mpmath.mpf(float(got)) - ref)) / float(np.spacing(r)))
    assert worst["exp"] <= 2 and worst["tanh"] <= 2, worst
    special = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 709.79, 1000.0, -708.4, -745.2, -1000.0, 5e-324, -5e-324, 22.0, -30.0, 1e308])
    e, t = np.empty_like(special), np.empty_like(special)
    apply(special, e, t)
    assert e[:5].tolist()[:4] == [1.0, 1.0, np.inf, 0.0] and np.isnan(e[4]) and np.isnan(t[4])
    assert t[:4].tolist() == [0.0, -0.0, 1.0, -1.0] and np.signbit(t[1]) and not np.signbit(t[0])
    assert e[5:10].tolist() == [np.inf, np.inf, 0.0, 0.0, 0.0]
    assert t[10:].tolist() == [5e-324, -5e-324, 1.0, -1.0, 1.0]
    assert np.all(np.abs(t[~np.isnan(t)]) <= 1)


@pytest.mark.parametrize("cell", ["gru_torch"])
def test_steps_products_with_and_without_numpys_openblas(tmp_path, cell):
    """A step's product (_gemm) calls the OpenBLAS that NumPy bundles where NumPy has one
    (its symbol in the compiled loop), else np.dot (numba's: SciPy's BLAS); either way the
    NumPy module's values."""

    source = Path(numba_module(cell).__file__).read_text()
    bundled = sorted(Path(np.__file__).resolve().parent.parent.glob("numpy.libs/libscipy_openblas64_*"))
    direct = load_file_module(source, f"{cell}_numba_with_blas", tmp_path)
    assert (direct._BLAS is not None) == bool(bundled), (direct._BLAS, bundled)
    fallback = load_file_module(source, f"{cell}_numba_without_blas", tmp_path)
    fallback._BLAS = None  # before the first call: the compiled loops take np.dot
    pr = random_problem(direct, T=5, B=3, seed=8, n_in=4, n_hidden=5)
    ref = numpy_module(cell)
    out_ref, cache_ref = ref.forward(pr.params, pr.x, pr.state0)
    grads_ref = ref.backward(pr.params, cache_ref, pr.grad_outputs)
    for m, calls_blas in ((direct, bool(bundled)), (fallback, False)):
        out, cache = m.forward(pr.params, pr.x, pr.state0)
        grads = m.backward(pr.params, cache, pr.grad_outputs)
        assert max(rel_error(grads[k], grads_ref[k]) for k in grads_ref) <= 1e-12
        assert max(rel_error(out[k], out_ref[k]) for k in out_ref) <= 1e-12
        llvm = "".join(code for name in m.LOOPS for code in getattr(m, name).inspect_llvm().values())
        assert ("scipy_cblas_dgemm64_" in llvm) == calls_blas, m.__name__


_LOAD_AS = '''
import importlib, importlib.util, sys
import numpy as np
folder, how = sys.argv[1], sys.argv[2]
if how == "import":
    sys.path.insert(0, folder)
    module = importlib.import_module("kernels.mingru_numba")
else:  # loaded from its path, registered under another name or not at all
    spec = importlib.util.spec_from_file_location("vendored_mingru", folder + "/kernels/mingru_numba.py")
    module = importlib.util.module_from_spec(spec)
    if how == "registered":
        sys.modules["vendored_mingru"] = module
    spec.loader.exec_module(module)
p = module.init_params(3, 4, seed=1)
out, cache = module.forward(p, np.ones((2, 2, 3)))
grads = module.backward(p, cache, {"h": np.ones_like(out["h"])})
print(module._CACHE, repr(float(grads["W_z"].sum())))
'''


def test_a_module_imported_under_several_names_keeps_a_cache_per_name(tmp_path):
    """One file imported as a package's module, loaded from its path under another name, and
    loaded from its path unregistered, in turn and again, each in a fresh interpreter: every
    run works and gives the same gradients (numba's cache entries name the module that wrote
    them: a file's entries are kept apart per module name; an unregistered module is not cached)."""
    import shutil
    import subprocess

    kernels = tmp_path / "kernels"
    kernels.mkdir()
    (kernels / "__init__.py").write_text("")
    for name in ("mingru_numba.py", "mingru_numpy.py"):
        shutil.copy(Path(numba_module("mingru").__file__).with_name(name), kernels / name)
    script = tmp_path / "load_as.py"
    script.write_text(_LOAD_AS)
    results = []
    for how in ("import", "registered", "unregistered") * 2:
        run = subprocess.run([sys.executable, str(script), str(tmp_path), how], capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, (how, run.stderr[-2000:])
        cached, value = run.stdout.split()
        assert cached == str(how != "unregistered"), (how, cached)
        results.append(value)
    assert len(set(results)) == 1, results
    entries = {path.name.split("-")[0] for path in (kernels / "__pycache__").glob("*.nbi")}
    assert {e for e in entries if e.startswith("mingru_numba.kernels.mingru_numba.")} and \
        {e for e in entries if e.startswith("mingru_numba.vendored_mingru.")}, sorted(entries)


def kernel_overlaps(paths, sizes=(3, 3, 3)) -> list:
    """tests/numba_alias_check.py's findings for the numba modules at ``paths``: every kernel
    call handed two arrays that share memory (the kernels are compiled noalias)."""
    run = subprocess.run([sys.executable, str(Path(__file__).with_name("numba_alias_check.py")),
                          "--sizes", ",".join(map(str, sizes)), *map(str, paths)],
                         capture_output=True, text=True, timeout=600, env={**os.environ, "NUMBA_DISABLE_JIT": "1"})
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout)


def test_no_kernel_is_handed_arrays_that_share_memory():
    """Every kernel of every committed numba module (compiled noalias: LLVM vectorizes without
    run-time overlap checks) gets arrays that do not overlap, in forward and backward, with
    and without lengths and reverse; a module that passes one buffer twice is caught."""
    paths = sorted(Path(numba_module("mingru").__file__).parent.glob("*_numba.py"))
    assert len(paths) >= 15
    assert kernel_overlaps(paths) == []


def test_the_overlap_check_finds_a_shared_buffer(tmp_path):
    """The check itself: minGRU's module with z and h_tilde in one buffer is caught."""
    source = Path(numba_module("mingru").__file__).read_text()
    bad = source.replace("h_tilde_seq = np.empty((T, B, n_hidden), dtype)", "h_tilde_seq = z_seq")
    assert bad != source
    (tmp_path / "mingru_shared_numba.py").write_text(bad)
    found = kernel_overlaps([tmp_path / "mingru_shared_numba.py"])
    assert {"mingru_forward_pre0", "mingru_forward_loop0"} <= {kernel for _, kernel, _, _ in found}
