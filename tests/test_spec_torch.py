"""Each shipped spec-file cell against an independent implementation of the same
equations written here directly with torch autograd (float64, 1e-10): forward
outputs, every gradient of backward (parameters, input, initial states), and
the loss and its gradients where the cell has one."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from symrnn.cells import SPEC_CELLS
from symrnn.pipeline import build, load_module, render_numpy

T, B, N_IN, N_HIDDEN, N_OUT = 6, 3, 4, 5, 2
sig = torch.sigmoid


def cat(*vs):
    return torch.cat(vs, dim=-1)


def lin(W, v):
    return v @ W.T


def mgu(p, x, s):
    h = s["h"]
    f = sig(lin(p["W_f"], cat(h, x)) + p["b_f"])
    h_tilde = torch.tanh(lin(p["W_h"], cat(f * h, x)) + p["b_h"])
    return {"h": (1 - f) * h + f * h_tilde}


def indrnn(p, x, s):
    return {"h": torch.relu(lin(p["W"], x) + p["u"] * s["h"] + p["b"])}


def mingru(p, x, s):
    z = sig(lin(p["W_z"], x) + p["b_z"])
    h_tilde = lin(p["W_h"], x) + p["b_h"]
    return {"h": (1 - z) * s["h"] + z * h_tilde}


def lstm_peephole(p, x, s):
    h, c = s["h"], s["c"]
    hx = cat(h, x)
    i = sig(lin(p["W_i"], hx) + p["p_i"] * c + p["b_i"])
    f = sig(lin(p["W_f"], hx) + p["p_f"] * c + p["b_f"])
    g = torch.tanh(lin(p["W_g"], hx) + p["b_g"])
    c_new = f * c + i * g
    o = sig(lin(p["W_o"], hx) + p["p_o"] * c_new + p["b_o"])
    return {"h": o * torch.tanh(c_new), "c": c_new}


def lstm_forget_bias(p, x, s, forget_bias=1.0):
    h, c = s["h"], s["c"]
    hx = cat(h, x)
    i = sig(lin(p["W_i"], hx) + p["b_i"])
    f = sig(lin(p["W_f"], hx) + p["b_f"] + forget_bias)
    g = torch.tanh(lin(p["W_g"], hx) + p["b_g"])
    o = sig(lin(p["W_o"], hx) + p["b_o"])
    c_new = f * c + i * g
    return {"h": o * torch.tanh(c_new), "c": c_new}


def antisymmetric_rnn(p, x, s, eps=0.1, gamma=0.01):
    """Chang et al. 2019: h = h_prev + eps tanh((W - W^T - gamma I) h_prev + V x + b)."""
    W = p["W"]
    A = W - W.T - gamma * torch.eye(W.shape[0], dtype=W.dtype)
    return {"h": s["h"] + eps * torch.tanh(lin(A, s["h"]) + lin(p["V"], x) + p["b"])}


def rg_lru(p, x, s, c=8.0):
    """De et al. 2024 (Griffin), the power form: a_t = sigmoid(Lambda)^(c r_t)."""
    r = sig(lin(p["W_a"], x) + p["b_a"])
    i = sig(lin(p["W_x"], x) + p["b_x"])
    a_t = sig(p["Lambda"]) ** (c * r)
    return {"h": a_t * s["h"] + torch.sqrt(1 - a_t**2) * (i * x)}
def layer_norm_lstm(p, x, s, eps=1e-5):
    """haste's LayerNormLSTM (Ba et al. 2016): LN(W x) + LN(R h) over all 4 gates' units, each
    with its own gain and no bias, then the bias; gates in haste's order i, g, f, o; h from LN(c)."""
    h, c = s["h"], s["c"]
    n4 = p["b"].shape[-1]
    v = (F.layer_norm(lin(p["W"], x), (n4,), weight=p["gamma_x"], eps=eps)
         + F.layer_norm(lin(p["R"], h), (n4,), weight=p["gamma_r"], eps=eps) + p["b"])
    i, g, f, o = v.chunk(4, dim=-1)
    c_new = sig(f) * c + sig(i) * torch.tanh(g)
    c_norm = F.layer_norm(c_new, (c_new.shape[-1],), weight=p["gamma_c"], bias=p["beta_c"], eps=eps)
    return {"h": sig(o) * torch.tanh(c_norm), "c": c_new}


def elman(p, x, s):
    return {"h": torch.tanh(lin(p["W"], x) + lin(p["U"], s["h"]) + p["b"])}


def classifier_readout(p, h):
    z = lin(p["V"], h) + p["c"]
    return {"z": z, "logp": F.log_softmax(z, dim=-1)}


#: cell -> (step, readout or None, loss (y, target) -> per-step value or None, reduction)
def _sq(y, target):
    return ((y - target) ** 2 / 2).sum()


def _cross_entropy(logp, target):
    return -(target * logp).sum()


