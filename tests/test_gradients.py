"""Every built-in cell: finite differences, RTRL = BPTT, loss gradients, float32."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import CELLS
from symrnn.cells import builtin
from symrnn.gradcheck import directional, finite_differences, random_problem, rel_error, rtrl_vs_bptt


@pytest.mark.parametrize("seed", [0, 1])
def test_finite_differences(module, seed):
    problem = random_problem(module, seed=seed, T=6, B=3)
    results = finite_differences(module, problem)
    assert {r.name for r in results} == set(module.PARAM_SHAPES) | {"x"} | {f"{s}0" for s in module.STATES}
    bad = [(r.name, r.error) for r in results if r.error >= 1e-6]
    assert not bad, bad


def test_directional_derivative(module):
    result = directional(module, random_problem(module, seed=3, T=7, B=2))
    assert result.error < 1e-6


def test_rtrl_equals_bptt(module):
    results = rtrl_vs_bptt(module, random_problem(module, seed=5, T=5, B=2))
    bad = [(r.name, r.error) for r in results if r.error >= 1e-10]
    assert not bad, bad


@pytest.mark.parametrize("cell_name", [c for c in CELLS if builtin(c).loss is not None])
def test_loss_gradients(module):
    problem = random_problem(module, seed=2, T=5, B=2)
    bad = [(r.name, r.error) for r in finite_differences(module, problem, loss=True) if r.error >= 1e-6]
    assert not bad, bad
    loss, grads = module.loss_and_grads(problem.params, problem.x, problem.target, problem.state0)
    rtrl_loss, rtrl = module.rtrl_loss_and_grads(problem.params, problem.x, problem.target, problem.state0)
    assert rel_error(loss, rtrl_loss) < 1e-12
    assert max(rel_error(rtrl[k], grads[k]) for k in grads) < 1e-10


def test_float32_matches_float64(module):
    p64 = random_problem(module, seed=4, T=5, B=2)
    cast = lambda d: {k: v.astype(np.float32) for k, v in d.items()}  # noqa: E731
    out32, cache32 = module.forward(cast(p64.params), p64.x.astype(np.float32), cast(p64.state0))
    out64, cache64 = module.forward(p64.params, p64.x, p64.state0)
    g32 = module.backward(None, cache32, cast(p64.grad_outputs))
    g64 = module.backward(None, cache64, p64.grad_outputs)
    for k in out64:
        assert out32[k].dtype == np.float32
        assert rel_error(out32[k], out64[k]) < 1e-5
    for k in g64:
        assert g32[k].dtype == np.float32, k
        assert rel_error(g32[k], g64[k]) < 1e-4, k


def test_missing_outputs_are_zero(module):
    problem = random_problem(module, seed=6, T=4, B=2)
    _, cache = module.forward(problem.params, problem.x, problem.state0)
    first = next(iter(problem.grad_outputs))
    partial = module.backward(None, cache, {first: problem.grad_outputs[first]})
    zeros = {k: np.zeros_like(v) for k, v in problem.grad_outputs.items()}
    zeros[first] = problem.grad_outputs[first]
    full = module.backward(None, cache, zeros)
    for k in full:
        np.testing.assert_array_equal(partial[k], full[k])


@pytest.mark.parametrize("cell_name", ["lstm_torch", "single_sigmoid"])
@pytest.mark.parametrize("change", [0.01, "flip"])
def test_finite_differences_catch_a_wrong_gradient(module, change):
    """The check can fail: every gradient, in turn, off by 1 % or with its sign flipped
    (the rounding floor of symrnn.gradcheck.fd_error is far below either)."""
    problem = random_problem(module, seed=0, T=6, B=3)
    backward = module.backward
    for key in [*module.PARAM_SHAPES, "x"]:
        def wrong(params, cache, grad_outputs, key=key):
            grads = backward(params, cache, grad_outputs)
            off = -grads[key] if change == "flip" else grads[key] + change * np.abs(grads[key]).max()
            return {**grads, key: off}

        module.backward = wrong
        try:
            errors = {r.name: r.error for r in finite_differences(module, problem)}
        finally:
            module.backward = backward
        assert errors[key] > 1e-4 and all(e < 1e-6 for k, e in errors.items() if k != key), (key, errors)
