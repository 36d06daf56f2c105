"""The generated PyTorch-convention cells agree with torch.nn.RNN / nn.LSTM / nn.GRU.

Forward outputs and every gradient (parameters, input, initial states) of the
generated NumPy kernels are compared with PyTorch autograd in float64; a float32
variant checks forward agreement and the dtype of the gradients.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from generated import gru_torch_numpy, lstm_torch_numpy, rnn_tanh_torch_numpy

T, B, N_IN, N_HIDDEN = 7, 3, 4, 5

CASES = {
    "rnn_tanh_torch": (
        rnn_tanh_torch_numpy,
        lambda n_in, n_hidden: torch.nn.RNN(n_in, n_hidden, nonlinearity="tanh"),
    ),
    "lstm_torch": (lstm_torch_numpy, lambda n_in, n_hidden: torch.nn.LSTM(n_in, n_hidden)),
    "gru_torch": (gru_torch_numpy, lambda n_in, n_hidden: torch.nn.GRU(n_in, n_hidden)),
}


def rel_err(a, b) -> float:
    """||a - b|| / ||b|| (b is the reference)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    nb = np.linalg.norm(b)
    assert nb > 0, "reference array is zero; the comparison would be vacuous"
    return float(np.linalg.norm(a - b) / nb)


def _setup(cell, dtype, seed):
    """A torch module in ``dtype`` and the matching NumPy params, x and initial states."""
    module, factory = CASES[cell]
    torch_dtype = {np.float64: torch.float64, np.float32: torch.float32}[dtype]
    torch.manual_seed(seed)
    net = factory(N_IN, N_HIDDEN).to(torch_dtype)
    params = {name: t.detach().cpu().numpy().copy() for name, t in net.state_dict().items()}
    assert set(params) == set(module.PARAM_SHAPES), (sorted(params), sorted(module.PARAM_SHAPES))
    for name, arr in params.items():
        assert arr.dtype == dtype
        assert arr.shape == module.param_shapes(N_IN, N_HIDDEN)[name]
    rng = np.random.default_rng(1000 + seed)
    x = rng.standard_normal((T, B, N_IN)).astype(dtype)
    state0 = {name: (0.5 * rng.standard_normal((B, N_HIDDEN))).astype(dtype) for name in module.STATES}
    return module, net, params, x, state0, rng


def _torch_run(cell, net, x, state0):
    """Run the torch module; returns (x_t, initial-state tensors, output seq, h_n, c_n or None)."""
    x_t = torch.tensor(x, requires_grad=True)
    h0_t = torch.tensor(state0["h"][None], requires_grad=True)  # (num_layers=1, B, H)
    if cell == "lstm_torch":
        c0_t = torch.tensor(state0["c"][None], requires_grad=True)
        out, (h_n, c_n) = net(x_t, (h0_t, c0_t))
        return x_t, {"h": h0_t, "c": c0_t}, out, h_n, c_n
    out, h_n = net(x_t, h0_t)
    return x_t, {"h": h0_t}, out, h_n, None


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("cell", sorted(CASES))
def test_forward_and_backward_match_torch_float64(cell, seed):
    module, net, params, x, state0, rng = _setup(cell, np.float64, seed)
    x_t, s0_t, out, h_n, c_n = _torch_run(cell, net, x, state0)

    outputs, cache = module.forward(params, x, {k: v.copy() for k, v in state0.items()})
    assert set(outputs) == set(module.OUTPUTS)
    errors = {}
    # forward: the whole h sequence, and the final state(s)
    errors["h_seq"] = rel_err(outputs["h"], out.detach().numpy())
    errors["h_n"] = rel_err(outputs["h"][-1], h_n.detach().numpy()[0])
    if c_n is not None:
        errors["c_n"] = rel_err(outputs["c"][-1], c_n.detach().numpy()[0])
    for name, err in errors.items():
        assert err < 1e-10, f"{cell}: forward {name} rel err {err:.3e}"

    # backward: random cotangents for the h sequence, for h_n (the last h) and for c_n
    g_seq = rng.standard_normal((T, B, N_HIDDEN))
    g_hn = rng.standard_normal((B, N_HIDDEN))
    loss = (out * torch.tensor(g_seq)).sum() + (h_n[0] * torch.tensor(g_hn)).sum()
    grad_outputs = {"h": g_seq.copy()}
    grad_outputs["h"][-1] += g_hn
    if c_n is not None:
        g_cn = rng.standard_normal((B, N_HIDDEN))
        loss = loss + (c_n[0] * torch.tensor(g_cn)).sum()
        grad_outputs["c"] = np.zeros((T, B, N_HIDDEN))
        grad_outputs["c"][-1] = g_cn
    net.zero_grad()
    loss.backward()

    reference = {name: p.grad.numpy() for name, p in net.named_parameters()}
    reference["x"] = x_t.grad.numpy()
    for name, t0 in s0_t.items():
        reference[name + "0"] = t0.grad.numpy()[0]
    assert set(reference) == set(module.PARAM_SHAPES) | {"x"} | {s + "0" for s in module.STATES}

    grads = module.backward(params, cache, grad_outputs)
    assert set(grads) == set(reference)
    for name, ref in reference.items():
        assert grads[name].dtype == np.float64, (name, grads[name].dtype)
        err = rel_err(grads[name], ref)
        assert err < 1e-10, f"{cell}: backward d{name} rel err {err:.3e}"

    # the forward-mode (RTRL) kernel gives the same gradients
    rtrl = module.rtrl_grads(params, x, grad_outputs, {k: v.copy() for k, v in state0.items()})
    assert set(rtrl) == set(reference)
    for name, ref in reference.items():
        err = rel_err(rtrl[name], ref)
        assert err < 1e-10, f"{cell}: rtrl d{name} rel err {err:.3e}"


