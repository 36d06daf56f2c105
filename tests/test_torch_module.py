"""The generated torch modules (generated/<cell>_torch.py).

* RNN of rnn_tanh_torch, lstm_torch, gru_torch against torch.nn.RNN / LSTM / GRU of the same
  configuration: num_layers 1-3, one or two directions, batch_first, padded input and packed
  batches with lengths (1 among them, unsorted and sorted): outputs, final states and every
  gradient (input, initial states, each parameter), float64, 1e-10 relative; state_dict in
  both directions, the same initial values for the same seed, bias=False, unbatched input;
* Function (one layer, one direction): torch.autograd.gradcheck in float64 (with lengths,
  reversed), gradients for a subset of the inputs, no cache kept without a graph, an
  in-place change of an output refused at backward;
* variable lengths: against the bare NumPy kernels run on each sequence alone, and RNN of the
  spec-file cells (a readout, two states) against a torch-eager stack of the same equations
  run one sequence at a time;
* the committed modules are what the renderer gives.
"""

from __future__ import annotations

import difflib
import gc
import weakref

import numpy as np
import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from conftest import CELLS, ROOT
from torch_support import TORCH_CELLS, eager_stack, rel_err, torch_module
from symrnn.pipeline import build
from symrnn.render import render_torch

TOL = 1e-10
T, B, N_IN, N_HIDDEN = 6, 5, 3, 4
LENGTHS = [3, 6, 1, 4, 6]  # unsorted, with 1 and T


# -- golden files -------------------------------------------------------------------------
def test_torch_modules_are_up_to_date(cell_name):
    path = ROOT / "generated" / f"{cell_name}_torch.py"
    fresh = render_torch(build(cell_name))
    committed = path.read_text() if path.exists() else ""
    if committed != fresh:
        diff = "".join(difflib.unified_diff(committed.splitlines(True), fresh.splitlines(True), str(path), "fresh", n=1))
        pytest.fail(f"{path} is stale; run: symrnn generate --backend all --out generated\n{diff[:4000]}")


