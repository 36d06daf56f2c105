"""The CUDA path of the torch modules, on a machine without a GPU.

The torch module's CUDA backend (``_Cuda``: DLPack views of the tensors, the generated CuPy
module, torch's current stream) runs against the tests' NumPy stand-in for CuPy
(tests/host_cupy.py), whose kernels are the CuPy module's own CUDA source compiled for the
host: every kernel launch must happen on the stream torch names, every array the kernels get
must be a view of a tensor's memory (no copy on the way in), and RNN must still match
torch.nn.LSTM / GRU.  On a GPU, tests/test_torch_gpu.py runs the same path on CUDA tensors.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from cupy_support import fresh_cupy_module
from host_cupy import host_cupy
from torch_support import TORCH_CELLS, rel_err, torch_module

STREAM = 0xC0DE  # the "torch stream" the stand-in is told to run on
T, B, N_IN, N_HIDDEN = 5, 4, 3, 6
LENGTHS = [2, 5, 1, 4]


class _Stream:
    cuda_stream = STREAM


@pytest.fixture
def cuda_path(monkeypatch, tmp_path):
    """cell -> its torch module, with CPU tensors routed through the CUDA backend onto the stand-in."""
    xp = host_cupy(tmp_path)
    monkeypatch.setitem(sys.modules, "cupy", xp)
    views = []
    from_dlpack = xp.from_dlpack

    def spy(tensor):
        array = from_dlpack(tensor)
        views.append((array, tensor))
        return array

    xp.from_dlpack = spy

    def make(cell):
        m = torch_module(cell)
        kernels = fresh_cupy_module(cell)
        forward = kernels.forward

        def forward_spy(params, x, state0=None, *steps):
            views.append((x, "kernel x"))
            return forward(params, x, state0, *steps)

        kernels.forward = forward_spy
        backend = m._Cuda(cupy=xp, kernels=kernels, current_stream=lambda device: _Stream)
        monkeypatch.setitem(m._BACKENDS, "cpu", backend)
        return m, xp, views

    return make


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("cell", ["lstm_torch", "gru_torch"])
def test_cuda_backend_matches_torch_on_torchs_stream(cuda_path, cell, dtype):
    m, xp, views = cuda_path(cell)
    torch.manual_seed(0)
    reference = TORCH_CELLS[cell](N_IN, N_HIDDEN, num_layers=2, bidirectional=True, dtype=dtype)
    ours = m.RNN(N_IN, N_HIDDEN, num_layers=2, bidirectional=True, dtype=dtype)
    ours.load_state_dict(reference.state_dict())
    x = torch.randn(T, B, N_IN, dtype=dtype, requires_grad=True)
    ours(x)
    first = next(array for array, what in views if isinstance(what, str))  # the x of layer 0's first kernel call
    assert np.shares_memory(first, x.detach().numpy()), "the input was copied on its way to the kernels"
    results = []
    for net in (reference, ours):
        for lengths in (None, LENGTHS):
            inp = x if lengths is None else pack_padded_sequence(x, torch.tensor(lengths), enforce_sorted=False)
            out, h = net(inp)
            out = out if lengths is None else pad_packed_sequence(out)[0]
            h_n = h[0] if cell == "lstm_torch" else h
            loss = (out * torch.linspace(-1, 1, out.numel(), dtype=dtype).reshape(out.shape)).sum() + h_n.square().sum()
            results.append([out, h_n, *torch.autograd.grad(loss, [x, *net.parameters()])])
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    for ref, got in zip(results[:2], results[2:]):
        errors = [rel_err(a, b) for a, b in zip(got, ref)]
        assert max(errors) <= tol, errors
    launches = xp.streams.launches
    assert launches and {stream for _, _, stream in launches} == {STREAM}, "a kernel ran outside torch's stream"
    assert xp.streams.stream == 0  # and the stream was left as it was
    dlpack = [(array, tensor) for array, tensor in views if not isinstance(tensor, str)]
    assert dlpack and all(np.shares_memory(array, tensor.detach().numpy()) for array, tensor in dlpack)  # zero-copy


def test_cuda_backend_function_gradcheck(cuda_path):
    """Function through the CUDA path, float64: gradcheck, with lengths and reversed."""
    m, xp, _ = cuda_path("lstm_torch")
    kernels = m._kernels("numpy")
    rng = np.random.default_rng(0)
    params = [torch.tensor(v, requires_grad=True) for v in kernels.init_params(N_IN, N_HIDDEN, seed=1).values()]
    x = torch.tensor(rng.standard_normal((T, B, N_IN)), requires_grad=True)
    states = [torch.tensor(rng.standard_normal((B, N_HIDDEN)), requires_grad=True) for _ in m.STATES]
    assert torch.autograd.gradcheck(lambda *a: m.Function.apply(a[0], LENGTHS, True, *a[1:]), (x, *states, *params),
                                    eps=1e-6, atol=1e-7, rtol=1e-6)
    assert {stream for _, _, stream in xp.streams.launches} == {STREAM}


@pytest.mark.parametrize("cell", ["lstm_torch", "gru_torch"])
def test_gpu_test_code_runs_against_the_host_standin(cuda_path, cell):
    """tests/test_torch_gpu.py only runs on a GPU; its comparison runs here on the CUDA backend
    and the stand-in, so the first GPU run does not fail on a bug of its own."""
    import test_torch_gpu as gpu

    m, xp, _ = cuda_path(cell)
    for dtype in (torch.float64, torch.float32):
        errors = gpu.compare_with_torch(cell, torch.device("cpu"), dtype)
        bad = {k: e for k, e in errors.items() if not e <= gpu.TOL[dtype]}
        assert len(errors) > 10 and not bad, bad
    assert {stream for _, _, stream in xp.streams.launches} == {STREAM}
