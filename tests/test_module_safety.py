"""The module contract is safe to use: what a caller does with its arrays between forward
and backward either changes nothing or is a clear error, never a silently wrong gradient.
(Issue "Trust", item 4.)"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import CELLS
from cupy_support import numpy_module
from symrnn.cells import builtin
from symrnn.gradcheck import random_problem

LOSS_CELLS = [c for c in CELLS if builtin(c).loss is not None]
MEAN_CELLS = [c for c in LOSS_CELLS if builtin(c).loss.reduction == "mean"]
SUM_CELLS = [c for c in LOSS_CELLS if builtin(c).loss.reduction == "sum"]


def reference(module, problem):
    outputs, cache = module.forward(problem.params, problem.x, problem.state0)
    return {k: v.copy() for k, v in outputs.items()}, module.backward(problem.params, cache, problem.grad_outputs)


def same(a: dict, b: dict) -> bool:
    return set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)


def test_outputs_are_read_only_and_cannot_change_the_gradients(module):
    problem = random_problem(module, seed=1, T=4, B=2)
    _, want = reference(module, problem)
    outputs, cache = module.forward(problem.params, problem.x, problem.state0)
    for name, value in outputs.items():
        with pytest.raises(ValueError, match="read-only"):
            value *= 0
    assert same(module.backward(problem.params, cache, problem.grad_outputs), want)


def test_changing_x_in_place_after_forward_changes_nothing(module):
    problem = random_problem(module, seed=2, T=4, B=2)
    _, want = reference(module, problem)
    x = problem.x.copy()
    outputs, cache = module.forward(problem.params, x, problem.state0)
    x *= 3.0  # the caller reuses its buffer
    assert same(module.backward(None, cache, problem.grad_outputs), want)


def test_changing_params_in_place_after_forward_is_a_clear_error(module):
    """An optimizer step in place between forward and backward: backward names the
    parameter; with params=None it gives forward's gradients."""
    problem = random_problem(module, seed=3, T=4, B=2)
    _, want = reference(module, problem)
    params = {k: v.copy() for k, v in problem.params.items()}
    _, cache = module.forward(params, problem.x, problem.state0)
    name = next(iter(params))
    params[name] -= 0.1
    with pytest.raises(ValueError, match=f"parameter '{name}' differs from the one forward ran with"):
        module.backward(params, cache, problem.grad_outputs)
    assert same(module.backward(None, cache, problem.grad_outputs), want)
    with pytest.raises(ValueError, match="unknown parameter 'nope'"):
        module.backward({**problem.params, "nope": 1.0}, cache, problem.grad_outputs)


@pytest.mark.parametrize("backend", ["numpy", "numba"])
@pytest.mark.parametrize("n_hidden", [3, 80])  # every parameter under 64 KiB; weight_hh 200 KiB
def test_backward_compares_params_bit_for_bit(backend, n_hidden):
    """A parameter holding a NaN (a diverged run) is forward's own: backward does not call it
    changed; one element changed in place (-0.0 for 0.0 too) is named, in a small parameter
    and in a large one."""
    import importlib

    pytest.importorskip(backend)
    module = importlib.import_module(f"generated.lstm_torch_{backend}")
    problem = random_problem(module, seed=6, T=3, B=2, n_in=4, n_hidden=n_hidden)
    params = {k: v.copy() for k, v in problem.params.items()}
    params["bias_ih_l0"][1] = np.nan
    params["weight_hh_l0"][-1, -1] = 0.0
    _, cache = module.forward(params, problem.x, problem.state0)
    module.backward(params, cache, problem.grad_outputs)
    for name, index, value in (("weight_hh_l0", (-1, -1), -0.0), ("weight_hh_l0", (0, 1), 0.5), ("bias_ih_l0", 1, 0.0)):
        changed = {k: v.copy() for k, v in params.items()}
        changed[name][index] = value
        with pytest.raises(ValueError, match=f"parameter '{name}' differs from the one forward ran with"):
            module.backward(changed, cache, problem.grad_outputs)


def test_float32_forward_accepts_float64_params_in_backward(module):
    """forward casts the parameters to x's dtype: backward compares in that dtype."""
    problem = random_problem(module, seed=4, T=3, B=2)
    _, cache = module.forward(problem.params, problem.x.astype(np.float32), problem.state0)
    grads = module.backward(problem.params, cache, problem.grad_outputs)
    assert all(g.dtype == np.float32 for g in grads.values())


def test_an_unknown_grad_outputs_key_is_an_error(module):
    problem = random_problem(module, seed=5, T=3, B=2)
    _, cache = module.forward(problem.params, problem.x, problem.state0)
    bad = {k.upper() + "_typo": v for k, v in problem.grad_outputs.items()}
    with pytest.raises(ValueError, match=r"grad_outputs has no output '.*_typo'; cell '.*' has the outputs "):
        module.backward(None, cache, bad)
    with pytest.raises(ValueError, match="grad_outputs has no output"):
        module.rtrl_grads(problem.params, problem.x, bad, problem.state0)


