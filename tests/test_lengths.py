"""Variable lengths in the kernel contract (NumPy modules): ``forward(..., lengths, reverse)``,
``final_states(cache)``, ``backward(..., grad_final)``, ``rtrl_grads`` and the losses with
lengths.  Derived like the rest (symrnn.schedule: the mask m = [t < length], h = m h_new +
(1 - m) h_prev, outputs m * value) and checked the same way: finite differences (lengths 0, 1,
T, unsorted; both directions; cotangents of the final states), RTRL (which runs the definition,
the carry) = BPTT (which uses what the definition implies), for built-in, custom and random spec
cells; and against the meaning: each sequence alone, and a reversed row by hand."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, assume, given, settings
from hypothesis import strategies as st

import test_custom_cells
from conftest import CELLS
from symrnn.cells import builtin
from symrnn.errors import UserError
from symrnn.gradcheck import finite_differences, random_problem, rel_error, rtrl_vs_bptt, with_lengths
from symrnn.pipeline import build, load_module, render_numpy
from symrnn.spec import SpecWarning, parse_spec
from test_spec_random_cells import spec_text

#: T = 5, B = 4: a full row, an empty one, a row of one step, one in between (unsorted)
LENGTHS = [5, 0, 1, 3]


def _bad(results, tol):
    return [(r.name, r.error) for r in results if not r.error < tol]


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_finite_differences_with_lengths(module, reverse):
    problem = with_lengths(module, random_problem(module, seed=1, T=5, B=4), LENGTHS, reverse, seed=2)
    assert not _bad(finite_differences(module, problem), 1e-6)


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_rtrl_equals_bptt_with_lengths(module, reverse):
    problem = with_lengths(module, random_problem(module, seed=3, T=5, B=4), LENGTHS, reverse, seed=4)
    assert not _bad(rtrl_vs_bptt(module, problem), 1e-10)


def test_grad_final_by_finite_differences_without_lengths(module):
    """dL/d(final states) alone (no output cotangents), the lengths None path."""
    problem = with_lengths(module, random_problem(module, seed=5, T=4, B=2), None, seed=6)
    problem.grad_outputs.clear()
    assert not _bad(finite_differences(module, problem), 1e-6)
    assert not _bad(rtrl_vs_bptt(module, problem), 1e-10)


@pytest.mark.parametrize("cell_name", [c for c in CELLS if builtin(c).loss is not None])
def test_loss_with_lengths(module, cell_name):
    """The loss leaves out each row's steps at and beyond its length; its gradients by finite
    differences and RTRL."""
    problem = with_lengths(module, random_problem(module, seed=7, T=5, B=4), LENGTHS, True)
    assert not _bad(finite_differences(module, problem, loss=True), 1e-6)
    loss, grads = module.loss_and_grads(problem.params, problem.x, problem.target, problem.state0, LENGTHS, True)
    rtrl_loss, rtrl = module.rtrl_loss_and_grads(problem.params, problem.x, problem.target, problem.state0, LENGTHS, True)
    assert rel_error(loss, rtrl_loss) < 1e-12
    assert max(rel_error(rtrl[k], grads[k]) for k in grads) < 1e-10
    # the loss of the rows alone, each over its own steps
    per_row = 0.0
    for b, n in enumerate(LENGTHS):
        if n:
            rows = slice(b, b + 1)
            x, target = problem.x[:n, rows], problem.target[:n, rows]
            state0 = {k: v[rows] for k, v in problem.state0.items()}
            alone = module.loss_and_grads(problem.params, x, target, state0, reverse=True)[0]
            per_row += alone * (n / 5 if builtin(cell_name).loss.reduction == "mean" else 1)  # 1/T, not 1/length
    assert rel_error(loss, per_row) < 1e-12


def _alone(module, problem, b, n, reverse=False):
    """Row b run by itself over its first n steps."""
    rows = slice(b, b + 1)
    state0 = {k: v[rows] for k, v in problem.state0.items()}
    outputs, cache = module.forward(problem.params, problem.x[:n, rows], state0, reverse=reverse)
    return outputs, module.final_states(cache)


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_lengths_are_each_sequence_alone(module, reverse):
    """Row b's outputs are those of its first lengths[b] steps run alone, then zero; its final
    states are the states at its last step (the initial states where its length is 0)."""
    problem = random_problem(module, seed=8, T=5, B=4)
    outputs, cache = module.forward(problem.params, problem.x, problem.state0, LENGTHS, reverse)
    final = module.final_states(cache)
    for b, n in enumerate(LENGTHS):
        alone, alone_final = _alone(module, problem, b, n, reverse)
        for k, v in outputs.items():
            np.testing.assert_allclose(v[:n, b], alone[k][:, 0], rtol=1e-13, atol=1e-15)
            assert not v[n:, b].any(), (k, b)
        for k, v in final.items():
            expected = alone_final[k][0] if n else problem.state0[k][b]
            np.testing.assert_allclose(v[b], expected, rtol=1e-13, atol=1e-15)


def test_reverse_is_each_row_flipped_by_hand(module):
    """reverse=True = flipping each row's first lengths[b] steps of x, running forward, and
    flipping the outputs (and the gradient of x) back."""
    problem = random_problem(module, seed=9, T=5, B=4)
    flipped = problem.x.copy()
    go = {k: v.copy() for k, v in problem.grad_outputs.items()}
    for b, n in enumerate(LENGTHS):
        flipped[:n, b] = problem.x[:n, b][::-1]
        for k in go:
            go[k][:n, b] = problem.grad_outputs[k][:n, b][::-1]
    out_r, cache_r = module.forward(problem.params, problem.x, problem.state0, LENGTHS, reverse=True)
    out_f, cache_f = module.forward(problem.params, flipped, problem.state0, LENGTHS)
    grads_r = module.backward(None, cache_r, problem.grad_outputs)
    grads_f = module.backward(None, cache_f, go)
    for b, n in enumerate(LENGTHS):
        for k in out_r:
            np.testing.assert_array_equal(out_r[k][:n, b], out_f[k][:n, b][::-1])
            assert not out_r[k][n:, b].any()
        np.testing.assert_array_equal(grads_r["x"][:n, b], grads_f["x"][:n, b][::-1])
        assert not grads_r["x"][n:, b].any()
    for k in grads_f:
        if k != "x":
            np.testing.assert_allclose(grads_r[k], grads_f[k], rtol=1e-12, atol=1e-14)
    for k, v in module.final_states(cache_r).items():
        np.testing.assert_array_equal(v, module.final_states(cache_f)[k])


def test_no_lengths_is_unchanged(module):
    """lengths=None, lengths all T, and grad_final as a cotangent of the last output: the same
    numbers, bit for bit; the outputs are still read-only, the final states their last step."""
    problem = random_problem(module, seed=10, T=4, B=3)
    out, cache = module.forward(problem.params, problem.x, problem.state0)
    full, cache_full = module.forward(problem.params, problem.x, problem.state0, lengths=[4, 4, 4])
    grads = module.backward(None, cache, problem.grad_outputs)
    grads_full = module.backward(None, cache_full, problem.grad_outputs)
    for k in out:
        np.testing.assert_array_equal(out[k], full[k])
        assert not out[k].flags.writeable
    for k in grads:
        np.testing.assert_array_equal(grads[k], grads_full[k])
    final = module.final_states(cache)
    for k, v in final.items():
        np.testing.assert_array_equal(v, out[k][-1])
        assert not v.flags.writeable
    grad_final = {k: 0.25 * v for k, v in problem.state0.items()}
    go = {k: v.copy() for k, v in problem.grad_outputs.items()}
    for k, g in grad_final.items():
        go[k][-1] += g
    np.testing.assert_equal(module.backward(None, cache, problem.grad_outputs, grad_final), module.backward(None, cache, go))


def test_padding_does_not_matter(module):
    """x at the held steps (NaN here) changes nothing: outputs, final states, gradients."""
    problem = random_problem(module, seed=12, T=5, B=4)
    padded = problem.x.copy()
    for b, n in enumerate(LENGTHS):
        padded[n:, b] = np.nan
    results = []
    for x in (problem.x, padded):
        outputs, cache = module.forward(problem.params, x, problem.state0, LENGTHS, True)
        grads = module.backward(None, cache, problem.grad_outputs, {k: v + 1 for k, v in problem.state0.items()})
        results.append((outputs, module.final_states(cache), grads))
    for a, b in zip(*results):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])


def test_caller_arrays_are_not_written():
    module = load_module(render_numpy(build("lstm_torch")), "lstm_torch_numpy")
    problem = with_lengths(module, random_problem(module, seed=11, T=5, B=4), LENGTHS, True)
    lengths = np.array(LENGTHS)
    saved = [problem.x.copy(), lengths.copy(), {k: v.copy() for k, v in problem.grad_outputs.items()},
             {k: v.copy() for k, v in problem.grad_final.items()}]
    _, cache = module.forward(problem.params, problem.x, problem.state0, lengths, True)
    module.backward(None, cache, problem.grad_outputs, problem.grad_final)
    np.testing.assert_array_equal(saved[0], problem.x)
    np.testing.assert_array_equal(saved[1], lengths)
    for mine, theirs in ((saved[2], problem.grad_outputs), (saved[3], problem.grad_final)):
        for k in mine:
            np.testing.assert_array_equal(mine[k], theirs[k])


@pytest.mark.parametrize("lengths, message", [
    ([5, 0, 1], "lengths has shape (3,); expected (B,) = (4,)"),
    ([5.0, 0, 1, 3], "lengths has dtype float64; expected integers"),
    ([True, False, True, True], "lengths has dtype bool; expected integers"),
    ([5, 0, -1, 3], "lengths[2] = -1 is not in [0, T] = [0, 5]"),
    ([5, 6, 1, 3], "lengths[1] = 6 is not in [0, T] = [0, 5]"),
])
def test_bad_lengths_are_one_line_errors(lengths, message):
    module = load_module(render_numpy(build("gru")), "gru_numpy")
    problem = random_problem(module, seed=0, T=5, B=4)
    for call in (lambda: module.forward(problem.params, problem.x, lengths=lengths),
                 lambda: module.rtrl_grads(problem.params, problem.x, {}, lengths=lengths)):
        with pytest.raises(ValueError) as info:
            call()
        assert str(info.value) == message


def test_bad_reverse_and_grad_final_are_one_line_errors():
    module = load_module(render_numpy(build("lstm")), "lstm_numpy")
    problem = random_problem(module, seed=0, T=3, B=2)
    with pytest.raises(ValueError, match=r"^reverse = 'yes': expected True or False$"):
        module.forward(problem.params, problem.x, reverse="yes")
    _, cache = module.forward(problem.params, problem.x, lengths=[3, 1])
    with pytest.raises(ValueError, match=r"^grad_final has no state 'q'; cell 'lstm' has the states h, c$"):
        module.backward(None, cache, {}, {"q": np.zeros((2, 4))})
    with pytest.raises(ValueError, match=r"^grad_final\['c'\] has shape \(4,\); expected \(2, 4\) \(B, n_hidden\)$"):
        module.backward(None, cache, {}, {"c": np.zeros(4)})
    with pytest.raises(ValueError, match=r"^grad_outputs\['h'\] has shape \(2, 4\); expected \(T, B, size\)"):
        module.backward(None, cache, {"h": np.zeros((2, 4))})
    with pytest.raises(ValueError, match=r"^grad_final\['h'\] has dtype complex128; expected real numbers$"):
        module.backward(None, cache, {}, {"h": np.zeros((2, 4), complex)})


@pytest.fixture(params=test_custom_cells.CELLS, ids=lambda f: f.__name__)
def custom(request):
    cell = request.param()
    return load_module(render_numpy(build(cell)), cell.name)


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_custom_cells_with_lengths(custom, reverse):
    problem = with_lengths(custom, random_problem(custom, seed=13, T=5, B=4), LENGTHS, reverse, seed=14)
    assert not _bad(finite_differences(custom, problem), 1e-6)
    assert not _bad(rtrl_vs_bptt(custom, problem), 1e-10)


@settings(max_examples=40, deadline=None, derandomize=True, phases=(Phase.explicit, Phase.generate),
          suppress_health_check=list(HealthCheck))
@given(text=spec_text(), reverse=st.booleans())
def test_random_cells_with_lengths(text, reverse):
    """Random cells (tests/test_spec_random_cells.py's grammar): finite differences and
    RTRL = BPTT with lengths 0, T and one between, either direction, final-state cotangents."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SpecWarning)
        try:
            cell = parse_spec(text, "random_cell.toml")
        except UserError:
            assume(False)
    module = load_module(render_numpy(build(cell)), cell.name)
    problem = with_lengths(module, random_problem(module, seed=3, T=4, B=3, n_in=3, n_hidden=3, n_out=3), [2, 4, 0],
                           reverse, seed=4)
    assert not _bad(finite_differences(module, problem), 1e-6), text
    assert not _bad(rtrl_vs_bptt(module, problem), 1e-10), text