ORACLES = {
    "mgu": (mgu, lambda p, h: lin(p["V"], h) + p["b_y"], _sq, "mean"),
    "indrnn": (indrnn, None, None, None),
    "mingru": (mingru, lambda p, h: lin(p["V"], h), _sq, "sum"),
    "lstm_peephole": (lstm_peephole, None, None, None),
    "lstm_forget_bias": (lstm_forget_bias, lambda p, h: lin(p["V"], h) + p["b_y"], _sq, "mean"),
    "antisymmetric_rnn": (antisymmetric_rnn, None, None, None),
    "rg_lru": (rg_lru, None, None, None),
    "layer_norm_lstm": (layer_norm_lstm, lambda p, h: lin(p["V"], h) + p["b_y"], _sq, "mean"),
    "elman_classifier": (elman, classifier_readout, _cross_entropy, "sum"),
}
#: the readout a loss compares with its target, where it is not y; cells whose target is one-hot
TARGET_OF = {"elman_classifier": "logp"}
ONE_HOT = {"elman_classifier"}


def test_every_shipped_spec_cell_has_an_oracle():
    assert set(ORACLES) == set(SPEC_CELLS)


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    nb = np.linalg.norm(b)
    assert nb > 0, "reference is zero; the comparison would be vacuous"
    return float(np.linalg.norm(a - b) / nb)


def torch_run(cell, params, x, state0):
    step, readout, _, _ = ORACLES[cell]
    p = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    x_t = torch.tensor(x, requires_grad=True)
    s0 = {k: torch.tensor(v, requires_grad=True) for k, v in state0.items()}
    s, seqs = s0, {k: [] for k in state0}
    ys = {}
    for t in range(x.shape[0]):
        s = step(p, x_t[t], s)
        for k in s:
            seqs[k].append(s[k])
        if readout is not None:
            y = readout(p, s["h"])
            for k, v in (y if isinstance(y, dict) else {"y": y}).items():
                ys.setdefault(k, []).append(v)
    outputs = {k: torch.stack(v) for k, v in seqs.items()}
    outputs |= {k: torch.stack(v) for k, v in ys.items()}
    return p, x_t, s0, outputs


def grads_of(value, p, x_t, s0):
    leaves = [*p.values(), x_t, *s0.values()]
    got = torch.autograd.grad(value, leaves)
    keys = [*p, "x", *(f"{k}0" for k in s0)]
    return {k: g.numpy() for k, g in zip(keys, got)}


@pytest.mark.parametrize("cell", SPEC_CELLS)
@pytest.mark.parametrize("seed", [0, 1])
def test_generated_module_matches_torch_autograd(cell, seed):
    module = load_module(render_numpy(build(cell)), cell)
    rng = np.random.default_rng(seed)
    params = {k: 0.5 * rng.standard_normal(v) for k, v in module.param_shapes(N_IN, N_HIDDEN, N_OUT).items()}
    x = rng.standard_normal((T, B, module.input_size(N_IN, N_HIDDEN, N_OUT)))  # rg_lru: the state's width
    state0 = {s: 0.5 * rng.standard_normal((B, N_HIDDEN)) for s in module.STATES}

    outputs, cache = module.forward(params, x, dict(state0))
    p, x_t, s0, ref = torch_run(cell, params, x, state0)
    assert set(outputs) == set(ref)
    for k in ref:
        assert rel_err(outputs[k], ref[k].detach().numpy()) < 1e-10, k

    cot = {k: rng.standard_normal(v.shape) for k, v in outputs.items()}
    grads = module.backward(params, cache, cot)
    objective = sum((ref[k] * torch.tensor(g)).sum() for k, g in cot.items())
    expected = grads_of(objective, p, x_t, s0)
    assert set(grads) == set(expected)
    bad = {k: rel_err(grads[k], expected[k]) for k in expected if rel_err(grads[k], expected[k]) >= 1e-10}
    assert not bad, bad

    _, _, loss_fn, reduction = ORACLES[cell]
    assert hasattr(module, "loss_and_grads") == (loss_fn is not None)
    if loss_fn is None:
        return
    y = TARGET_OF.get(cell, "y")
    target = rng.standard_normal(outputs[y].shape)
    if cell in ONE_HOT:  # a class per (step, sequence); the last sequence unlabelled at step 0 (a zero row)
        target = np.eye(outputs[y].shape[-1])[rng.integers(0, outputs[y].shape[-1], outputs[y].shape[:2])]
        target[0, -1] = 0.0
    loss, lgrads = module.loss_and_grads(params, x, target, dict(state0))
    p, x_t, s0, ref = torch_run(cell, params, x, state0)
    per_step = [loss_fn(ref[y][t], torch.tensor(target[t])) for t in range(T)]
    ref_loss = sum(per_step) / (T if reduction == "mean" else 1)
    assert rel_err(loss, ref_loss.detach().numpy()) < 1e-12
    expected = grads_of(ref_loss, p, x_t, s0)
    bad = {k: rel_err(lgrads[k], expected[k]) for k in expected if rel_err(lgrads[k], expected[k]) >= 1e-10}
    assert not bad, bad
