"""The torch modules on CUDA tensors (``pytest -m gpu``; all of it: ``bash .ci/gpu``).

torch CUDA tensors go through DLPack to the generated CuPy modules, on torch's current stream:
RNN of lstm_torch and gru_torch (two layers, both directions, padded and packed unsorted
batches) against torch.nn.LSTM / GRU on the same GPU (cuDNN), outputs, final states and every
gradient: float64 1e-10, float32 (TF32 off) 1e-4 relative; also on a side stream of torch's.

Without CuPy or a CUDA device these tests skip; with SYMRNN_REQUIRE_GPU=1 (set by .ci/gpu) they
fail instead.  ``compare_with_torch`` also runs without a GPU, on CPU tensors routed through the
CUDA backend onto the tests' CuPy stand-in (tests/test_torch_cuda_path.py), so the first GPU run
does not fail on a bug of its own.
"""

from __future__ import annotations

import contextlib
import os

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from torch_support import TORCH_CELLS, rel_err, torch_module

pytestmark = pytest.mark.gpu

T, B, N_IN, N_HIDDEN = 9, 6, 5, 8
LENGTHS = [4, 9, 1, 7, 9, 2]
TOL = {torch.float64: 1e-10, torch.float32: 1e-4}


@pytest.fixture(scope="module")
def cuda():
    try:
        import cupy

        if not torch.cuda.is_available():
            raise RuntimeError("torch has no CUDA device")
        if cupy.cuda.runtime.getDeviceCount() < 1:
            raise RuntimeError("CuPy has no CUDA device")
    except Exception as exc:  # ImportError, CUDARuntimeError, RuntimeError
        reason = f"CuPy and torch with a CUDA device are needed ({type(exc).__name__}: {exc})"
        if os.environ.get("SYMRNN_REQUIRE_GPU"):
            pytest.fail(reason + " and SYMRNN_REQUIRE_GPU is set")
        pytest.skip(reason)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    return torch.device("cuda")


def compare_with_torch(cell: str, device: torch.device, dtype, stream=None) -> dict[str, float]:
    """Relative errors of the generated RNN against torch's module on ``device`` (inside
    ``torch.cuda.stream(stream)`` if given): padded and packed (unsorted) input, two layers,
    both directions; every output, final state and gradient."""
    m = torch_module(cell)
    torch.manual_seed(0)
    kwargs = dict(num_layers=2, bidirectional=True, device=device, dtype=dtype)
    reference = TORCH_CELLS[cell](N_IN, N_HIDDEN, **kwargs)
    ours = m.RNN(N_IN, N_HIDDEN, **kwargs)
    ours.load_state_dict(reference.state_dict())
    x = torch.randn(T, B, N_IN, device=device, dtype=dtype, requires_grad=True)
    states = [torch.randn(4, B, N_HIDDEN, device=device, dtype=dtype, requires_grad=True) for _ in m.STATES]
    hx = states[0] if len(states) == 1 else tuple(states)
    errors = {}
    context = torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext()
    with context:
        for lengths in (None, LENGTHS):
            results = []
            for net in (reference, ours):
                inp = x if lengths is None else pack_padded_sequence(x, torch.tensor(lengths), enforce_sorted=False)
                out, h = net(inp, hx)
                out = out if lengths is None else pad_packed_sequence(out)[0]
                finals = list(h) if isinstance(h, tuple) else [h]
                weights = torch.linspace(-1, 1, out.numel(), device=device, dtype=dtype).reshape(out.shape)
                loss = (out * weights).sum() + sum((f * f).sum() for f in finals)
                results.append([out, *finals, *torch.autograd.grad(loss, [x, *states, *net.parameters()])])
            assert all(t.device.type == device.type for t in results[1])
            names = ["output", *(s + "_n" for s in m.STATES), "d_x", *("d_" + s + "0" for s in m.STATES),
                     *("d_" + n for n, _ in reference.named_parameters())]
            tag = "padded" if lengths is None else "packed"
            errors.update({f"{tag} {n}": rel_err(a.cpu(), b.cpu()) for n, a, b in zip(names, results[1], results[0])})
    return errors


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("cell", ["lstm_torch", "gru_torch"])
def test_cuda_tensors_match_torch_on_the_gpu(cuda, cell, dtype):
    errors = compare_with_torch(cell, cuda, dtype)
    bad = {k: e for k, e in errors.items() if not e <= TOL[dtype]}
    assert not bad, f"{cell} ({dtype}): {bad}"


def test_cuda_tensors_on_a_side_stream(cuda):
    """On a stream of torch's other than the default one, the kernels run on that stream."""
    errors = compare_with_torch("lstm_torch", cuda, torch.float64, stream=torch.cuda.Stream())
    torch.cuda.synchronize()
    bad = {k: e for k, e in errors.items() if not e <= TOL[torch.float64]}
    assert not bad, bad
