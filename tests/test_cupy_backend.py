"""The CuPy backend on a machine without a GPU.

* the CUDA source of every built-in cell compiles with nvcc for sm_80 and sm_90;
* the same source, compiled for the host (the math is in __host__ __device__
  functions), runs each generated CuPy module end to end on the CPU through a
  NumPy stand-in for CuPy (tests/host_cupy.py) and matches the NumPy module in
  float64 and float32;
* generated modules are golden files, deterministic, and import without CuPy.

GPU runs are in tests/test_cupy_gpu.py (``pytest -m gpu``; ``bash .ci/gpu``).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from conftest import CELLS
from cupy_support import LENGTHS, TOL, compare, cuda_source, cupy_source, fresh_cupy_module, lengths_for
from host_cupy import host_cupy
from symrnn.cuda_printing import cuda_code, op_helpers
from symrnn.errors import CellError
from symrnn.ops import OPS
from symrnn.pipeline import build, load_module, module_name, render_cupy

ARCHS = ("sm_80", "sm_90")
DTYPES = (np.float64, np.float32)


# -- (a) printer -----------------------------------------------------------------
def test_cuda_printer_is_dtype_parametric():
    import sympy

    y, a = sympy.symbols("y a")
    assert cuda_code(1 - y**2) == "scalar_t(1) - (y*y)"
    assert cuda_code(-a * y / (1 + y) ** 2) == "-a*y/((y + scalar_t(1))*(y + scalar_t(1)))"  # a square as a denominator
    assert sorted(cuda_code(OPS["sigmoid"](a) * OPS["tanh"](a)).split("*")) == ["op_sigmoid(a)", "op_tanh(a)"]
    assert cuda_code(a / 3 + sympy.Float(0.25)) == "(scalar_t(1)/scalar_t(3))*a + scalar_t(0.25)"
    assert cuda_code(1 / a) == "scalar_t(1)/a"
    assert "1.0" not in cuda_code(a / 2 - 1)  # no double literal: float kernels stay in float


def test_every_op_helper_matches_numpy_in_float_and_double(tmp_path):
    """The op_<name> overloads (each op's own cuda spellings), compiled for the
    host, against each op's NumPy spelling."""
    import ctypes

    from host_cupy import compile_host

    helpers = op_helpers(list(OPS.values()))
    assert [h[0] for h in helpers] == [f"op_{name}" for name in OPS]
    lines = ["#include <math.h>", "#define __host__", "#define __device__"]
    for name, f32, f64 in helpers:
        lines += [f"__host__ __device__ inline float {name}(float x) {{ return {f32}; }}",
                  f"__host__ __device__ inline double {name}(double x) {{ return {f64}; }}",
                  f'extern "C" float {name}_f32(float x) {{ return {name}(x); }}',
                  f'extern "C" double {name}_f64(double x) {{ return {name}(x); }}']
    lib = compile_host("\n".join(lines) + "\n", tmp_path)
    points = np.array([-30.0, -3.5, -1.0, -0.25, 0.0, 0.3, 1.0, 2.5, 30.0])
    for name, op in OPS.items():
        xs = points[(points > op.domain[0]) & (points < op.domain[1])]  # log, sqrt: inside (0, inf)
        assert len(xs) >= 4, name
        f64, f32 = getattr(lib, f"op_{name}_f64"), getattr(lib, f"op_{name}_f32")
        f64.restype, f64.argtypes = ctypes.c_double, [ctypes.c_double]
        f32.restype, f32.argtypes = ctypes.c_float, [ctypes.c_float]
        want = np.asarray(eval(op.numpy.format(x="xs", xp="np"), {"np": np, "xs": xs}), dtype=np.float64)
        got64 = np.array([f64(v) for v in xs])
        got32 = np.array([f32(v) for v in xs])
        assert np.allclose(got64, want, rtol=1e-14, atol=1e-16), (name, got64, want)  # absolute: sigmoid near 0 and 1 cancels
        assert np.allclose(got32, want, rtol=1e-6, atol=1e-7), (name, got32, want)


# -- (b) generated source ------------------------------------------------------------
# (up to date: tests/test_generated.py, for every registered backend)
def test_module_embeds_the_cuda_source(cell_name):
    module = fresh_cupy_module(cell_name)
    assert module.CUDA_SOURCE.lstrip("\n") == cuda_source(cell_name)
    kernels = re.findall(r'extern "C" __global__ void (\w+)_f64\(', module.CUDA_SOURCE)
    assert kernels == list(module.KERNELS)
    for name in module.KERNELS:  # both dtypes, on the device and as host drivers
        assert module.CUDA_SOURCE.count(f"void {name}_f32(") == 2 and module.CUDA_SOURCE.count(f"void {name}_f64(") == 2
        assert f"__host__ __device__ inline void {name}_element(" in module.CUDA_SOURCE
    assert "atomic" not in module.CUDA_SOURCE  # batch reductions are cupy.sum / GEMMs: deterministic


def _function(source: str, name: str) -> str:
    return re.search(rf"^def {name}\(.*?(?=^def |\Z)", source, re.S | re.M).group(0)


@pytest.mark.parametrize("cell_name", ["elman", "lstm", "lstm_torch", "gru_torch", "rnn_tanh_torch", "elman_out", "lstm_nobias"])
def test_one_recurrent_gemm_and_one_fused_kernel_per_step(cell_name):
    source = cupy_source(cell_name)
    forward, backward = _function(source, "forward"), _function(source, "backward")
    before, loop = forward.split("for t in range(T):\n")
    assert "cp.matmul(x.reshape(-1, n_in)" in before  # the input projection of all steps: one GEMM
    step = [line for line in loop.splitlines() if line.startswith("        ")]
    assert sum("cp.matmul(" in line for line in step) == 1 and sum("_launch(" in line for line in step) == 1
    bwd_loop = backward.split("for t in reversed(range(T)):\n")[1]
    step = [line for line in bwd_loop.splitlines() if line.startswith("        ")]
    assert sum("cp.matmul(" in line for line in step) == 1 and sum("_launch(" in line for line in step) == 1
    after = [line for line in bwd_loop.splitlines() if line.startswith("    ") and not line.startswith("        ")]
    assert any("cp.matmul(" in line and ".T, x.reshape(-1, n_in))" in line for line in after)  # weight gradient after the loop


def test_two_stage_gru_has_two_kernels_per_step():
    loop = _function(cupy_source("gru"), "forward").split("for t in range(T):\n")[1]
    step = [line for line in loop.splitlines() if line.startswith("        ")]
    assert sum("cp.matmul(" in line for line in step) == 2 and sum("_launch(" in line for line in step) == 2


def test_elementwise_recurrence_is_one_time_loop_kernel():
    source = cupy_source("single_sigmoid")
    assert "for t in" not in source.split("CUDA_SOURCE")[0]
    assert re.search(r'_launch\("single_sigmoid_forward_loop0", dtype, B, 1, T,', source)
    assert re.search(r'_launch\("single_sigmoid_backward_loop0", dtype, B, 1, T,', source)
    assert "for (long long t_ = steps_ - 1; t_ >= 0; --t_)" in source


def test_unsupported_structure_is_a_user_error():
    """Two GEMM stages before the loop (W2 @ tanh(W1 @ x)): refused, naming the cell and the fix."""
    import sympy

    from symrnn import Cell, params, tanh
    from symrnn.errors import UserError

    x, h_prev = sympy.symbols("x h_prev")
    W1, W2, U = params("W1 W2 U")
    cell = Cell(name="deep_input", inputs={"x": "n_in"}, states={"h": "n_hidden"},
                params={"W1": ("n_hidden", "n_in"), "W2": ("n_hidden", "n_hidden"), "U": ("n_hidden", "n_hidden")},
                equations={"h": tanh(W2 @ tanh(W1 @ x) + U @ h_prev)})
    with pytest.raises(CellError, match="cell 'deep_input', cupy backend: .*two GEMM stages before the loop.*use the NumPy backend"):
        render_cupy(build(cell))
    assert issubclass(CellError, UserError)


# -- nvcc: every kernel compiles for sm_80 and sm_90 ---------------------------------------
NVCC = shutil.which("nvcc")
REQUIRE_NVCC = bool(os.environ.get("CI") or os.environ.get("SYMRNN_REQUIRE_NVCC"))


@pytest.fixture(scope="session")
def nvcc_results(tmp_path_factory):
    """Compile every cell for every architecture, in parallel, once per session."""
    if NVCC is None:
        if REQUIRE_NVCC:
            pytest.fail("nvcc is not on PATH, and CI / SYMRNN_REQUIRE_NVCC is set: the CUDA compile check must run")
        pytest.skip("nvcc is not installed (set SYMRNN_REQUIRE_NVCC=1 to make this a failure)")
    build_dir = tmp_path_factory.mktemp("nvcc")

    def compile_one(job):
        cell, arch = job
        src = build_dir / f"{cell}.cu"
        if not src.exists():
            src.write_text(cuda_source(cell))
        out = build_dir / f"{cell}_{arch}.cubin"  # device code only, through ptxas (the host side: tests below)
        cmd = [NVCC, "-std=c++17", "-cubin", f"--gpu-architecture={arch}", "--Werror", "all-warnings", str(src), "-o", str(out)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        return job, (proc, out.read_bytes() if proc.returncode == 0 else b"")

    for cell in CELLS:
        cuda_source(cell)  # render in this thread (SymPy caches are not thread-safe)
    jobs = [(cell, arch) for cell in CELLS for arch in ARCHS]
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2)) as pool:
        return dict(pool.map(compile_one, jobs))


