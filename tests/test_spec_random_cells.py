"""Cells nobody has written yet: hypothesis draws random small cells from a grammar,
writes each as a spec file, generates its module, and checks finite differences and
BPTT = RTRL.  The derivation must be right for any cell, not only the built-in ones.

Grammar: 1-2 states, 1-3 intermediates (gates) g0.., random elementwise expressions
over states at t-1, earlier gates, the input (through a matrix), biases and numbers,
with the nonlinearities sigmoid, tanh, softplus, relu, exp (of a tanh, to stay
bounded), identity, +, -, *, / (by a positive quantity) and ** 2; matrix-vector
products W @ x, U @ s_prev, W @ (s_prev, x) and U @ (gate * s_prev).  State updates
are kept bounded (a tanh, or a sigmoid-gated leak) so the recurrence cannot blow up.
"""

from __future__ import annotations

import re
import warnings

from hypothesis import HealthCheck, Phase, assume, given, settings
from hypothesis import strategies as st

from symrnn.errors import UserError
from symrnn.gradcheck import finite_differences, random_problem, rtrl_vs_bptt
from symrnn.pipeline import build, load_module, render_numpy
from symrnn.spec import SpecWarning, parse_spec

UNARY = ("sigmoid({})", "tanh({})", "softplus({})", "relu({})", "exp(tanh({}))", "identity({})", "({})**2")


class _Params:
    """Parameters declared as the expression drawing uses them."""

    def __init__(self):
        self.shapes: dict[str, list[str]] = {}

    def new(self, prefix: str, shape: list[str]) -> str:
        name = f"{prefix}{len(self.shapes)}"
        self.shapes[name] = shape
        return name


@st.composite
def expression(draw, params: _Params, vectors: list[str], states: list[str], depth: int) -> str:
    """An elementwise expression of n_hidden-vectors (never a bare number)."""
    kind = draw(st.sampled_from(["leaf", "leaf", "matvec", "unary", "binary", "binary"] if depth > 0 else ["leaf", "matvec"]))
    if kind == "leaf":
        choice = draw(st.sampled_from(vectors + ["bias"]))
        return params.new("b", ["n_hidden"]) if choice == "bias" else choice
    if kind == "matvec":
        s = draw(st.sampled_from(states))
        form = draw(st.sampled_from(["x", "state", "concat", "gated"] if len(vectors) > len(states) + 0 else ["x", "state", "concat"]))
        if form == "x":
            return f"{params.new('W', ['n_hidden', 'n_in'])} @ x"
        if form == "state":
            return f"{params.new('U', ['n_hidden', 'n_hidden'])} @ {s}_prev"
        if form == "concat":
            return f"{params.new('W', ['n_hidden', 'n_hidden + n_in'])} @ ({s}_prev, x)"
        gate = draw(st.sampled_from([v for v in vectors if v.startswith("g")] or [f"{s}_prev"]))
        return f"{params.new('U', ['n_hidden', 'n_hidden'])} @ ({gate} * {s}_prev)"
    sub = expression(params, vectors, states, depth - 1)
    if kind == "unary":
        return draw(st.sampled_from(UNARY)).format(draw(sub))
    a, b = draw(sub), draw(sub)
    op = draw(st.sampled_from(["+", "-", "*", "/", "scaled"]))
    if op == "/":
        return f"({a}) / (1 + sigmoid({b}))"
    if op == "scaled":
        c = draw(st.sampled_from(["0.5", "2", "-1.5", "3"]))
        return f"{c} * ({a}) + {b}"
    return f"({a}) {op} ({b})"


@st.composite
def spec_text(draw) -> str:
    params = _Params()
    states = draw(st.sampled_from([["h"], ["h", "c"]]))
    n_gates = draw(st.integers(1, 3))
    vectors = [f"{s}_prev" for s in states]
    lines = []
    for k in range(n_gates):
        lines.append(f'g{k} = "{draw(expression(params, vectors, states, depth=2))}"')
        vectors = vectors + [f"g{k}"]
    updates = []
    for s in states:
        e = draw(expression(params, vectors, states, depth=2))
        # the update reads its own past, so every state is recurrent, and stays bounded
        gate = None if draw(st.booleans()) else draw(st.sampled_from([v for v in vectors if v.startswith("g")]))
        updates.append((s, e, gate))
    # every gate must be used (an unused intermediate is an error): add the unused ones to the first update
    text_so_far = " ".join(lines) + " ".join(f"{e} {g}" for _, e, g in updates)
    unused = [f"g{k}" for k in range(n_gates) if not re.search(rf"\bg{k}\b", text_so_far.split(f'g{k} = "', 1)[1])]
    for s, e, gate in updates:
        if unused:
            e, unused = " + ".join([e, *unused]), []
        if gate is None:
            update = f"tanh({e} + {params.new('u', ['n_hidden'])} * {s}_prev)"
        else:
            update = f"sigmoid({gate}) * {s}_prev + (1 - sigmoid({gate})) * tanh({e} + {params.new('b', ['n_hidden'])})"
        lines.append(f'{s} = "{update}"')
    readout = draw(st.booleans())
    if readout:
        lines_ro = ['[readout]', f'y = "{params.new("V", ["n_out", "n_hidden"])} @ h"', "[loss]",
                    'expr = "(y - target)**2 / 2"', f'reduction = "{draw(st.sampled_from(["sum", "mean"]))}"']
    else:
        lines_ro = []
    decls = [f"{k} = {v!r}".replace("'", '"') for k, v in params.shapes.items()]
    return "\n".join([
        '[cell]', 'name = "random_cell"', '[inputs]', 'x = "n_in"', '[states]',
        *[f'{s} = "n_hidden"' for s in states], '[params]', *decls, '[equations]', *lines, *lines_ro, "",
    ])


# no shrinking: a failure reports the drawn cell as it is, in seconds rather than minutes
@settings(max_examples=100, deadline=None, derandomize=True, phases=(Phase.explicit, Phase.reuse, Phase.generate),
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(spec_text())
def test_random_cells_pass_finite_differences_and_rtrl_equals_bptt(text):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SpecWarning)  # a gate the states do not read is fine here
        try:
            cell = parse_spec(text, "random_cell.toml")
        except UserError as exc:
            # a draw like (g1) - (g1) is the number 0, so g1 has no vector or no user: not a
            # cell (and the message says so); anything else is a bug
            assume("has no vector in it" not in str(exc) and "no state update or readout uses it" not in str(exc))
            raise AssertionError(f"{exc}\n{text}") from None
    module = load_module(render_numpy(build(cell)), cell.name)
    problem = random_problem(module, seed=3, T=4, B=2, n_in=2, n_hidden=3, n_out=2)
    bad = [(r.name, r.error) for r in finite_differences(module, problem) if not r.error < 1e-6]
    assert not bad, f"{bad}\n{text}"
    bad = [(r.name, r.error) for r in rtrl_vs_bptt(module, problem) if not r.error < 1e-10]
    assert not bad, f"{bad}\n{text}"
    if hasattr(module, "loss_and_grads"):
        bad = [(r.name, r.error) for r in finite_differences(module, problem, loss=True) if not r.error < 1e-6]
        assert not bad, f"{bad}\n{text}"
