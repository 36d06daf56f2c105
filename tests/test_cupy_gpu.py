"""The generated CuPy modules on an NVIDIA GPU (``pytest -m gpu``; all of it: ``bash .ci/gpu``).

For every built-in cell: forward outputs and every gradient match the NumPy
module (float64: 1e-10, float32: 1e-4, relative), central finite differences
pass in float64, and two runs give bit-identical gradients.

Without CuPy or a GPU these tests skip; with SYMRNN_REQUIRE_GPU=1 (set by
.ci/gpu) they fail instead, so a GPU run cannot pass by skipping.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from cupy_support import LENGTHS, TOL, compare, fresh_cupy_module, numpy_module
from symrnn.gradcheck import FD_TOL, finite_differences, random_problem

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="session")
def cp():
    try:
        import cupy

        devices = cupy.cuda.runtime.getDeviceCount()
        if devices < 1:
            raise RuntimeError("no CUDA device")
    except Exception as exc:  # ImportError, CUDARuntimeError
        reason = f"CuPy with a CUDA device is needed ({type(exc).__name__}: {exc})"
        if os.environ.get("SYMRNN_REQUIRE_GPU"):
            pytest.fail(reason + " and SYMRNN_REQUIRE_GPU is set")
        pytest.skip(reason)
    return cupy


class OnHost:
    """A generated CuPy module behind NumPy arrays, for symrnn.gradcheck."""

    def __init__(self, module, cp):
        self.m, self.cp = module, cp
        self.FIXED_DIMS, self.STATES, self.PARAM_SHAPES = module.FIXED_DIMS, module.STATES, module.PARAM_SHAPES
        if hasattr(module, "loss_and_grads"):
            self.loss_and_grads = self._loss_and_grads

    def _dev(self, d):
        return {k: self.cp.asarray(v) for k, v in (d or {}).items()}

    def _host(self, d):
        return {k: self.cp.asnumpy(v) for k, v in d.items()}

    def init_params(self, *args, **kwargs):
        return self._host(self.m.init_params(*args, **kwargs))

    def forward(self, params, x, state0=None):
        out, cache = self.m.forward(self._dev(params), self.cp.asarray(x), self._dev(state0))
        return self._host(out), cache

    def backward(self, params, cache, grad_outputs):
        return self._host(self.m.backward(self._dev(params), cache, self._dev(grad_outputs)))

    def _loss_and_grads(self, params, x, target, state0=None):
        loss, grads = self.m.loss_and_grads(self._dev(params), self.cp.asarray(x), self.cp.asarray(target), self._dev(state0))
        return float(loss), self._host(grads)


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
def test_gpu_matches_numpy(cp, cell_name, dtype):
    module = fresh_cupy_module(cell_name)
    for seed, (T, B) in enumerate([(5, 3), (17, 37)]):  # and sizes that are no multiple of the block
        for steps in LENGTHS:
            errors = compare(module, cp, cell_name, dtype, T=T, B=B, seed=seed, steps=steps)
            bad = {k: e for k, e in errors.items() if not e <= TOL[dtype]}
            assert not bad, (f"{cell_name} ({np.dtype(dtype).name}, T={T}, B={B}, {steps}): relative errors above "
                             f"{TOL[dtype]}: {bad}")


def test_gpu_finite_differences_float64(cp, cell_name):
    module = OnHost(fresh_cupy_module(cell_name), cp)
    problem = random_problem(numpy_module(cell_name), T=4, B=2)
    results = finite_differences(module, problem)
    if hasattr(module, "loss_and_grads") and problem.target is not None:
        results += finite_differences(module, problem, loss=True)
    bad = [(r.check, r.name, r.error) for r in results if not r.ok]
    assert not bad, f"{cell_name}: finite differences above {FD_TOL}: {bad}"


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["float64", "float32"])
def test_gpu_reruns_are_bit_identical(cp, cell_name, dtype):
    """No atomics: bias and batch reductions are cupy.sum / cuBLAS, deterministic run to run."""
    ref = numpy_module(cell_name)
    fixed = ref.FIXED_DIMS
    n_in, n_hidden = fixed.get("n_in", 64), fixed.get("n_hidden", 96)
    module = fresh_cupy_module(cell_name)
    params = module.init_params(n_in, n_hidden, fixed.get("n_out", 32), seed=3, dtype=dtype)
    rng = np.random.default_rng(5)
    x = cp.asarray(rng.standard_normal((20, 48, module.input_size(n_in, n_hidden, fixed.get("n_out", 32)))).astype(dtype))
    runs = []
    for _ in range(2):
        out, cache = module.forward(params, x)
        go = {k: cp.ones_like(v) for k, v in out.items()}
        grads = module.backward(params, cache, go)
        runs.append({k: cp.asnumpy(v) for k, v in {**out, **{"d_" + k: g for k, g in grads.items()}}.items()})
    for k in runs[0]:
        assert np.array_equal(runs[0][k], runs[1][k]), f"{cell_name}: {k} differs between two identical runs"