# -- parity with torch.nn.RNN / LSTM / GRU ---------------------------------------------------
def _run(net, cell, x, hx, lengths, batch_first, weights):
    """Forward, then the gradients of a loss touching every output: (output, h_n, c_n or None, grads)."""
    if lengths is None:
        out, h = net(x, hx)
        padded = out
    else:
        sorted_ = lengths == sorted(lengths, reverse=True)
        packed = pack_padded_sequence(x, torch.tensor(lengths), batch_first=batch_first, enforce_sorted=sorted_)
        out, h = net(packed, hx)
        assert isinstance(out, torch.nn.utils.rnn.PackedSequence)
        assert torch.equal(out.batch_sizes, packed.batch_sizes)
        padded, out_lengths = pad_packed_sequence(out, batch_first=batch_first)
        assert out_lengths.tolist() == lengths
    h_n, c_n = h if cell == "lstm_torch" else (h, None)
    loss = (padded * weights[0]).sum() + (h_n * weights[1]).sum()
    if c_n is not None:
        loss = loss + (c_n * weights[2]).sum()
    leaves = [x, *(hx if isinstance(hx, tuple) else (hx,)), *net.parameters()]
    return padded, h_n, c_n, torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("inputs", ["padded", "packed_unsorted", "packed_sorted"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["time_first", "batch_first"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("num_layers", [1, 2, 3])
@pytest.mark.parametrize("cell", sorted(TORCH_CELLS))
def test_rnn_matches_torch(cell, num_layers, bidirectional, batch_first, inputs):
    torch.manual_seed(num_layers + 10 * bidirectional)
    kwargs = dict(num_layers=num_layers, bidirectional=bidirectional, batch_first=batch_first, dtype=torch.float64)
    reference = TORCH_CELLS[cell](N_IN, N_HIDDEN, **kwargs)
    ours = torch_module(cell).RNN(N_IN, N_HIDDEN, **kwargs)
    ours.load_state_dict(reference.state_dict())
    D = 2 if bidirectional else 1
    lengths = {"padded": None, "packed_unsorted": LENGTHS, "packed_sorted": sorted(LENGTHS, reverse=True)}[inputs]
    x = torch.randn((B, T, N_IN) if batch_first else (T, B, N_IN), dtype=torch.float64, requires_grad=True)
    states = [torch.randn(num_layers * D, B, N_HIDDEN, dtype=torch.float64, requires_grad=True)
              for _ in range(2 if cell == "lstm_torch" else 1)]
    hx = tuple(states) if cell == "lstm_torch" else states[0]
    out_shape = (B, T, D * N_HIDDEN) if batch_first else (T, B, D * N_HIDDEN)
    weights = [torch.randn(out_shape, dtype=torch.float64)] + [torch.randn(num_layers * D, B, N_HIDDEN, dtype=torch.float64)
                                                               for _ in range(2)]
    expected = _run(reference, cell, x, hx, lengths, batch_first, weights)
    got = _run(ours, cell, x, hx, lengths, batch_first, weights)
    names = ["x", *("h0", "c0")[:len(states)], *(name for name, _ in reference.named_parameters())]
    errors = {"output": rel_err(got[0], expected[0]), "h_n": rel_err(got[1], expected[1])}
    if cell == "lstm_torch":
        errors["c_n"] = rel_err(got[2], expected[2])
    errors.update({"d_" + name: rel_err(a, b) for name, a, b in zip(names, got[3], expected[3])})
    assert len(errors) == 2 + (cell == "lstm_torch") + len(names)
    bad = {k: e for k, e in errors.items() if not e <= TOL}
    assert not bad, f"{cell}: relative errors above {TOL}: {bad}"
    if lengths is not None:  # beyond its length a sequence's output is zero, as torch's
        padded = got[0] if not batch_first else got[0].transpose(0, 1)
        for b, n in enumerate(lengths):
            assert not padded[n:, b].any()


@pytest.mark.parametrize("cell", sorted(TORCH_CELLS))
def test_state_dict_is_interchangeable_and_initial_values_are_torchs(cell):
    for kwargs in ({}, {"num_layers": 2, "bidirectional": True}, {"num_layers": 3, "bias": False}):
        torch.manual_seed(7)
        reference = TORCH_CELLS[cell](N_IN, N_HIDDEN, **kwargs)
        torch.manual_seed(7)
        ours = torch_module(cell).RNN(N_IN, N_HIDDEN, **kwargs)
        ref_sd, our_sd = reference.state_dict(), ours.state_dict()
        assert list(our_sd) == list(ref_sd)  # the same names, in the same order
        for name in ref_sd:
            assert our_sd[name].shape == ref_sd[name].shape and torch.equal(our_sd[name], ref_sd[name]), name
        other = TORCH_CELLS[cell](N_IN, N_HIDDEN, **kwargs)
        with torch.no_grad():
            for p in ours.parameters():
                p.add_(1.0)
        other.load_state_dict(ours.state_dict())  # ours -> torch's
        ours.reset_parameters()
        ours.load_state_dict(other.state_dict())  # torch's -> ours (strict: no key missing or extra)
        assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), other.state_dict().values()))


@pytest.mark.parametrize("cell", sorted(TORCH_CELLS))
def test_no_bias_and_unbatched_input_match_torch(cell):
    torch.manual_seed(3)
    reference = TORCH_CELLS[cell](N_IN, N_HIDDEN, num_layers=2, bias=False, bidirectional=True, dtype=torch.float64)
    ours = torch_module(cell).RNN(N_IN, N_HIDDEN, num_layers=2, bias=False, bidirectional=True, dtype=torch.float64)
    ours.load_state_dict(reference.state_dict())
    assert not any("bias" in name for name, _ in ours.named_parameters())
    x = torch.randn(T, N_IN, dtype=torch.float64, requires_grad=True)  # unbatched: (T, input_size)
    results = []
    for net in (reference, ours):
        out, h = net(x)
        h_n = h[0] if cell == "lstm_torch" else h
        assert out.shape == (T, 2 * N_HIDDEN) and h_n.shape == (4, N_HIDDEN)
        loss = out.sin().sum() + h_n.square().sum()
        results.append([out, h_n, *torch.autograd.grad(loss, [x, *net.parameters()])])
    for a, b in zip(results[1], results[0]):
        assert rel_err(a, b) <= TOL


def test_dropout_between_layers_only_while_training():
    m = torch_module("gru_torch")
    torch.manual_seed(0)
    net = m.RNN(N_IN, N_HIDDEN, num_layers=2, dropout=0.5, dtype=torch.float64)
    plain = m.RNN(N_IN, N_HIDDEN, num_layers=2, dtype=torch.float64)
    plain.load_state_dict(net.state_dict())
    x = torch.randn(T, B, N_IN, dtype=torch.float64)
    net.eval()
    assert torch.equal(net(x)[0], plain(x)[0])
    net.train()
    assert not torch.equal(net(x)[0], plain(x)[0])
    with pytest.warns(UserWarning, match="non-zero dropout expects num_layers greater than 1"):
        m.RNN(N_IN, N_HIDDEN, dropout=0.2)


