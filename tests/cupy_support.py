"""Shared by the CuPy tests: rendered sources, comparison with the NumPy module."""

from __future__ import annotations

import numpy as np

from conftest import rendered
from symrnn.gradcheck import random_problem, rel_error
from symrnn.pipeline import build, load_module, module_name, render_cupy, render_cuda

#: tolerance of CuPy against NumPy, per dtype (relative, in the norm)
TOL = {np.float64: 1e-10, np.float32: 1e-4}

_CUPY: dict[str, str] = {}
_CUDA: dict[str, str] = {}


def cupy_source(cell: str) -> str:
    """The CuPy module source of a built-in cell (rendered once per session)."""
    if cell not in _CUPY:
        _CUPY[cell] = render_cupy(build(cell))
    return _CUPY[cell]


def cuda_source(cell: str) -> str:
    if cell not in _CUDA:
        _CUDA[cell] = render_cuda(build(cell))
    return _CUDA[cell]


def fresh_cupy_module(cell: str):
    return load_module(cupy_source(cell), module_name(cell, "cupy"))


def numpy_module(cell: str):
    return load_module(rendered(cell), module_name(cell))


def compare(cu, xp, cell: str, dtype, *, T=5, B=3, seed=0) -> dict[str, float]:
    """Relative errors of the CuPy module ``cu`` (arrays through ``xp``) against the
    NumPy module: every forward output and every gradient, on one random instance
    with non-zero initial states and cotangents for every output."""
    ref = numpy_module(cell)
    pr = random_problem(ref, T=T, B=B, seed=seed, dtype=dtype)
    out_ref, cache_ref = ref.forward(pr.params, pr.x, pr.state0)
    grads_ref = ref.backward(pr.params, cache_ref, pr.grad_outputs)
    to = xp.asarray
    params = {k: to(v) for k, v in pr.params.items()}
    state0 = {k: to(v) for k, v in pr.state0.items()}
    out, cache = cu.forward(params, to(pr.x), state0)
    grads = cu.backward(params, cache, {k: to(v) for k, v in pr.grad_outputs.items()})
    host = getattr(xp, "asnumpy", np.asarray)
    errors = {}
    for k in out_ref:
        assert out[k].dtype == dtype and out[k].shape == out_ref[k].shape, k
        errors[k] = rel_error(host(out[k]), out_ref[k])
    assert set(grads) == set(grads_ref)
    for k in grads_ref:
        assert grads[k].dtype == dtype and grads[k].shape == np.shape(grads_ref[k]), k
        errors["d_" + k] = rel_error(host(grads[k]), grads_ref[k])
    return errors