@pytest.mark.parametrize("arch", ARCHS)
def test_cuda_source_compiles_with_nvcc(nvcc_results, cell_name, arch):
    proc, cubin = nvcc_results[(cell_name, arch)]
    assert proc.returncode == 0, f"nvcc {arch} failed for {cell_name}:\n{proc.stderr[-4000:]}"
    assert cubin.startswith(b"\x7fELF")
    for name in fresh_cupy_module(cell_name).KERNELS:  # every kernel, in both dtypes, is in the binary
        assert f"{name}_f32".encode() in cubin and f"{name}_f64".encode() in cubin, name


# -- the same source on the host, end to end, against the NumPy module ------------------------
@pytest.fixture(scope="session")
def host_xp(tmp_path_factory):
    return host_cupy(tmp_path_factory.mktemp("host_kernels"))


def host_module(cell: str, xp, monkeypatch, source: str | None = None):
    monkeypatch.setitem(__import__("sys").modules, "cupy", xp)
    return load_module(source or cupy_source(cell), module_name(cell, "cupy"))


@pytest.mark.parametrize("steps", LENGTHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=["float64", "float32"])
def test_host_compiled_kernels_match_numpy(host_xp, monkeypatch, cell_name, dtype, steps):
    module = host_module(cell_name, host_xp, monkeypatch)
    errors = compare(module, host_xp, cell_name, dtype, steps=steps)
    bad = {k: e for k, e in errors.items() if not e <= TOL[dtype]}
    assert not bad, f"{cell_name} ({np.dtype(dtype).name}, {steps}): relative errors above {TOL[dtype]}: {bad}"