def test_bad_calls_are_clear_errors():
    m = torch_module("lstm_torch")
    net = m.RNN(N_IN, N_HIDDEN, num_layers=2, dtype=torch.float64)
    x = torch.randn(T, B, N_IN, dtype=torch.float64)
    with pytest.raises(RuntimeError, match=r"Expected hidden h size \(2, 5, 4\), got \(1, 5, 4\)"):
        net(x, (torch.zeros(1, B, N_HIDDEN, dtype=torch.float64), torch.zeros(2, B, N_HIDDEN, dtype=torch.float64)))
    with pytest.raises(TypeError, match=r"hx of cell 'lstm_torch' is a tuple \(h_0, c_0\)"):
        net(x, torch.zeros(2, B, N_HIDDEN, dtype=torch.float64))
    with pytest.raises(RuntimeError, match="input must have the type torch.float64, got type torch.float32"):
        net(x.float())
    with pytest.raises(ValueError, match="Expected input to be 2D or 3D, got 4D"):
        net(x[None])
    with pytest.raises(ValueError, match=r"cell 'single_sigmoid', layer 0: cell 'single_sigmoid' fixes n_hidden = 1; got 3"):
        torch_module("single_sigmoid").RNN(1, 3)
    with pytest.raises(ValueError, match=r"layer 1: .* fixes n_in = 1; got 2 \(layer 1's input is the output of layer 0, 2 wide\)"):
        torch_module("single_sigmoid").RNN(1, 1, num_layers=2, bidirectional=True)
    with pytest.raises(ValueError, match="lengths must lie in"):
        m.Function.apply(x, [7, 1, 1, 1, 1], False, None, None, *net._parameters_of(0, 0, x))


# -- Function: one layer, one direction -------------------------------------------------------
def _function_inputs(cell, seed=0, dtype=torch.float64):
    """Random (x, initial states, parameters) for one layer of ``cell``, all requiring grad."""
    m = torch_module(cell)
    kernels = m._kernels("numpy")
    dims = {"n_in": N_IN, "n_hidden": N_HIDDEN, "n_out": 2} | kernels.FIXED_DIMS
    params = kernels.init_params(dims["n_in"], dims["n_hidden"], dims["n_out"], seed=seed)
    rng = np.random.default_rng(seed)
    width = kernels.input_size(dims["n_in"], dims["n_hidden"], dims["n_out"])
    x = torch.tensor(rng.standard_normal((T, B, width)), dtype=dtype, requires_grad=True)
    sizes = m.output_sizes(dims["n_in"], dims["n_hidden"], dims["n_out"])
    states = [torch.tensor(0.5 * rng.standard_normal((B, sizes[s])), dtype=dtype, requires_grad=True) for s in m.STATES]
    weights = [torch.tensor(v, dtype=dtype, requires_grad=True) for v in params.values()]
    return m, x, states, weights


@pytest.mark.parametrize("lengths, reverse", [(None, False), (None, True), ([3, 6, 1, 0, 4], False), ([3, 6, 1, 0, 4], True)],
                         ids=["full", "reversed", "lengths", "lengths_reversed"])
@pytest.mark.parametrize("cell", ["lstm_torch", "gru_torch", "mgu", "lstm_peephole", "single_sigmoid", "indrnn"])
def test_function_gradcheck_float64(cell, lengths, reverse):
    m, x, states, weights = _function_inputs(cell)
    assert torch.autograd.gradcheck(lambda *a: m.Function.apply(a[0], lengths, reverse, *a[1:]), (x, *states, *weights),
                                    eps=1e-6, atol=1e-7, rtol=1e-6)


