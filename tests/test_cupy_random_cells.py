"""Random cells (tests/test_spec_random_cells.py's grammar) through the CuPy backend on
the host: the generated CUDA, compiled for the CPU (tests/host_cupy.py), against the
NumPy module, in float64, forward outputs and every gradient.  A cell the CuPy backend
does not support is refused with a CellError (one line, naming the NumPy backend)."""

from __future__ import annotations

import sys
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, assume, example, given, settings
from hypothesis import strategies as st

from cupy_support import LENGTHS, TOL, lengths_for
from host_cupy import host_cupy
from test_spec_random_cells import spec_text
from symrnn.errors import CellError, UserError
from symrnn.gradcheck import random_problem, rel_error
from symrnn.pipeline import build, load_module, render_cupy, render_numpy
from symrnn.spec import SpecWarning, parse_spec


#: scalar parameters added beside a product the readout also reads (t0 = G @ h_prev, y = cp @ t0):
#: their gradient is the sum of the step's adjoint, not of the product's buffer, which also
#: holds the readout's adjoint (found by the grammar's draws of issue 15)
SCALAR_BESIDE_A_READ_PRODUCT = """\
[cell]
name = "random_cell"
[inputs]
x = "n_in"
[states]
threadIdx = "n_hidden"
[params]
G = ["n_hidden", "n_hidden"]
auto = ["n_hidden", "n_in"]
d_x = ["n_hidden"]
common = []
float = []
h_seq = ["n_hidden"]
cp = ["n_out", "n_hidden"]
unit_ = ["n_out"]
[equations]
t0 = "G @ threadIdx_prev"
threadIdx = "tanh(3 * sigmoid(auto @ x) * sigmoid(d_x) + (common) + (float) + t0 + h_seq * threadIdx_prev)"
[readout]
sum = "tanh(cp @ t0 + unit_)"
[loss]
expr = "(sum - target)**2 / 2"
target_of = "sum"
reduction = "sum"
"""


@pytest.fixture(scope="module")
def host_xp(tmp_path_factory):
    return host_cupy(tmp_path_factory.mktemp("random_kernels"))


#: a drawn cell whose input-side product (common_x) has the adjoint of a recurrent product
#: consumed a stage after its GEMM's (common_d_h_next_prev): the input side reads that
#: GEMM's adjoint buffer (symrnn.schedule), which the later stage's kernel fills
CROSS_STAGE_SHARE = """\
[cell]
name = "random_cell"
[inputs]
x = "n_in"
[states]
cp = "n_hidden"
d_h_next = "n_hidden"
d_h = "n_hidden"
[params]
o_t = ["n_hidden", "n_hidden"]
common = ["n_hidden", "n_hidden + n_in"]
d_x = ["n_hidden"]
h_seq = ["n_hidden"]
W_T = ["n_hidden"]
[equations]
W_stack_x = "cp_prev"
sum = "(d_h_prev) + ((o_t @ (W_stack_x * d_h_next_prev)) - (common @ (d_h_next_prev, x)))"
cp = "sigmoid(sum) * cp_prev + (1 - sigmoid(sum)) * tanh(sum + d_x)"
d_h_next = "sigmoid(W_stack_x) * d_h_next_prev + (1 - sigmoid(W_stack_x)) * tanh(sum + h_seq)"
d_h = "sigmoid(W_stack_x) * d_h_prev + (1 - sigmoid(W_stack_x)) * tanh(d_h_next + W_T)"
"""


#: a scalar parameter added to one of two stacked products (W @ h_prev beside V @ h_prev):
#: its gradient sums its columns of the stacked adjoint buffer, not the whole buffer
SCALAR_BESIDE_A_STACK = """\
[cell]
name = "random_cell"
[inputs]
x = "n_in"
[states]
h = "n_hidden"
[params]
W = ["n_hidden", "n_hidden"]
V = ["n_hidden", "n_hidden"]
U = ["n_hidden", "n_in"]
c = []
b = ["n_hidden"]
[equations]
g = "sigmoid(V @ h_prev + b)"
h = "g * tanh(W @ h_prev + U @ x + c) + (1 - g) * h_prev"
"""


@settings(max_examples=60, deadline=None, derandomize=True, phases=(Phase.explicit, Phase.generate),
          suppress_health_check=list(HealthCheck))
@given(text=spec_text(), sizes=st.sampled_from([(2, 3, 2), (3, 3, 3), (2, 2, 3)]))
@example(text=CROSS_STAGE_SHARE, sizes=(3, 3, 3))
@example(text=SCALAR_BESIDE_A_STACK, sizes=(2, 3, 2))
@example(text=SCALAR_BESIDE_A_READ_PRODUCT, sizes=(2, 3, 2))
def test_random_cells_on_the_cupy_backend_match_numpy(host_xp, text, sizes):
    n_in, n_hidden, n_out = sizes
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SpecWarning)
        try:
            cell = parse_spec(text, "random_cell.toml")
        except UserError:
            assume(False)
    plan = build(cell)
    try:
        source = render_cupy(plan)
    except CellError as exc:
        assert "NumPy backend" in str(exc) and "\n" not in str(exc), str(exc)
        assume(False)
    ref = load_module(render_numpy(plan), "random_cell")
    pr = random_problem(ref, T=4, B=2, seed=5, n_in=n_in, n_hidden=n_hidden, n_out=n_out)
    grad_final = {k: 0.5 * v for k, v in pr.state0.items()}
    saved = sys.modules.get("cupy")
    sys.modules["cupy"] = host_xp  # the module imports cupy when it runs
    try:
        cu = load_module(source, "random_cell_cupy")
        for steps in LENGTHS:  # without lengths; with lengths 0, 1, T, unsorted; reversed
            lengths, reverse = lengths_for(steps, 4, 2)
            out_ref, cache_ref = ref.forward(pr.params, pr.x, pr.state0, lengths, reverse)
            grads_ref = ref.backward(pr.params, cache_ref, pr.grad_outputs, grad_final)
            out, cache = cu.forward(pr.params, pr.x, pr.state0, lengths, reverse)
            grads = cu.backward(pr.params, cache, pr.grad_outputs, grad_final)
            final_ref, final = ref.final_states(cache_ref), cu.final_states(cache)
            errors = {k: rel_error(np.asarray(out[k]), out_ref[k]) for k in out_ref}
            errors |= {"d_" + k: rel_error(np.asarray(grads[k]), grads_ref[k]) for k in grads_ref}
            errors |= {"final_" + k: rel_error(np.asarray(final[k]), final_ref[k]) for k in final_ref}
            bad = {k: e for k, e in errors.items() if not e <= TOL[np.float64]}
            assert not bad, f"{steps}: {bad}\n{text}"
    finally:
        if saved is None:
            sys.modules.pop("cupy")
        else:
            sys.modules["cupy"] = saved
