"""Cells nobody has written yet: hypothesis draws random small cells from a grammar,
writes each as a spec file, generates its module, and checks finite differences and
BPTT = RTRL.  The derivation must be right for any cell, not only the built-in ones.

Grammar: 1-3 states, 1-3 intermediates (gates), random elementwise expressions over
states at t-1, earlier gates, states already updated in the step, the input (through a
matrix), biases (vectors, or scalars added to every unit), scalar and vector parameters and numbers, with the nonlinearities
sigmoid, tanh, softplus, relu, exp (of a tanh, to stay bounded), identity, sin, cos,
log and sqrt (of 1 + e**2, inside their domain), +, -, *, / (by a positive quantity),
** 2 and a power with an expression as exponent (sigmoid(a) ** (1 + sigmoid(b))), a
nonlinearity of a scalar parameter (sigmoid(a) * e); the reductions over units mean, sum
and logsumexp, and a layer norm of a drawn expression; matrix-vector products W @ x,
U @ s_prev, W @ (s_prev, x), U @ (gate * s_prev), P @ s (a state's new value), a matrix
the cell already uses on another vector, transposes (U.T @ s_prev, the transpose of a
matrix already used, R.T @ x of an n_in x n_hidden R) and combinations of matrices,
their transposes and I ((U - U.T - c * I) @ v, c a number or a scalar parameter; U - 2 V.T with V a
matrix the cell may read elsewhere); a readout (sometimes) multiplies one or two
states or gates by their own matrices, maybe under a tanh, and sometimes takes its log-softmax
for a cross-entropy loss; a second readout (sometimes) multiplies a state or gate by a
reduction of one (which the loop's adjoint then reads at its step).  Every name (states,
gates, parameters, the readout) comes from a pool of names that look like the
generated code's own, the template's, Python's, C++'s and CUDA's, or a paper's
(``W_T``, ``common``, ``h_seq``, ``T``, ``np``, ``int``, ``threadIdx``, ``d_1``),
and half the draws make n_in = n_hidden = n_out, so a confused name or buffer gives
wrong numbers instead of a shape error.  State updates are kept bounded (a tanh, or
a sigmoid-gated leak) so the recurrence cannot blow up.
"""

from __future__ import annotations

import re
import warnings

import numpy as np
from hypothesis import HealthCheck, Phase, assume, given, settings
from hypothesis import strategies as st
from test_hostile_names import POOL

from symrnn.errors import UserError
from symrnn.gradcheck import finite_differences, random_problem, rtrl_vs_bptt
from symrnn.ops import OPS
from symrnn.pipeline import build, load_module, render_numpy
from symrnn.spec import SpecWarning, parse_spec

UNARY = ("sigmoid({})", "tanh({})", "softplus({})", "relu({})", "exp(tanh({}))", "identity({})", "({})**2",
         "sin({})", "cos({})", "log(1 + ({})**2)", "sqrt(1 + ({})**2)")
#: reductions over units (symrnn.reductions), alone and as a layer norm of a drawn expression
#: with a gain vector {1} before and after it: a drawn expression may be the same at every unit (a
#: reduction itself), and a reduction may be drawn of a layer norm; without the gains the layer
#: norm, or the mean of one, would be 0 identically, its gradient rounding noise that neither
#: differences nor a second backend can judge
REDUCE = ("mean({0})", "sum({0}) / 3", "logsumexp({0})",
          "{1} * ({0} * {1} - mean({0} * {1})) * (mean(({0} * {1} - mean({0} * {1}))**2) + 0.5)**-0.5")


def reduction(draw, params, operand: str) -> str:
    """A reduction of ``operand`` drawn from REDUCE (a layer norm's gain a new vector parameter)."""
    form = draw(st.sampled_from(REDUCE))
    return form.format(operand, params.new("g", ["n_hidden"]) if "{1}" in form else "")

#: names for everything a cell declares: the generated code's own patterns, template
#: variables, Python, C++ and CUDA names, and names papers use (tests/test_hostile_names.py)
NAMES = [n for n in POOL if n not in ("x", "target") and n not in OPS]  # a function's name is no value's


class _Names:
    """The cell's names, drawn from the pool without repeats (so a drawn cell tests the
    namer too: W_T beside W, a state named T, a gate named d_x, ...)."""

    def __init__(self, draw):
        self.draw, self.used = draw, set()

    def new(self) -> str:
        """A name no other name of the cell clashes with: not one used, not <used>_prev, and
        not <used>0 or a used one + 0 (a state's initial value has the gradient key <state>0)."""
        name = self.draw(st.sampled_from([n for n in NAMES if not {n, f"{n}_prev", f"{n}0", n[:-1]} & self.used]))
        self.used |= {name, f"{name}_prev", f"{name}0"}
        return name