@pytest.mark.parametrize("cell", sorted(CASES))
def test_default_zero_initial_state_matches_torch(cell):
    """state0=None means zero initial states, as torch's hx=None does."""
    module, net, params, x, _, rng = _setup(cell, np.float64, 3)
    x_t = torch.tensor(x, requires_grad=True)
    out = net(x_t)[0]
    g_seq = rng.standard_normal((T, B, N_HIDDEN))
    (out * torch.tensor(g_seq)).sum().backward()

    outputs, cache = module.forward(params, x)
    err = rel_err(outputs["h"], out.detach().numpy())
    assert err < 1e-10, f"{cell}: forward h rel err {err:.3e}"
    grads = module.backward(params, cache, {"h": g_seq})
    for name, p in net.named_parameters():
        err = rel_err(grads[name], p.grad.numpy())
        assert err < 1e-10, f"{cell}: backward d{name} rel err {err:.3e}"
    err = rel_err(grads["x"], x_t.grad.numpy())
    assert err < 1e-10, f"{cell}: backward dx rel err {err:.3e}"


@pytest.mark.parametrize("cell", sorted(CASES))
def test_float32_matches_torch(cell):
    module, net, params, x, state0, rng = _setup(cell, np.float32, 0)
    x_t, s0_t, out, h_n, c_n = _torch_run(cell, net, x, state0)

    outputs, cache = module.forward(params, x, state0)
    for name, arr in outputs.items():
        assert arr.dtype == np.float32, (name, arr.dtype)
    err = rel_err(outputs["h"], out.detach().numpy())
    assert err < 1e-5, f"{cell}: float32 forward h rel err {err:.3e}"
    err = rel_err(outputs["h"][-1], h_n.detach().numpy()[0])
    assert err < 1e-5, f"{cell}: float32 forward h_n rel err {err:.3e}"
    if c_n is not None:
        err = rel_err(outputs["c"][-1], c_n.detach().numpy()[0])
        assert err < 1e-5, f"{cell}: float32 forward c_n rel err {err:.3e}"

    grad_outputs = {
        name: rng.standard_normal((T, B, N_HIDDEN)).astype(np.float32) for name in module.STATES
    }
    grads = module.backward(params, cache, grad_outputs)
    assert set(grads) == set(module.PARAM_SHAPES) | {"x"} | {s + "0" for s in module.STATES}
    for name, g in grads.items():
        assert g.dtype == np.float32, f"{cell}: grads[{name!r}] has dtype {g.dtype}"
    for name in module.PARAM_SHAPES:
        assert grads[name].shape == params[name].shape
    assert grads["x"].shape == x.shape
    for s in module.STATES:
        assert grads[s + "0"].shape == (B, N_HIDDEN)


@pytest.mark.parametrize("scale", [10.0, 30.0, 100.0])
@pytest.mark.parametrize("cell", sorted(CASES))
def test_float32_saturated_gates_match_torch(cell, scale):
    """Large inputs saturate the gates.  sigmoid is 1 / (1 + exp(-a)), as torch computes
    it: accurate relative to its value, so a saturated gate's tiny gradient is what torch
    gives, entry by entry (which matters to Adam, whose step does not shrink with the
    gradient).  The earlier (1 + tanh(a/2)) / 2 is exactly 0 below a = -17 in float32: at
    x * 100, 10 (LSTM) and 20 (GRU) gradient entries were 0 where torch's were not."""
    import warnings

    module, net, params, x, state0, rng = _setup(cell, np.float32, 2)
    x = (x * scale).astype(np.float32)
    x_t, s0_t, out, h_n, c_n = _torch_run(cell, net, x, state0)
    g_seq = rng.standard_normal((T, B, N_HIDDEN)).astype(np.float32)
    (out * torch.tensor(g_seq)).sum().backward()
    reference = {name: p.grad.numpy() for name, p in net.named_parameters()} | {"x": x_t.grad.numpy()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # exp(-a) overflows quietly (sigmoid(a) is then 0)
        outputs, cache = module.forward(params, x, state0)
        grads = module.backward(params, cache, {"h": g_seq})
    for name, ref in reference.items():
        missing = (grads[name] == 0) & (ref != 0)
        assert not missing.any(), f"{cell} x{scale}: d{name} is 0 where torch's is {np.abs(ref[missing]).max():.2e}"
        assert np.abs(grads[name] - ref).max() <= 1e-4 * np.abs(ref).max(), name
