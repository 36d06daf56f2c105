"""Seed 002 (one sigmoid unit with a linear readout), transcribed loop by loop.

The reference below follows seed 002's recursions literally, one sequence at a
time, in plain Python floats, and sums over the batch:

    a^t = w x^t + v h^{t-1} + b,   h^t = sigmoid(a^t),   yhat^t = u h^t + d
    L   = (1/T) sum_t (y^t - yhat^t)^2 / 2

    dL/dd = (1/T) sum_t -(y^t - yhat^t)
    dL/du = (1/T) sum_t -(y^t - yhat^t) h^t
    dh^t/db = sigma'(a^t) [v dh^{t-1}/db + 1]
    dh^t/dw = sigma'(a^t) [v dh^{t-1}/dw + x^t]
    dh^t/dv = sigma'(a^t) [v dh^{t-1}/dv + h^{t-1}]
    dL/dtheta = (1/T) sum_t -(y^t - yhat^t) u dh^t/dtheta      (theta in w, v, b)

with zero sensitivities before t = 0, so dh^0/db = sigma'(a^0),
dh^0/dw = sigma'(a^0) x^0 (the seed writes x^t there, a slip) and
dh^0/dv = sigma'(a^0) h^{-1}.  In the seed y is the target and yhat the
prediction; in the generated module outputs["y"] is the prediction and
``target`` the target.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from generated import single_sigmoid_numpy as m

PARAMS = ("w", "v", "b", "u", "d")


def sigmoid(a: float) -> float:
    return 1.0 / (1.0 + math.exp(-a))


def seed002_reference(params, x, target, h_init):
    """Loss and dL/d{w, v, b, u, d} (and dL/dh^{-1}) by seed 002's forward recursions.

    x, target: (T, B, 1); h_init: (B, 1).  Python floats throughout.
    """
    w, v, b, u, d = (float(params[k]) for k in PARAMS)
    T, B = x.shape[0], x.shape[1]
    loss = 0.0
    grads = {k: 0.0 for k in PARAMS}
    grads_h0 = []
    for n in range(B):  # one sequence at a time
        h_prev = float(h_init[n, 0])
        dh_db = dh_dw = dh_dv = 0.0  # sensitivities before t = 0
        dh_dh0 = 1.0  # dh^{-1}/dh^{-1} (an extension of the seed: the initial-state gradient)
        L = dL_dd = dL_du = dL_db = dL_dw = dL_dv = dL_dh0 = 0.0
        for t in range(T):
            xt = float(x[t, n, 0])
            yt = float(target[t, n, 0])  # the seed's y: the target
            a = w * xt + v * h_prev + b
            h = sigmoid(a)
            sp = h * (1.0 - h)  # sigma'(a^t)
            yhat = u * h + d  # the seed's yhat: the prediction
            dh_db = sp * (v * dh_db + 1.0)
            dh_dw = sp * (v * dh_dw + xt)
            dh_dv = sp * (v * dh_dv + h_prev)
            dh_dh0 = sp * v * dh_dh0
            err = yt - yhat
            L += err * err / 2.0
            dL_dd += -err
            dL_du += -err * h
            dL_db += -err * u * dh_db
            dL_dw += -err * u * dh_dw
            dL_dv += -err * u * dh_dv
            dL_dh0 += -err * u * dh_dh0
            h_prev = h
        loss += L / T
        grads["d"] += dL_dd / T
        grads["u"] += dL_du / T
        grads["b"] += dL_db / T
        grads["w"] += dL_dw / T
        grads["v"] += dL_dv / T
        grads_h0.append(dL_dh0 / T)
    return loss, grads, np.array(grads_h0).reshape(B, 1)


def _problem(seed, nonzero_state0, T=9, B=4):
    rng = np.random.default_rng(seed)
    params = {k: np.float64(rng.uniform(-1.5, 1.5)) for k in PARAMS}
    x = rng.standard_normal((T, B, 1))
    target = rng.standard_normal((T, B, 1))
    state0 = {"h": rng.uniform(0.05, 0.95, (B, 1))} if nonzero_state0 else None
    return params, x, target, state0


def rel(a, b) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    nb = np.linalg.norm(b)
    assert nb > 0
    return float(np.linalg.norm(a - b) / nb)


def test_module_is_seed002():
    assert m.CELL == "single_sigmoid"
    assert m.FIXED_DIMS == {"n_in": 1, "n_hidden": 1, "n_out": 1}
    assert set(m.PARAM_SHAPES) == set(PARAMS)
    assert all(shape == () for shape in m.PARAM_SHAPES.values())
    assert m.STATES == {"h": "1"}
    assert set(m.OUTPUTS) == {"h", "y"}


@pytest.mark.parametrize("nonzero_state0", [False, True], ids=["h0_zero", "h0_nonzero"])
@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
@pytest.mark.parametrize("kernel", ["loss_and_grads", "rtrl_loss_and_grads"])
def test_matches_seed002_recursions(kernel, seed, nonzero_state0):
    params, x, target, state0 = _problem(seed, nonzero_state0)
    h_init = state0["h"] if state0 is not None else np.zeros((x.shape[1], 1))
    ref_loss, ref_grads, ref_h0 = seed002_reference(params, x, target, h_init)

    loss, grads = getattr(m, kernel)(params, x, target, state0)
    assert set(grads) == set(PARAMS) | {"x", "h0"}
    err = rel(loss, ref_loss)
    assert err < 1e-12, f"{kernel}: loss rel err {err:.3e}"
    for k in PARAMS:
        assert np.shape(grads[k]) == ()
        err = rel(grads[k], ref_grads[k])
        assert err < 1e-12, f"{kernel}: dL/d{k} rel err {err:.3e} ({float(grads[k])!r} vs {ref_grads[k]!r})"
    err = rel(grads["h0"], ref_h0)
    assert err < 1e-12, f"{kernel}: dL/dh0 rel err {err:.3e}"


@pytest.mark.parametrize("seed", [0, 1])
def test_forward_matches_seed002(seed):
    """outputs["h"] and outputs["y"] (the prediction yhat) follow the seed's forward pass."""
    params, x, target, state0 = _problem(seed, True)
    outputs, _ = m.forward(params, x, state0)
    w, v, b, u, d = (float(params[k]) for k in PARAMS)
    T, B = x.shape[0], x.shape[1]
    for n in range(B):
        h_prev = float(state0["h"][n, 0])
        for t in range(T):
            h = sigmoid(w * float(x[t, n, 0]) + v * h_prev + b)
            assert abs(outputs["h"][t, n, 0] - h) <= 1e-14 * abs(h)
            assert abs(outputs["y"][t, n, 0] - (u * h + d)) <= 1e-13 * max(1.0, abs(u * h + d))
            h_prev = h


@pytest.mark.parametrize("nonzero_state0", [False, True], ids=["h0_zero", "h0_nonzero"])
@pytest.mark.parametrize("kernel", ["loss_and_grads", "rtrl_loss_and_grads"])
def test_float32(kernel, nonzero_state0):
    params, x, target, state0 = _problem(7, nonzero_state0)
    params32 = {k: np.float32(val) for k, val in params.items()}
    x32, target32 = x.astype(np.float32), target.astype(np.float32)
    state32 = {"h": state0["h"].astype(np.float32)} if state0 is not None else None
    # reference in float64 from the float32-rounded data
    ref_loss, ref_grads, _ = seed002_reference(
        params32, x32, target32, state32["h"] if state32 is not None else np.zeros((x.shape[1], 1))
    )

    loss, grads = getattr(m, kernel)(params32, x32, target32, state32)
    for k, g in grads.items():
        assert np.asarray(g).dtype == np.float32, f"{kernel}: grads[{k!r}] has dtype {np.asarray(g).dtype}"
    assert np.asarray(loss).dtype == np.float32
    assert rel(loss, ref_loss) < 1e-5
    for k in PARAMS:
        assert rel(grads[k], ref_grads[k]) < 1e-4, (k, float(grads[k]), ref_grads[k])
