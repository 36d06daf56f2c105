"""Shared by the torch tests: the generated torch modules, relative errors, and an
independent torch-eager reference of stacked, bidirectional layers over sequences of
their own lengths (built from the step functions of tests/test_spec_torch.py)."""

from __future__ import annotations

import importlib

import numpy as np
import torch

#: the cells in torch's own convention -> a factory of torch's module of the same configuration
TORCH_CELLS = {
    "rnn_tanh_torch": lambda *a, **k: torch.nn.RNN(*a, nonlinearity="tanh", **k),
    "lstm_torch": torch.nn.LSTM,
    "gru_torch": torch.nn.GRU,
}


def torch_module(cell: str):
    """The committed generated/<cell>_torch.py."""
    return importlib.import_module(f"generated.{cell}_torch")


def rel_err(a, b) -> float:
    """||a - b|| / ||b|| (b the reference, which must not be zero)."""
    a = a.detach().double() if isinstance(a, torch.Tensor) else torch.as_tensor(np.asarray(a, np.float64))
    b = b.detach().double() if isinstance(b, torch.Tensor) else torch.as_tensor(np.asarray(b, np.float64))
    assert a.shape == b.shape, (tuple(a.shape), tuple(b.shape))
    nb = float(b.norm())
    assert nb > 0, "the reference is zero; the comparison would be vacuous"
    return float((a - b).norm()) / nb


def eager_stack(step, readout, params, x, lengths, state0, num_layers, directions, layer_output):
    """Stacked layers of a cell in torch eager, one sequence at a time over its own length.

    ``step(p, x_t, states) -> new states`` and ``readout(p, h) -> y`` (or None) are one layer's
    equations; ``params[(layer, direction)]`` its parameters by the kernels' names; x (T, B, n_in);
    ``state0[name]`` (num_layers * directions, B, size).  Returns (output (T, B, D * size) with
    zeros beyond each length, final states {name: (L * D, B, size)})."""
    T, B = x.shape[0], x.shape[1]
    inputs = [x[: lengths[b], b] for b in range(B)]  # one (length, n_in) tensor per sequence
    finals = {name: [] for name in state0}
    for layer in range(num_layers):
        outs = [[] for _ in range(B)]
        for direction in range(directions):
            p = params[(layer, direction)]
            k = layer * directions + direction
            last = {name: [] for name in state0}
            for b in range(B):
                seq = inputs[b].flip(0) if direction else inputs[b]
                s = {name: v[k, b] for name, v in state0.items()}
                ys = []
                for t in range(seq.shape[0]):
                    s = step(p, seq[t], s)
                    ys.append(readout(p, s["h"]) if layer_output != "h" else s["h"])
                y = torch.stack(ys)
                outs[b].append(y.flip(0) if direction else y)
                for name in state0:
                    last[name].append(s[name])
            for name in state0:
                finals[name].append(torch.stack(last[name]))
        inputs = [torch.cat(o, dim=-1) for o in outs]
    width = inputs[0].shape[-1]
    output = torch.zeros(T, B, width, dtype=x.dtype)
    for b in range(B):
        output[: lengths[b], b] = inputs[b]
    return output, {name: torch.stack(v) for name, v in finals.items()}