def test_function_gradients_for_a_subset_of_inputs():
    m, x, states, weights = _function_inputs("lstm_torch", seed=1)
    full = m.Function.apply(x, LENGTHS, True, *states, *weights)
    loss = sum((out * out.detach().cos()).sum() for out in full)
    all_grads = torch.autograd.grad(loss, [x, *states, *weights])
    x2 = x.detach().requires_grad_()
    other = [t.detach() for t in (*states, *weights)]
    other[-1].requires_grad_()  # only x and the last parameter
    outs = m.Function.apply(x2, LENGTHS, True, *other)
    loss = sum((out * out.detach().cos()).sum() for out in outs)
    loss.backward()
    assert rel_err(x2.grad, all_grads[0]) <= 1e-14 and rel_err(other[-1].grad, all_grads[-1]) <= 1e-14
    assert all(t.grad is None for t in other[:-1])


def test_no_cache_is_kept_without_a_graph(monkeypatch):
    m, x, states, weights = _function_inputs("gru_torch")
    kernels = m._backend(torch.device("cpu")).kernels
    caches = []
    forward = kernels.forward

    def spy(params, x, state0=None, *steps):
        outputs, cache = forward(params, x, state0, *steps)
        caches.append(weakref.ref(cache["x"]))  # the cache's own copy of x
        return outputs, cache

    monkeypatch.setattr(kernels, "forward", spy)
    kept = m.Function.apply(x, None, False, *states, *weights)
    with_graph = [o.detach().clone() for o in kept]
    for context in (torch.no_grad, torch.inference_mode):
        with context():
            outs = m.Function.apply(x, None, False, *states, *weights)
        gc.collect()
        assert caches[-1]() is None, f"a cache is kept under {context.__name__}"
        assert all(torch.equal(a, b) for a, b in zip(outs, with_graph))
        assert all(o.grad_fn is None for o in outs)
    gc.collect()
    assert caches[0]() is not None  # the graph's cache lives as long as the graph
    del kept
    gc.collect()
    assert caches[0]() is None


def test_the_cache_is_freed_by_backward_unless_the_graph_is_retained(monkeypatch):
    """As torch's saved tensors: after backward the kernels' cache is gone while the outputs live
    on; with retain_graph=True it stays, and a second backward gives the same gradients."""
    m, x, states, weights = _function_inputs("lstm_torch")
    kernels = m._backend(torch.device("cpu")).kernels
    caches = []
    forward = kernels.forward

    def spy(params, x, state0=None, *steps):
        outputs, cache = forward(params, x, state0, *steps)
        caches.append(weakref.ref(cache["x"]))
        return outputs, cache

    monkeypatch.setattr(kernels, "forward", spy)
    for lengths in (None, LENGTHS):
        outs = m.Function.apply(x, lengths, False, *states, *weights)
        loss = sum(o.sum() for o in outs)
        first = torch.autograd.grad(loss, weights, retain_graph=True)
        gc.collect()
        assert all(ref() is not None for ref in caches)
        second = torch.autograd.grad(loss, weights)
        assert all(torch.equal(a, b) for a, b in zip(first, second))
        gc.collect()
        assert all(ref() is None for ref in caches), "the cache outlived backward"
        assert outs[0].shape == (T, B, N_HIDDEN)  # the outputs are still there
        with pytest.raises(RuntimeError, match="backward through the graph a second time"):
            torch.autograd.grad(loss, weights)
        caches.clear()


def test_an_output_changed_in_place_is_refused_at_backward():
    m, x, states, weights = _function_inputs("lstm_torch")
    h, c, h_n, c_n = m.Function.apply(x, None, False, *states, *weights)
    loss = h.sum()
    with torch.no_grad():
        h.mul_(2)  # what the kernels' backward reads
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