class _Params:
    """Parameters declared as the expression drawing uses them."""

    def __init__(self, names: _Names):
        self.names = names
        self.shapes: dict[str, list[str]] = {}
        self.by_shape: dict[tuple, list[str]] = {}

    def new(self, prefix: str, shape: list[str]) -> str:
        name = self.names.new()
        self.shapes[name] = shape
        self.by_shape.setdefault(tuple(shape), []).append(name)
        return name


@st.composite
def expression(draw, params: _Params, vectors: list[str], states: list[str], depth: int, new: list[str] = ()) -> str:
    """An elementwise expression of n_hidden-vectors (never a bare number).

    ``vectors``: what it may read elementwise; ``new``: states already updated in this step
    (a product of their new value by a matrix is a GEMM on a value of the step)."""
    kind = draw(st.sampled_from(["leaf", "leaf", "matvec", "unary", "binary", "binary", "scaled_param", "reduction"] if depth > 0
                                else ["leaf", "matvec"]))
    if kind == "leaf":
        choice = draw(st.sampled_from(vectors + ["bias"]))
        if choice == "bias":  # a vector, or a scalar added to every unit
            return params.new("b", draw(st.sampled_from([["n_hidden"], ["n_hidden"], []])))
        return choice
    if kind == "matvec":
        s = draw(st.sampled_from(states))
        forms = ["x", "state", "concat", "shared"] + (["gated"] if len(vectors) > len(states) else []) + (["new"] if new else [])
        form = draw(st.sampled_from(forms + ["transposed", "combination"]))
        if form == "transposed":  # U.T @ s_prev, the transpose of a matrix the cell uses, or R.T @ x
            used = params.by_shape.get(("n_hidden", "n_hidden"))
            which = draw(st.sampled_from(["new", "x"] + (["shared"] if used else [])))
            if which == "x":
                return f"{params.new('R', ['n_in', 'n_hidden'])}.T @ x"
            weight = draw(st.sampled_from(used)) if which == "shared" else params.new("U", ["n_hidden", "n_hidden"])
            return f"{weight}.T @ {draw(st.sampled_from(vectors))}"
        if form == "combination":  # (U - U.T - c * I) @ v, c a number or a scalar parameter
            U = params.new("U", ["n_hidden", "n_hidden"])
            c = draw(st.sampled_from(["0.5", "scalar"]))
            c = params.new("g", []) if c == "scalar" else c
            used = params.by_shape.get(("n_hidden", "n_hidden"))
            other = draw(st.sampled_from(used)) if used else params.new("U", ["n_hidden", "n_hidden"])
            terms = draw(st.sampled_from([f"{U} - {U}.T - {c} * I", f"(1 - {c}) * ({U} + {U}.T) + {c} * {U}",
                                          f"{c} * {U}.T + I", f"{U} - 2 * {other}.T"]))
            return f"({terms}) @ {draw(st.sampled_from(vectors))}"
        if form == "x":
            return f"{params.new('W', ['n_hidden', 'n_in'])} @ x"
        if form == "state":
            return f"{params.new('U', ['n_hidden', 'n_hidden'])} @ {s}_prev"
        if form == "shared":  # a matrix the cell already uses, on another vector
            used = params.by_shape.get(("n_hidden", "n_hidden"))
            weight = draw(st.sampled_from(used)) if used else params.new("U", ["n_hidden", "n_hidden"])
            return f"{weight} @ {draw(st.sampled_from(vectors))}"
        if form == "new":
            return f"{params.new('P', ['n_hidden', 'n_hidden'])} @ {draw(st.sampled_from(list(new)))}"
        if form == "concat":
            return f"{params.new('W', ['n_hidden', 'n_hidden + n_in'])} @ ({s}_prev, x)"
        gate = draw(st.sampled_from([v for v in vectors if not v.endswith("_prev")] or [f"{s}_prev"]))
        return f"{params.new('U', ['n_hidden', 'n_hidden'])} @ ({gate} * {s}_prev)"
    sub = expression(params, vectors, states, depth - 1, new)
    if kind == "scaled_param":  # a scalar or a vector parameter, elementwise, or a nonlinearity of a scalar
        shape = draw(st.sampled_from([[], ["n_hidden"], "sigmoid"]))
        if shape == "sigmoid":
            return f"sigmoid({params.new('a', [])}) * ({draw(sub)})"
        return f"{params.new('a', shape)} * ({draw(sub)})"
    if kind == "unary":
        return draw(st.sampled_from(UNARY)).format(draw(sub))
    if kind == "reduction":
        return reduction(draw, params, f"({draw(sub)})")
    a, b = draw(sub), draw(sub)
    op = draw(st.sampled_from(["+", "-", "*", "/", "scaled", "**"]))
    if op == "**":  # an expression as exponent, of a positive base
        return f"sigmoid({a}) ** (1 + sigmoid({b}))"
    if op == "/":
        return f"({a}) / (1 + sigmoid({b}))"
    if op == "scaled":
        c = draw(st.sampled_from(["0.5", "2", "-1.5", "3"]))
        return f"{c} * ({a}) + {b}"
    return f"({a}) {op} ({b})"


