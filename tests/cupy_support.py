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


#: variable lengths the comparisons run with (B = 3 and T = 5, or T = 17 and B = 37): none; 0, 1, T and
#: unsorted; the same read backwards within each row's length
LENGTHS = {"no lengths": (None, False), "lengths": ([5, 0, 1], False), "lengths reversed": ([2, 5, 1], True)}


def lengths_for(steps, T: int, B: int):
    """``LENGTHS[steps]`` for T steps and B rows (the pattern repeated over the rows, capped at T)."""
    lengths, reverse = LENGTHS[steps]
    return (None if lengths is None else np.minimum(np.resize(lengths, B), T)), reverse


def compare(cu, xp, cell: str, dtype, *, T=5, B=3, seed=0, steps="no lengths") -> dict[str, float]:
    """Relative errors of the CuPy module ``cu`` (arrays through ``xp``) against the
    NumPy module: every forward output and every gradient, on one random instance
    with non-zero initial states and cotangents for every output (``steps``: a key of
    LENGTHS; with lengths, also the final states, and cotangents for them)."""
    ref = numpy_module(cell)
    pr = random_problem(ref, T=T, B=B, seed=seed, dtype=dtype)
    lengths, reverse = lengths_for(steps, T, B)
    kw = {} if lengths is None and not reverse else {"lengths": lengths, "reverse": reverse}
    rng = np.random.default_rng(seed)
    grad_final = {k: rng.standard_normal(v.shape).astype(dtype) for k, v in pr.state0.items()} if kw else None
    out_ref, cache_ref = ref.forward(pr.params, pr.x, pr.state0, **kw)
    grads_ref = ref.backward(pr.params, cache_ref, pr.grad_outputs, grad_final)
    to = xp.asarray
    params = {k: to(v) for k, v in pr.params.items()}
    state0 = {k: to(v) for k, v in pr.state0.items()}
    out, cache = cu.forward(params, to(pr.x), state0, **kw)
    grads = cu.backward(params, cache, {k: to(v) for k, v in pr.grad_outputs.items()},
                        None if grad_final is None else {k: to(v) for k, v in grad_final.items()})
    host = getattr(xp, "asnumpy", np.asarray)
    errors = {}
    if kw:
        final_ref, final = ref.final_states(cache_ref), cu.final_states(cache)
        errors |= {"final_" + k: rel_error(host(final[k]), final_ref[k]) for k in final_ref}
    for k in out_ref:
        assert out[k].dtype == dtype and out[k].shape == out_ref[k].shape, k
        errors[k] = rel_error(host(out[k]), out_ref[k])
    assert set(grads) == set(grads_ref)
    for k in grads_ref:
        assert grads[k].dtype == dtype and grads[k].shape == np.shape(grads_ref[k]), k
        errors["d_" + k] = rel_error(host(grads[k]), grads_ref[k])
    return errors