# -- variable lengths against the bare kernels, one sequence at a time -----------------------
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("cell", ["lstm_peephole", "mgu", "indrnn", "single_sigmoid", "gru"])
def test_lengths_match_the_kernels_on_each_sequence_alone(cell, reverse):
    """Function with lengths = the NumPy kernels run on x[:length] of each sequence (read
    backwards for reverse): outputs (zero beyond the length), final states, every gradient."""
    m, x, states, weights = _function_inputs(cell, seed=4)
    kernels = m._kernels("numpy")
    lengths = [3, 6, 1, 2, 6]
    outs = m.Function.apply(x, lengths, reverse, *states, *weights)
    rng = np.random.default_rng(5)
    cot = [torch.tensor(rng.standard_normal(o.shape)) for o in outs]
    grads = torch.autograd.grad(sum((o * c).sum() for o, c in zip(outs, cot)), [x, *states, *weights])
    params = {name: w.detach().numpy() for name, w in zip(m.PARAMETERS, weights)}
    expected_grads = {name: 0.0 for name in m.PARAMETERS}
    expected_x = np.zeros(x.shape)
    n_out = len(m.OUTPUTS)
    for b, n in enumerate(lengths):
        seq = x.detach().numpy()[:n, b:b + 1]
        seq = seq[::-1] if reverse else seq
        out, cache = kernels.forward(params, seq, {s: st.detach().numpy()[b:b + 1] for s, st in zip(m.STATES, states)})
        g = {}
        for i, name in enumerate(m.OUTPUTS):
            mine = outs[i].detach().numpy()[:, b]
            want = out[name][::-1, 0] if reverse else out[name][:, 0]
            assert np.allclose(mine[:n], want, rtol=1e-13, atol=1e-14) and not mine[n:].any(), (name, b)
            c = cot[i].numpy()[:n, b:b + 1]
            g[name] = (c[::-1] if reverse else c).copy()
        for j, name in enumerate(m.STATES):
            assert np.allclose(outs[n_out + j].detach().numpy()[b], out[name][-1, 0], rtol=1e-13, atol=1e-14)
            g[name][-1] += cot[n_out + j].numpy()[b]
        got = kernels.backward(params, cache, g)
        for name in m.PARAMETERS:
            expected_grads[name] = expected_grads[name] + got[name]
        expected_x[:n, b] = got["x"][::-1, 0] if reverse else got["x"][:, 0]
        for j, name in enumerate(m.STATES):
            assert rel_err(grads[1 + j][b], got[name + "0"][0]) <= TOL, (name, b)
    assert rel_err(grads[0], expected_x) <= TOL
    for w_grad, name in zip(grads[1 + len(m.STATES):], m.PARAMETERS):
        assert rel_err(w_grad, expected_grads[name]) <= TOL, name


# -- the spec-file cells as stacked layers, against torch eager -------------------------------
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
@pytest.mark.parametrize("cell", ["mgu", "lstm_peephole", "indrnn", "mingru"])
def test_spec_cells_stack_as_torch_eager_does(cell, bidirectional):
    """Two layers (the readout passed on where the cell has one), lengths unsorted: output, final
    states and every gradient against the equations written in torch (test_spec_torch.py)."""
    from test_spec_torch import ORACLES

    step, readout, _, _ = ORACLES[cell]
    m = torch_module(cell)
    torch.manual_seed(1)
    net = m.RNN(N_IN, N_HIDDEN, output_size=3, num_layers=2, bidirectional=bidirectional, dtype=torch.float64)
    D = 2 if bidirectional else 1
    x = torch.randn(T, B, N_IN, dtype=torch.float64, requires_grad=True)
    hx = [torch.randn(2 * D, B, N_HIDDEN, dtype=torch.float64, requires_grad=True) for _ in m.STATES]
    packed = pack_padded_sequence(x, torch.tensor(LENGTHS), enforce_sorted=False)
    out, h_n = net(packed, hx[0] if len(hx) == 1 else tuple(hx))
    output, _ = pad_packed_sequence(out)
    h_n = [h_n] if len(hx) == 1 else list(h_n)
    params = {(layer, d): {name: getattr(net, net._name(name, layer, d)) for name in m.PARAMETERS}
              for layer in range(2) for d in range(D)}
    ref_out, ref_finals = eager_stack(step, readout, params, x, LENGTHS, dict(zip(m.STATES, hx)), 2, D, m.LAYER_OUTPUT)
    assert rel_err(output, ref_out) <= TOL
    for name, h in zip(m.STATES, h_n):
        assert rel_err(h, ref_finals[name]) <= TOL, name
    w = torch.randn(output.shape, dtype=torch.float64)
    leaves = [x, *hx, *net.parameters()]
    got = torch.autograd.grad((output * w).sum() + sum(h.square().sum() for h in h_n), leaves)
    want = torch.autograd.grad((ref_out * w).sum() + sum(ref_finals[s].square().sum() for s in m.STATES), leaves)
    names = ["x", *m.STATES, *(n for n, _ in net.named_parameters())]
    bad = {n: e for n, a, b in zip(names, got, want) if not (e := rel_err(a, b)) <= TOL}
    assert not bad, bad


def test_every_builtin_cell_has_a_torch_module():
    for cell in CELLS:
        m = torch_module(cell)
        assert m.CELL == cell and set(m.PARAMETERS) == set(m._kernels("numpy").PARAM_SHAPES)
        assert m.OUTPUTS == m._kernels("numpy").OUTPUTS