@pytest.mark.parametrize("make", ["min_gru", "ind_rnn", "gated_readout", "two_stage"])
def test_host_custom_cells_match_numpy(host_xp, monkeypatch, make):
    """Shapes the built-ins lack (tests/test_custom_cells.py): pre-loop pointwise nodes
    (minGRU), a diagonal recurrence (IndRNN: one time-loop kernel), a readout of a gate
    through a product (two readout stages), a GEMM on a value of the step."""
    import test_custom_cells
    from symrnn.gradcheck import random_problem, rel_error

    cell = getattr(test_custom_cells, make)()
    plan = build(cell)
    monkeypatch.setitem(__import__("sys").modules, "cupy", host_xp)
    cu = load_module(render_cupy(plan), cell.name + "_cupy")
    ref = load_module(__import__("symrnn.pipeline", fromlist=["render_numpy"]).render_numpy(plan), cell.name)
    for dtype, steps in [(dtype, steps) for dtype in DTYPES for steps in LENGTHS]:
        pr = random_problem(ref, T=5, B=3, seed=2, dtype=dtype)
        lengths, reverse = lengths_for(steps, 5, 3)
        grad_final = {k: 0.5 * v for k, v in pr.state0.items()}
        out_ref, cache_ref = ref.forward(pr.params, pr.x, pr.state0, lengths, reverse)
        out, cache = cu.forward(pr.params, pr.x, pr.state0, lengths, reverse)
        grads_ref = ref.backward(pr.params, cache_ref, pr.grad_outputs, grad_final)
        grads = cu.backward(pr.params, cache, pr.grad_outputs, grad_final)
        final_ref, final = ref.final_states(cache_ref), cu.final_states(cache)
        errors = {k: rel_error(out[k], out_ref[k]) for k in out_ref} | {"d_" + k: rel_error(grads[k], grads_ref[k]) for k in grads_ref}
        errors |= {"final_" + k: rel_error(final[k], final_ref[k]) for k in final_ref}
        bad = {k: e for k, e in errors.items() if not e <= TOL[dtype]}
        assert not bad, f"{cell.name} ({np.dtype(dtype).name}, {steps}): {bad}"
    if make in ("min_gru", "ind_rnn"):
        assert "loops over time" in render_cupy(plan)