@st.composite
def spec_text(draw) -> str:
    names = _Names(draw)
    params = _Params(names)
    states = [names.new() for _ in range(draw(st.integers(1, 3)))]
    n_gates = draw(st.integers(1, 3))
    gates = [names.new() for _ in range(n_gates)]
    vectors = [f"{s}_prev" for s in states]
    lines = []
    for g in gates:
        lines.append(f'{g} = "{draw(expression(params, vectors, states, depth=2))}"')
        vectors = vectors + [g]
    updates, done = [], []
    for s in states:
        e = draw(expression(params, vectors + done, states, depth=2, new=done))
        # the update reads its own past, so every state is recurrent, and stays bounded
        gate = None if draw(st.booleans()) else draw(st.sampled_from(gates))
        updates.append((s, e, gate))
        done.append(s)
    # every gate must be used (an unused intermediate is an error): add the unused ones to the first update
    text_so_far = " ".join(lines) + " ".join(f"{e} {g}" for _, e, g in updates)
    unused = [g for g in gates if not re.search(rf"\b{g}\b", text_so_far.split(f'{g} = "', 1)[1])]
    for s, e, gate in updates:
        if unused:
            e, unused = " + ".join([e, *unused]), []
        if gate is None:
            update = f"tanh({e} + {params.new('u', ['n_hidden'])} * {s}_prev)"
        else:
            update = f"sigmoid({gate}) * {s}_prev + (1 - sigmoid({gate})) * tanh({e} + {params.new('b', ['n_hidden'])})"
        lines.append(f'{s} = "{update}"')
    lines_ro = []
    if draw(st.booleans()):
        y = names.new()
        # a readout multiplies states (and gates) by matrices, some of which the step also multiplies
        read = draw(st.lists(st.sampled_from(states + gates), min_size=1, max_size=2, unique=True))
        terms = [f"{params.new('V', ['n_out', 'n_hidden'])} @ {v}" for v in read]
        readout = " + ".join(terms)
        if draw(st.booleans()):
            readout = f"tanh({readout} + {params.new('c', ['n_out'])})"
        lines_ro = ["[readout]", f'{y} = "{readout}"', "[loss]", f'expr = "({y} - target)**2 / 2"', f'target_of = "{y}"',
                    f'reduction = "{draw(st.sampled_from(["sum", "mean"]))}"']
        if draw(st.integers(0, 3)) == 0:  # a log-softmax readout and the cross-entropy loss
            logp = names.new()
            lines_ro[2:5] = [f'{logp} = "{y} - logsumexp({y})"', "[loss]", 'expr = "-target * ' + logp + '"',
                             f'target_of = "{logp}"']
        if draw(st.integers(0, 2)) == 0:  # a second readout reducing a value of the loop (a state, a gate)
            v, w = (draw(st.sampled_from(states + gates)) for _ in range(2))
            lines_ro.insert(2, f'{names.new()} = "{v} * ({reduction(draw, params, w)})"')
    decls = [f"{k} = {v!r}".replace("'", '"') for k, v in params.shapes.items()]
    return "\n".join([
        '[cell]', 'name = "random_cell"', '[inputs]', 'x = "n_in"', '[states]',
        *[f'{s} = "n_hidden"' for s in states], '[params]', *decls, '[equations]', *lines, *lines_ro, "",
    ])


# no shrinking: a failure reports the drawn cell as it is, in seconds rather than minutes
@settings(max_examples=150, deadline=None, derandomize=True, phases=(Phase.explicit, Phase.reuse, Phase.generate),
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(spec_text(), st.sampled_from([(2, 3, 2), (3, 3, 3), (2, 2, 3)]))
def test_random_cells_pass_finite_differences_and_rtrl_equals_bptt(text, sizes):
    n_in, n_hidden, n_out = sizes  # all three equal: a wrong matrix or buffer gives wrong numbers, not a shape error
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
    problem = random_problem(module, seed=3, T=4, B=2, n_in=n_in, n_hidden=n_hidden, n_out=n_out)
    seeds = {k: v.copy() for k, v in problem.grad_outputs.items()}
    bad = fd_failures(module, problem)
    assert not bad, f"{bad}\n{text}"
    bad = [(r.name, r.error) for r in rtrl_vs_bptt(module, problem) if not r.error < 1e-10]
    assert not bad, f"{bad}\n{text}"
    assert all(np.array_equal(seeds[k], problem.grad_outputs[k]) for k in seeds), f"backward wrote into grad_outputs\n{text}"
    if hasattr(module, "loss_and_grads"):
        bad = fd_failures(module, problem, loss=True)
        assert not bad, f"{bad}\n{text}"


def fd_failures(module, problem, loss: bool = False) -> list[tuple[str, float]]:
    """Quantities whose gradient misses central differences (1e-6 relative, above the
    differences' rounding floor: symrnn.gradcheck.fd_error)."""
    return [(r.name, r.error) for r in finite_differences(module, problem, loss=loss) if not r.error < 1e-6]