def test_no_time_steps(module):
    """T = 0: forward gives empty outputs, backward zero gradients of the right shapes."""
    problem = random_problem(module, seed=6, T=2, B=2)
    x = problem.x[:0]
    outputs, cache = module.forward(problem.params, x, problem.state0)
    assert all(v.shape[0] == 0 for v in outputs.values())
    grads = module.backward(None, cache, {k: v[:0] for k, v in problem.grad_outputs.items()})
    for name, value in problem.params.items():
        assert grads[name].shape == np.shape(value) and not np.any(grads[name])
    assert grads["x"].shape == x.shape


@pytest.mark.parametrize("cell_name", MEAN_CELLS)
def test_no_time_steps_with_a_mean_loss_is_a_clear_error(module):
    problem = random_problem(module, seed=6, T=2, B=2)
    with pytest.raises(ValueError, match=r"no time steps \(T = 0\): the mean of the loss over time is undefined"):
        module.loss_and_grads(problem.params, problem.x[:0], problem.target[:0], problem.state0)
    with pytest.raises(ValueError, match=r"T = 0"):
        module.rtrl_loss_and_grads(problem.params, problem.x[:0], problem.target[:0], problem.state0)


@pytest.mark.parametrize("cell_name", SUM_CELLS)
def test_no_time_steps_with_a_summed_loss_is_zero(module):
    problem = random_problem(module, seed=6, T=2, B=2)
    loss, grads = module.loss_and_grads(problem.params, problem.x[:0], problem.target[:0], problem.state0)
    assert loss == 0 and not any(np.any(g) for g in grads.values())


@pytest.mark.parametrize("sizes", [(3, 0), (3, -1), (0, 4), (3, 4, 0), (3, 2.5), (3, True), (3, "4"), (3, None)])
def test_sizes_that_are_not_positive_integers_are_a_clear_error(sizes):
    module = numpy_module("lstm_torch")
    with pytest.raises(ValueError, match=r"n_\w+ = .*: a size is a positive integer"):
        module.init_params(*sizes)
    assert module.init_params(3, np.int64(4))["weight_hh_l0"].shape == (16, 4)


@pytest.mark.parametrize("what", ["param", "x", "state0", "grad_outputs", "target"])
def test_complex_numbers_are_refused_not_truncated(what):
    module = numpy_module("elman")
    problem = random_problem(module, seed=7, T=3, B=2)
    params, x, state0, go, target = dict(problem.params), problem.x, dict(problem.state0), dict(problem.grad_outputs), problem.target
    if what == "param":
        params["W"] = params["W"] + 1j
    elif what == "x":
        x = x + 1j
    elif what == "state0":
        state0["s"] = state0["s"] + 1j
    elif what == "grad_outputs":
        go["s"] = go["s"] + 1j
    else:
        target = target + 1j
    with pytest.raises(ValueError, match="dtype complex128; expected (real numbers|float32 or float64)"):
        if what == "grad_outputs":
            module.backward(None, module.forward(params, x, state0)[1], go)
        elif what == "target":
            module.loss_and_grads(params, x, target, state0)
        else:
            module.forward(params, x, state0)


def test_cupy_modules_keep_the_same_promises(tmp_path, monkeypatch):
    """The CuPy module (run on the host stand-in): outputs and the cache are its own
    copies, a changed parameter is named, unknown cotangents and complex input refused."""
    from host_cupy import host_cupy
    from symrnn.pipeline import build, load_module, render_cupy

    xp = host_cupy(tmp_path)
    monkeypatch.setitem(__import__("sys").modules, "cupy", xp)
    cu = load_module(render_cupy(build("lstm_torch")), "lstm_torch_cupy")
    problem = random_problem(numpy_module("lstm_torch"), seed=8, T=3, B=2)
    params, x = {k: v.copy() for k, v in problem.params.items()}, problem.x.copy()
    outputs, cache = cu.forward(params, x, problem.state0)
    want = cu.backward(params, cache, problem.grad_outputs)
    outputs["h"] *= 0
    x *= 2
    assert same(cu.backward(None, cache, problem.grad_outputs), want)
    params["weight_hh_l0"] += 1
    with pytest.raises(ValueError, match="parameter 'weight_hh_l0' differs"):
        cu.backward(params, cache, problem.grad_outputs)
    with pytest.raises(ValueError, match="grad_outputs has no output 'H'"):
        cu.backward(None, cache, {"H": problem.grad_outputs["h"]})
    with pytest.raises(ValueError, match="expected real numbers"):
        cu.forward({**problem.params, "bias_ih_l0": problem.params["bias_ih_l0"] + 1j}, problem.x)
    with pytest.raises(ValueError, match="a size is a positive integer"):
        cu.param_shapes(3, 0)