def test_host_loss_and_partial_cotangents(host_xp, monkeypatch):
    """loss_and_grads, default initial states and a missing cotangent (zero)."""
    from cupy_support import numpy_module

    cu, ref = host_module("single_sigmoid", host_xp, monkeypatch), numpy_module("single_sigmoid")
    rng = np.random.default_rng(3)
    params = ref.init_params(1, 1, seed=2)
    x, target = rng.standard_normal((7, 4, 1)), rng.standard_normal((7, 4, 1))
    loss_ref, grads_ref = ref.loss_and_grads(params, x, target)
    loss, grads = cu.loss_and_grads(params, x, target)
    assert abs(float(loss) - loss_ref) <= 1e-12 * abs(loss_ref)
    for k in grads_ref:
        assert np.allclose(grads[k], grads_ref[k], rtol=1e-10, atol=1e-14), k
    cu, ref = host_module("lstm_torch", host_xp, monkeypatch), numpy_module("lstm_torch")
    params = ref.init_params(3, 5, seed=1)
    x = rng.standard_normal((4, 2, 3))
    go = {"h": rng.standard_normal((4, 2, 5))}
    grads_ref = ref.backward(params, ref.forward(params, x)[1], go)
    grads = cu.backward(params, cu.forward(params, x)[1], go)
    for k in grads_ref:
        assert np.allclose(grads[k], grads_ref[k], rtol=1e-10, atol=1e-14), k


def test_host_check_catches_a_wrong_derivative(host_xp, monkeypatch):
    """The comparison can fail: one flipped sign in the CUDA backward of the
    output gate (sigmoid' = o (1 - o) -> o (1 + o)) is caught."""
    source = cupy_source("lstm_torch")
    wrong = source.replace("d_o*o*(scalar_t(1) - o)", "d_o*o*(scalar_t(1) + o)")
    assert wrong != source
    module = host_module("lstm_torch", host_xp, monkeypatch, wrong)
    errors = compare(module, host_xp, "lstm_torch", np.float64)
    assert errors["h"] <= TOL[np.float64]  # forward untouched
    assert errors["d_weight_hh_l0"] > 1e-3 and errors["d_bias_ih_l0"] > 1e-3


def test_host_reruns_are_bit_identical(host_xp, monkeypatch):
    module = host_module("gru_torch", host_xp, monkeypatch)
    from cupy_support import numpy_module
    from symrnn.gradcheck import random_problem

    pr = random_problem(numpy_module("gru_torch"), dtype=np.float32)
    runs = []
    for _ in range(2):
        out, cache = module.forward(pr.params, pr.x, pr.state0)
        runs.append(module.backward(pr.params, cache, pr.grad_outputs))
    for k in runs[0]:
        assert np.array_equal(runs[0][k], runs[1][k]), k


# -- without CuPy -------------------------------------------------------------------------
def test_calling_without_cupy_raises_one_clear_error(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "cupy", None)  # import cupy -> ImportError
    module = fresh_cupy_module("lstm")
    with pytest.raises(module.CupyUnavailable, match=r"CuPy is not installed or no CUDA device.*use generated/lstm_numpy.py instead"):
        module.forward({}, np.zeros((2, 1, 3)))


def test_no_device_raises_the_same_error(monkeypatch, tmp_path):
    xp = host_cupy(tmp_path)

    def no_device():
        raise RuntimeError("cudaErrorNoDevice: no CUDA-capable device is detected")

    xp.cuda.runtime.getDeviceCount = no_device
    monkeypatch.setitem(__import__("sys").modules, "cupy", xp)
    module = fresh_cupy_module("gru")
    with pytest.raises(module.CupyUnavailable, match="no CUDA-capable device.*use generated/gru_numpy.py"):
        module.init_params(3, 4)


def test_render_cupy_names_its_regeneration_command():
    source = render_cupy(build("elman"))
    assert source.splitlines()[2] == "#     symrnn generate elman --backend cupy --out generated"
    assert [line.strip() for line in source.splitlines() if re.match(r"\s*(import|from)\s", line)] == ["import numpy as np", "import cupy"]


def test_gpu_test_code_runs_against_the_host_standin(host_xp, monkeypatch):
    """tests/test_cupy_gpu.py only runs on a GPU; its code (comparison, finite differences
    through a NumPy-facing wrapper, reruns) is exercised here on the host stand-in, so the
    first GPU run does not fail on a bug of its own."""
    import test_cupy_gpu as gpu

    monkeypatch.setitem(__import__("sys").modules, "cupy", host_xp)
    gpu.test_gpu_matches_numpy(host_xp, "lstm_torch", np.float32)
    gpu.test_gpu_finite_differences_float64(host_xp, "single_sigmoid")
    gpu.test_gpu_reruns_are_bit_identical(host_xp, "gru", np.float64)
