"""Cells of shapes the built-ins do not have: the pipeline must derive them right too."""

from __future__ import annotations

import pytest
import sympy

from symrnn import Cell, Loss, params, relu, sigmoid, softplus, exp, tanh
from symrnn.gradcheck import finite_differences, random_problem, rtrl_vs_bptt
from symrnn.pipeline import build, load_module, render_numpy

x, h_prev, h, c_prev, c, z, g, y, target, h_tilde, a = sympy.symbols("x h_prev h c_prev c z g y target h_tilde a")


def min_gru() -> Cell:
    """minGRU: gates from the input only, so the loop has no GEMM at all."""
    W_z, b_z, W_h, V = params("W_z b_z W_h V")
    return Cell(
        name="min_gru", inputs={"x": "n_in"}, states={"h": "n_hidden"},
        params={"W_z": ("n_hidden", "n_in"), "b_z": ("n_hidden",), "W_h": ("n_hidden", "n_in"), "V": ("n_out", "n_hidden")},
        equations={"z": sigmoid(W_z @ x + b_z), "h_tilde": W_h @ x, "h": (1 - z) * h_prev + z * h_tilde},
        readout={"y": V @ h}, loss=Loss((y - target) ** 2 / 2, reduction="mean"),
    )


def ind_rnn() -> Cell:
    """IndRNN: diagonal recurrence u * h_prev, relu; softplus readout."""
    W, u, b, V = params("W u b V")
    return Cell(
        name="ind_rnn", inputs={"x": "n_in"}, states={"h": "n_hidden"},
        params={"W": ("n_hidden", "n_in"), "u": ("n_hidden",), "b": ("n_hidden",), "V": ("n_out", "n_hidden")},
        equations={"h": relu(W @ x + u * h_prev + b)},
        readout={"y": softplus(V @ h)},
    )


def gated_readout() -> Cell:
    """The readout reads a gate (a loop node that is not a state); a scalar
    parameter scales the recurrence; exp and a quotient appear."""
    W, U, V, alpha = params("W U V alpha")
    return Cell(
        name="gated_readout", inputs={"x": "n_in"}, states={"h": "n_hidden", "c": "n_hidden"},
        params={"W": ("n_hidden", "n_in"), "U": ("n_hidden", "n_hidden"), "V": ("n_out", "n_hidden"), "alpha": ()},
        equations={
            "g": sigmoid(W @ x + U @ h_prev),
            "c": alpha * c_prev + g * tanh(W @ x),
            "h": c / (1 + exp(-g)) + h_prev * g,
        },
        readout={"y": V @ (g * h)},
    )


def two_stage() -> Cell:
    """A GEMM whose operand is computed in the step, feeding a second state."""
    A, B_, C = params("A B_ C")
    return Cell(
        name="two_stage", inputs={"x": "n_in"}, states={"h": "n_hidden"},
        params={"A": ("n_hidden", "n_hidden + n_in"), "B_": ("n_hidden", "n_hidden"), "C": ("n_out", "n_hidden")},
        equations={"a": tanh(A @ (h_prev, x)), "h": sigmoid(B_ @ (a * h_prev)) * a},
        readout={"y": C @ h},
    )


def constant_gate() -> Cell:
    """A gate computed from parameters only (constant over time) and relu of a
    difference (its derivative, a step, appears negated in the RTRL recursion)."""
    W, U, b, c0 = params("W U b c0")
    return Cell(
        name="constant_gate", inputs={"x": "n_in"}, states={"h": "n_hidden"},
        params={"W": ("n_hidden", "n_in"), "U": ("n_hidden", "n_hidden"), "b": ("n_hidden",), "c0": ("n_hidden",)},
        equations={"g": sigmoid(b), "a": relu(W @ x - U @ h_prev) + c0, "h": g * h_prev + (1 - g) * tanh(a)},
    )


CELLS = [min_gru, ind_rnn, gated_readout, two_stage, constant_gate]


@pytest.fixture(params=CELLS, ids=lambda f: f.__name__)
def custom(request):
    cell = request.param()
    return load_module(render_numpy(build(cell)), cell.name)


def test_finite_differences(custom):
    problem = random_problem(custom, seed=11, T=5, B=2)
    bad = [(r.name, r.error) for r in finite_differences(custom, problem) if r.error >= 1e-6]
    assert not bad, bad


def test_rtrl_equals_bptt(custom):
    bad = [(r.name, r.error) for r in rtrl_vs_bptt(custom, random_problem(custom, seed=12, T=4, B=2)) if r.error >= 1e-10]
    assert not bad, bad


def test_min_gru_loop_has_no_gemm():
    source = render_numpy(build(min_gru()))
    loop = source.split("for t in range(T):")[1].split("# readout")[0]
    assert " @ " not in loop
