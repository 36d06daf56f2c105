"""Cells of the literature in the syntax of issue 15 (functions, transposes, combinations of
matrices before @, powers with an expression as exponent, a nonlinearity of a scalar): each
against an independent torch-autograd implementation written from its paper (float64,
1e-10: every output and every gradient), finite differences and BPTT = RTRL
(symrnn.gradcheck), and the CuPy module's CUDA compiled for the host.

The built-in spec cells (symrnn/specs/antisymmetric_rnn.toml, rg_lru.toml) are checked here
against their papers; the tests over every built-in cell (test_gradients, test_cupy_backend,
test_generated) cover them too.  The other cells are written as someone else would write
them from their papers: the Lipschitz RNN, the LRU in its phase parametrisation (sin, cos),
a leak sigmoid(a) of a scalar a, a product with the transpose of a non-square matrix."""

from __future__ import annotations

import sys
import warnings

import numpy as np
import pytest
import torch

import cupy_support
from host_cupy import host_cupy
import sympy

from symrnn import I, Cell, matvec, params, tanh
from symrnn.cells import builtin
from symrnn.gradcheck import check_module, random_problem, rel_error, report
from symrnn.ir import MatVecNode
from symrnn.pipeline import build, load_module, module_name, render_cupy, render_numpy
from symrnn.render import render_numba
from symrnn.spec import SpecError, SpecWarning, parse_spec

#: Erichson et al. 2021, "Lipschitz Recurrent Neural Networks" (ICLR 2021), eqs. (2), (4):
#: h_t = h_{t-1} + eps (A_beta h_{t-1} + tanh(W_beta h_{t-1} + U x_t + b)), with
#: A_beta = (1 - beta)(M_A + M_A^T) + beta (M_A - M_A^T) - gamma_A I and W_beta likewise
LIPSCHITZ = """\
[cell]
name = "lipschitz_rnn"
source = "Erichson et al. 2021"

[inputs]
x = "n_in"

[states]
h = "n_hidden"

[params]
M_A = ["n_hidden", "n_hidden"]
M_W = ["n_hidden", "n_hidden"]
U = ["n_hidden", "n_in"]
b = ["n_hidden"]

[constants]
eps = 0.2
beta = 0.75
gamma_A = 0.01
gamma_W = 0.01

[equations]
A_h = "((1 - beta) * (M_A + M_A.T) + beta * (M_A - M_A.T) - gamma_A * I) @ h_prev"
z = "((1 - beta) * (M_W + M_W.T) + beta * (M_W - M_W.T) - gamma_W * I) @ h_prev + U @ x + b"
h = "h_prev + eps * (A_h + tanh(z))"
"""

#: Orvieto et al. 2023, "Resurrecting Recurrent Neural Networks for Long Sequences" (ICML 2023):
#: lambda = exp(-exp(nu_log) + i exp(theta_log)), gamma = sqrt(1 - |lambda|^2),
#: h_t = lambda h_{t-1} + gamma (B x_t) (complex), y_t = Re(C h_t) + D x_t; here in real and
#: imaginary parts, the phase through cos and sin
LRU_PHASE = """\
[cell]
name = "lru_phase"
source = "Orvieto et al. 2023"

[inputs]
x = "n_in"

[states]
h_re = "n_hidden"
h_im = "n_hidden"

[params]
nu_log = { shape = ["n_hidden"], init = "uniform(-4.0, -1.0)" }
theta_log = { shape = ["n_hidden"], init = "uniform(-2.0, 1.0)" }
B_re = ["n_hidden", "n_in"]
B_im = ["n_hidden", "n_in"]
C_re = ["n_out", "n_hidden"]
C_im = ["n_out", "n_hidden"]
D = ["n_out", "n_in"]

[equations]
mod = "exp(-exp(nu_log))"
lam_re = "mod * cos(exp(theta_log))"
lam_im = "mod * sin(exp(theta_log))"
g = "sqrt(1 - mod**2)"
h_re = "lam_re * h_re_prev - lam_im * h_im_prev + g * (B_re @ x)"
h_im = "lam_re * h_im_prev + lam_im * h_re_prev + g * (B_im @ x)"

[readout]
y = "C_re @ h_re - C_im @ h_im + D @ x"
"""

#: a leak kept in (0, 1) by a sigmoid of one scalar, and a product with the transpose of a
#: non-square matrix (P is n_in x n_hidden, so P.T @ x has n_hidden entries)
LEAK_AND_TRANSPOSE = """\
[cell]
name = "leak_transpose"

[inputs]
x = "n_in"

[states]
h = "n_hidden"

[params]
a = []
P = ["n_in", "n_hidden"]
U = ["n_hidden", "n_hidden"]
Q = ["n_hidden", "n_hidden"]
b = ["n_hidden"]

[equations]
u = "tanh(P.T @ x + U @ h_prev + b)"
h = "sigmoid(a) * h_prev + (1 - sigmoid(a)) * log(1 + u**2) + 0.5 * Q.T @ (h_prev * u)"
"""


def module_of(cell):
    cell = parse_spec(cell, f"{cell.split(chr(34))[1]}.toml") if isinstance(cell, str) else cell
    return load_module(render_numpy(build(cell)), module_name(cell.name))


# -- the torch oracles, written from the papers ------------------------------------------------
def antisymmetric_step(p, x, prev, eps=0.1, gamma=0.01):
    W = p["W"]
    A = W - W.T - gamma * torch.eye(W.shape[0], dtype=W.dtype)
    return {"h": prev["h"] + eps * torch.tanh(prev["h"] @ A.T + x @ p["V"].T + p["b"])}


def rg_lru_step(p, x, prev, c=8.0):
    r = torch.sigmoid(x @ p["W_a"].T + p["b_a"])
    i = torch.sigmoid(x @ p["W_x"].T + p["b_x"])
    a_t = torch.sigmoid(p["Lambda"]) ** (c * r)  # the paper's power form
    return {"h": a_t * prev["h"] + torch.sqrt(1 - a_t**2) * (i * x)}


def lipschitz_step(p, x, prev, eps=0.2, beta=0.75, gamma_A=0.01, gamma_W=0.01):
    eye = torch.eye(p["M_A"].shape[0], dtype=x.dtype)

    def a_beta(M, gamma):
        return (1 - beta) * (M + M.T) + beta * (M - M.T) - gamma * eye

    h = prev["h"]
    z = h @ a_beta(p["M_W"], gamma_W).T + x @ p["U"].T + p["b"]
    return {"h": h + eps * (h @ a_beta(p["M_A"], gamma_A).T + torch.tanh(z))}


def lru_step(p, x, prev):
    """In complex arithmetic, as the paper writes it."""
    lam = torch.exp(-torch.exp(p["nu_log"]) + 1j * torch.exp(p["theta_log"]))
    gamma = torch.sqrt(1 - torch.abs(lam) ** 2)
    B = torch.complex(p["B_re"], p["B_im"])
    C = torch.complex(p["C_re"], p["C_im"])
    h = lam * torch.complex(prev["h_re"], prev["h_im"]) + gamma * (x.to(B.dtype) @ B.T)
    return {"h_re": h.real, "h_im": h.imag, "y": (h @ C.T).real + x @ p["D"].T}


def leak_transpose_step(p, x, prev):
    h = prev["h"]
    u = torch.tanh(x @ p["P"] + h @ p["U"].T + p["b"])
    s = torch.sigmoid(p["a"])
    return {"h": s * h + (1 - s) * torch.log(1 + u**2) + 0.5 * (h * u) @ p["Q"]}


def torch_oracle(step, module, problem):
    """Outputs of the torch step over the sequence, and the gradients of
    L = sum over outputs of <cotangent, output>, by autograd (float64)."""
    leaf = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in problem.params.items()}
    x = torch.tensor(problem.x, dtype=torch.float64, requires_grad=True)
    state0 = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in problem.state0.items()}
    prev, seq = dict(state0), {k: [] for k in module.OUTPUTS}
    for t in range(x.shape[0]):
        new = step(leaf, x[t], prev)
        for k in module.OUTPUTS:
            seq[k].append(new[k])
        prev = {s: new[s] for s in module.STATES}
    outputs = {k: torch.stack(v) for k, v in seq.items()}
    loss = sum((outputs[k] * torch.tensor(g)).sum() for k, g in problem.grad_outputs.items())
    loss.backward()
    grads = {k: v.grad for k, v in leaf.items()} | {"x": x.grad} | {f"{s}0": v.grad for s, v in state0.items()}
    return {k: v.detach().numpy() for k, v in outputs.items()}, {k: v.numpy() for k, v in grads.items()}


CELLS = {
    "antisymmetric_rnn": (lambda: builtin("antisymmetric_rnn"), antisymmetric_step),
    "rg_lru": (lambda: builtin("rg_lru"), rg_lru_step),
    "lipschitz_rnn": (lambda: LIPSCHITZ, lipschitz_step),
    "lru_phase": (lambda: LRU_PHASE, lru_step),
    "leak_transpose": (lambda: LEAK_AND_TRANSPOSE, leak_transpose_step),
}


@pytest.mark.parametrize("name", sorted(CELLS))
def test_the_cell_matches_its_papers_torch_autograd(name):
    cell, step = CELLS[name]
    module = module_of(cell())
    for seed in (0, 1):
        problem = random_problem(module, T=7, B=3, seed=seed)
        outputs, cache = module.forward(problem.params, problem.x, problem.state0)
        grads = module.backward(problem.params, cache, problem.grad_outputs)
        want_outputs, want_grads = torch_oracle(step, module, problem)
        assert set(grads) == set(want_grads)
        for k, v in want_outputs.items():
            assert rel_error(outputs[k], v) < 1e-10, (name, k)
        for k, v in want_grads.items():
            assert np.abs(v).max() > 0, (name, k)  # every gradient is exercised
            assert rel_error(grads[k], v) < 1e-10, (name, k, rel_error(grads[k], v))


@pytest.mark.parametrize("name", sorted(CELLS))
def test_the_cell_passes_finite_differences_and_bptt_equals_rtrl(name):
    results = check_module(module_of(CELLS[name][0]()), seed=3)
    assert results and all(r.ok for r in results), report(name, results)
    assert {r.check for r in results} >= {"FD", "RTRL"}


@pytest.fixture(scope="module")
def host_xp(tmp_path_factory):
    return host_cupy(tmp_path_factory.mktemp("literature_kernels"))


@pytest.mark.parametrize("name", sorted(CELLS))
def test_the_cupy_module_compiled_for_the_host_matches_numpy(host_xp, name):
    cell = CELLS[name][0]()
    cell = parse_spec(cell, "cell.toml") if isinstance(cell, str) else cell
    plan = build(cell)
    ref = load_module(render_numpy(plan), module_name(cell.name))
    saved = sys.modules.get("cupy")
    sys.modules["cupy"] = host_xp
    try:
        cu = load_module(render_cupy(plan), module_name(cell.name, "cupy"))
        for dtype, tol in ((np.float64, 1e-10), (np.float32, 1e-4)):
            pr = random_problem(ref, T=5, B=3, seed=0, dtype=dtype)
            out_ref, cache_ref = ref.forward(pr.params, pr.x, pr.state0)
            grads_ref = ref.backward(pr.params, cache_ref, pr.grad_outputs)
            to = host_xp.asarray
            params = {k: to(v) for k, v in pr.params.items()}
            out, cache = cu.forward(params, to(pr.x), {k: to(v) for k, v in pr.state0.items()})
            grads = cu.backward(params, cache, {k: to(v) for k, v in pr.grad_outputs.items()})
            host = getattr(host_xp, "asnumpy", np.asarray)
            for k in out_ref:
                assert out[k].dtype == dtype and rel_error(host(out[k]), out_ref[k]) < tol, (name, k)
            for k in grads_ref:
                assert grads[k].dtype == dtype and rel_error(host(grads[k]), grads_ref[k]) < tol, (name, k)
    finally:
        if saved is None:
            sys.modules.pop("cupy", None)
        else:
            sys.modules["cupy"] = saved


# -- the syntax: what it reads, what it refuses ---------------------------------------------
def test_the_combination_gives_w_both_contributions():
    """(W - W.T) @ h is one product with M = W - W^T, formed once per call; dW gets both
    contributions of dM = sum_t delta h^T: dW += dM, dW -= dM^T."""
    module = module_of(builtin("antisymmetric_rnn"))
    source = render_numpy(build("antisymmetric_rnn"))
    assert "M_z = W - W.T" in source and "W_T_h_prev" not in source
    assert "np.dot(h_prev, M_z_T, out=h_prev_proj)" in source  # one (B, n) @ (n, n) product per step
    assert "d_W += dW_stack[:n_hidden]\n" in source and "d_W -= dW_stack[:n_hidden].T\n" in source
    problem = random_problem(module, seed=4)
    results = check_module(module, seed=4)
    assert all(r.ok for r in results if r.name == "W"), report("antisymmetric_rnn", results)
    assert problem.params["W"].shape == (4, 4)


@pytest.mark.parametrize("change, message", [
    (('"tanh(P.T @ x', '"tanh(b * P.T @ x'), "'b' is not a scalar, so it cannot scale a matrix; write b * (P.T @ x)"),
    (('Q.T @ (h_prev * u)', '(Q - P) @ (h_prev * u)'), "P has n_in rows, but the other matrices of the combination have n_hidden"),
    (('Q.T @ (h_prev * u)', '(Q + I) @ (h_prev, u)'), "a combination of matrices multiplies one vector"),
    (('Q.T @ (h_prev * u)', 'b.T @ u'), "only a matrix parameter has a transpose ('b' is not one)"),
    (('Q.T @ (h_prev * u)', 'Q.T * u'), "a transpose can only multiply a vector"),
    (('Q.T @ (h_prev * u)', 'I * u'), "I is the identity matrix"),
    (('Q.T @ (h_prev * u)', '(Q - Q) @ u'), "the combination of matrices is 0"),
    (('Q.T @ (h_prev * u)', '(Q * Q) @ u'), "a product of two matrices is not allowed; write M @ (N @ v)"),
])
def test_bad_matrix_expressions_are_one_line_naming_the_line(change, message):
    text = LEAK_AND_TRANSPOSE.replace(*change)
    with pytest.raises(SpecError) as info:
        parse_spec(text, "cell.toml")
    line = next(n for n, row in enumerate(text.splitlines(), 1) if change[1][:8] in row)
    assert str(info.value).startswith(f"cell.toml:{line}") and message in str(info.value), str(info.value)
    assert "\n" not in str(info.value)


def test_a_product_then_a_vector_factor_warns_of_the_reading():
    """W @ x * v is (W @ x) * v, as in Python: a warning naming both readings where v is a
    vector (it is not W @ (x * v)); none for a scalar factor or with parentheses."""
    text = LEAK_AND_TRANSPOSE.replace("0.5 * Q.T @ (h_prev * u)", "Q.T @ h_prev * u")
    with pytest.warns(SpecWarning) as caught:
        cell = parse_spec(text, "cell.toml")
    message = next(str(w.message) for w in caught if "equal precedence" in str(w.message))
    line = next(n for n, row in enumerate(text.splitlines(), 1) if "Q.T @ h_prev * u" in row)
    assert message.startswith(f"cell.toml:{line}:") and "(Q.T @ h_prev) * u" in message and "Q.T @ (h_prev * u)" in message
    assert "\n" not in message
    # the reading is Python's: (Q.T @ h_prev) * u
    same = parse_spec(LEAK_AND_TRANSPOSE.replace("0.5 * Q.T @ (h_prev * u)", "(Q.T @ h_prev) * u"), "cell.toml")
    assert cell.equations["h"] == same.equations["h"]
    for quiet in ("(Q.T @ h_prev) * u", "Q.T @ (h_prev * u)", "Q.T @ h_prev * 0.5", "Q.T @ h_prev * a"):
        with warnings.catch_warnings():
            warnings.simplefilter("error", SpecWarning)
            parse_spec(LEAK_AND_TRANSPOSE.replace("0.5 * Q.T @ (h_prev * u)", quiet), "cell.toml")


def test_a_power_with_an_expression_exponent_is_exp_of_log():
    graph = build(builtin("rg_lru")).graph
    ops = {type(n.expr).__name__ for n in graph.nodes if getattr(n, "op", None) is not None}
    assert {"log", "exp", "sqrt", "sigmoid"} <= ops


def antisymmetric_from_python() -> Cell:
    """The AntisymmetricRNN in the Python API: W.T, and matvec for the combination with I."""
    x, h_prev = sympy.symbols("x h_prev")
    W, V, b = params("W V b")
    return Cell(name="antisymmetric_py", inputs={"x": "n_in"}, states={"h": "n_hidden"},
                params={"W": ("n_hidden", "n_hidden"), "V": ("n_hidden", "n_in"), "b": ("n_hidden",)},
                equations={"h": h_prev + sympy.Float(0.1) * tanh(matvec(W - W.T - sympy.Float(0.01) * I, h_prev)
                                                               + V @ x + b)})


def test_the_python_api_writes_transposes_and_combinations():
    module = module_of(antisymmetric_from_python())
    problem = random_problem(module, T=5, B=2, seed=6)
    outputs, cache = module.forward(problem.params, problem.x, problem.state0)
    grads = module.backward(problem.params, cache, problem.grad_outputs)
    want_outputs, want_grads = torch_oracle(antisymmetric_step, module, problem)
    assert rel_error(outputs["h"], want_outputs["h"]) < 1e-10
    assert all(rel_error(grads[k], v) < 1e-10 for k, v in want_grads.items())
    W, = params("W")
    assert sympy.sstr(W.T @ sympy.Symbol("h")) == "W.T @ h" and sympy.latex(W.T @ sympy.Symbol("h")) == r"W^{\top} h"
    with pytest.raises(TypeError, match="not a string"):
        matvec("W - W.T", sympy.Symbol("h"))


# -- readouts of values of the input alone (the LRU's D x) in the kernel backends ---------------
def _readout_cell(name: str, params: str, equations: str, readout: str) -> str:
    return (f'[cell]\nname = "{name}"\n\n[inputs]\nx = "n_in"\n\n[states]\nh = "n_hidden"\n\n'
            f"[params]\n{params}\n\n[equations]\n{equations}\n\n[readout]\n{readout}\n")


#: a readout reading a value computed from the input alone, each way its adjoint can reach the
#: input side: the product's slot written by the readout alone (LRU), added to what the loop
#: wrote (a product read by both), the sum of two readout stages' parts, a pointwise value and a
#: reduction of the input (no GEMM in the recurrence: one kernel over time)
READS_THE_INPUT = {
    "lru_phase": LRU_PHASE,
    "skip_elementwise": _readout_cell(
        "skip_elementwise", 'W = ["n_hidden", "n_in"]\nU = ["n_hidden", "n_hidden"]\nV = ["n_in", "n_hidden"]\nD = ["n_in"]',
        'h = "tanh(W @ x + U @ h_prev)"', 'y = "V @ h + D * x"'),
    "shared_product": _readout_cell(
        "shared_product", 'W = ["n_hidden", "n_in"]\nU = ["n_hidden", "n_hidden"]\nV = ["n_hidden", "n_hidden"]',
        'u = "W @ x"\nh = "tanh(u + U @ h_prev)"', 'y = "V @ h + u"'),
    "two_readout_stages": _readout_cell(
        "two_readout_stages", 'W = ["n_hidden", "n_in"]\nU = ["n_hidden", "n_hidden"]\nC = ["n_out", "n_hidden"]\n'
        'V = ["n_out", "n_out"]\nD = ["n_out", "n_in"]\nb = ["n_hidden"]',
        'v = "tanh(W @ x + b)"\ns = "D @ x"\nh = "v * tanh(U @ h_prev) + v"', 'q = "tanh(C @ (h * v) + s)"\ny = "V @ q + s"'),
    "input_mean": _readout_cell(
        "input_mean", 'a = ["n_hidden"]\nW = ["n_hidden", "n_in"]\nV = ["n_in", "n_hidden"]',
        'h = "tanh(a * h_prev + W @ x)"', 'y = "V @ h + mean(x) + x"'),
}

#: a readout reducing a value of the loop (a state, a gate): its adjoint's sum over units is
#: computed for every step at once after the readout and read by the loop's step t (one value
#: per row of that step, not of step 0)
READS_THE_LOOP = {
    "state_mean": _readout_cell(
        "state_mean", 'W = ["n_hidden", "n_in"]\nU = ["n_hidden", "n_hidden"]\ng = ["n_hidden"]',
        'a = "W @ x + U @ h_prev"\nh = "tanh(g * a / sqrt(mean(a**2) + 1e-6))"', 'y = "sum(h) / 4"'),
    "gate_sum": _readout_cell(
        "gate_sum", 'W = ["n_hidden", "n_in"]\nU = ["n_hidden", "n_hidden"]\nV = ["n_hidden", "n_hidden"]\nb = ["n_hidden"]',
        'z = "sigmoid(W @ x + b)"\nh = "z * tanh(U @ h_prev) + (1 - z) * h_prev"',
        'y = "tanh(V @ h) * sum(z) + h * mean(h)"'),
}


#: a product of another width than the values of its stage (a readout that is a bare product,
#: ``V @ h``: n_out wide, beside a readout of the hidden width; ``C @ m`` of a reduction m of the
#: input beside ``E @ g``): its adjoint is written beside the stage's kernel, whose threads are
#: the stage's values' units (inside it, n_out > n_hidden left units of the product's adjoint
#: unwritten: wrong gradients; n_out < n_hidden wrote past its rows); and a product of a product
#: stacked with others (``E @ g``, g = L @ x beside P.T @ x: its columns of their buffer); the
#: adjoint of a product beside values of another width that a reduction's partial multiplies
#: (``logsumexp(V @ a)``); a product in the loop beside values of another width (U @ h_prev beside
#: a = tanh(V @ h_prev)); two readouts of two widths (refused before: one kernel per stage)
WIDER_THAN_THE_STAGE = {
    "input_mean": READS_THE_INPUT["input_mean"],
    "readout_of_the_input_side": _readout_cell(
        "readout_of_the_input_side", 'P = ["n_in", "n_hidden"]\nO = ["n_hidden", "n_in"]\nL = ["n_hidden", "n_in"]\n'
        'd = ["n_hidden"]\nC = ["n_out", "n_hidden"]\nE = ["n_out", "n_hidden"]',
        'a = "P.T @ x"\nm = "logsumexp(O @ x)"\ng = "L @ x"\nh = "tanh(g + a + m + d * h_prev)"', 'y = "C @ m + E @ g"'),
    "a_bottleneck_in_the_loop": _readout_cell(  # U @ h_prev (n_hidden) in the stage of a = tanh(V @ h_prev) (n_out)
        "a_bottleneck_in_the_loop", 'W = ["n_hidden", "n_in"]\nU = ["n_hidden", "n_hidden"]\nV = ["n_out", "n_hidden"]\n'
        'C = ["n_hidden", "n_out"]', 'a = "tanh(V @ h_prev)"\nh = "tanh(W @ x + U @ h_prev + C @ a)"', 'y = "h"'),
    "two_readouts_of_two_widths": _readout_cell(  # two stages after the loop, one per width (plan._by_width)
        "two_readouts_of_two_widths", 'W = ["n_hidden", "n_in"]\nU = ["n_hidden", "n_hidden"]\nV = ["n_out", "n_hidden"]\n'
        's = ["n_hidden"]', 'h = "tanh(W @ x + U @ h_prev)"', 'y = "tanh(V @ h)"\nz = "h * s * mean(h)"'),
    "a_reduction_of_a_product_of_parameters": _readout_cell(
        "a_reduction_of_a_product_of_parameters", 'W = ["n_hidden", "n_in"]\nU = ["n_hidden", "n_hidden"]\na = ["n_hidden"]\n'
        'G = ["n_hidden", "n_hidden"]\nV = ["n_out", "n_hidden"]',
        'q = "log(1 + (G @ a)**2)"\nh = "tanh(W @ x + U @ h_prev + q)"', 'z = "V @ a"\ny = "z - logsumexp(z)"'),
    "product_beside_a_scaled_state": _readout_cell(
        "product_beside_a_scaled_state", 'W = ["n_hidden", "n_in"]\nU = ["n_hidden", "n_hidden"]\nV = ["n_out", "n_hidden"]',
        'h = "tanh(W @ x + U @ h_prev)"', 'y = "V @ h"\nz = "h * (sum(h) / 3)"'),
    "two_products_of_two_widths": _readout_cell(
        "two_products_of_two_widths", 'W = ["n_hidden", "n_in"]\nU = ["n_hidden", "n_hidden"]\nV = ["n_out", "n_hidden"]\n'
        'C = ["n_hidden", "n_hidden"]', 'h = "tanh(W @ x + U @ h_prev)"', 'y = "V @ h"\nu = "tanh(C @ h)"'),
}


def _errors(ref, mod, xp, dtype, steps, **sizes):
    """Every output, final state and gradient of ``mod`` (arrays through ``xp``) against ``ref``."""
    lengths, reverse = cupy_support.lengths_for(steps, 5, 3)
    kw = {} if lengths is None and not reverse else {"lengths": lengths, "reverse": reverse}
    pr = random_problem(ref, T=5, B=3, seed=0, dtype=dtype, **sizes)
    rng = np.random.default_rng(1)
    final = {k: rng.standard_normal(v.shape).astype(dtype) for k, v in pr.state0.items()} if kw else None
    out_ref, cache_ref = ref.forward(pr.params, pr.x, pr.state0, **kw)
    grads_ref = ref.backward(pr.params, cache_ref, pr.grad_outputs, final)
    to, host = xp.asarray, getattr(xp, "asnumpy", np.asarray)
    params = {k: to(v) for k, v in pr.params.items()}
    out, cache = mod.forward(params, to(pr.x), {k: to(v) for k, v in pr.state0.items()}, **kw)
    grads = mod.backward(params, cache, {k: to(v) for k, v in pr.grad_outputs.items()},
                         None if final is None else {k: to(v) for k, v in final.items()})
    assert set(out) == set(out_ref) and set(grads) == set(grads_ref)
    errors = {k: rel_error(host(out[k]), v) for k, v in out_ref.items()}
    if kw:
        errors |= {"final_" + k: rel_error(host(v), ref.final_states(cache_ref)[k]) for k, v in mod.final_states(cache).items()}
    return errors | {"d_" + k: rel_error(host(grads[k]), v) for k, v in grads_ref.items()}


@pytest.mark.parametrize("name", sorted(READS_THE_INPUT) + sorted(READS_THE_LOOP))
def test_a_readout_of_the_input_side_or_a_reduction_of_the_loop_in_the_cupy_and_numba_modules(host_xp, monkeypatch, name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SpecWarning)
        cell = parse_spec({**READS_THE_INPUT, **READS_THE_LOOP}[name], f"{name}.toml")
    plan = build(cell)
    ref = load_module(render_numpy(plan), module_name(cell.name))
    assert all(r.ok for r in check_module(ref, seed=3))  # the reference itself, by finite differences
    monkeypatch.setitem(sys.modules, "cupy", host_xp)
    cu = load_module(render_cupy(plan), module_name(cell.name, "cupy"))
    nb = load_module(render_numba(plan), module_name(cell.name, "numba"))
    for mod, xp in ((cu, host_xp), (nb, np)):
        for steps in cupy_support.LENGTHS:
            for dtype, tol in ((np.float64, 1e-10), (np.float32, 1e-4)):
                errors = _errors(ref, mod, xp, dtype, steps)
                assert max(errors.values()) < tol, (name, mod.__name__, steps, dtype, errors)


@pytest.mark.parametrize("sizes", [(2, 2, 5), (2, 4, 3), (5, 2, 3)], ids=["n_out>n_hidden", "n_out<n_hidden", "n_in>n_hidden"])
@pytest.mark.parametrize("name", sorted(WIDER_THAN_THE_STAGE))
def test_a_readout_product_of_another_width_than_its_stage_in_the_cupy_and_numba_modules(host_xp, monkeypatch, name, sizes):
    cell = parse_spec(WIDER_THAN_THE_STAGE[name], f"{name}.toml")
    plan = build(cell)
    ref = load_module(render_numpy(plan), module_name(cell.name))
    n_in, n_hidden, n_out = sizes
    assert all(r.ok for r in check_module(ref, seed=3, n_in=n_in, n_hidden=n_hidden, n_out=n_out))  # the reference, by FD
    monkeypatch.setitem(sys.modules, "cupy", host_xp)
    cu = load_module(render_cupy(plan), module_name(cell.name, "cupy"))
    nb = load_module(render_numba(plan), module_name(cell.name, "numba"))
    for mod, xp in ((cu, host_xp), (nb, np)):
        for steps in cupy_support.LENGTHS:
            errors = _errors(ref, mod, xp, np.float64, steps, n_in=n_in, n_hidden=n_hidden, n_out=n_out)
            assert max(errors.values()) < 1e-10, (name, mod.__name__, steps, errors)


# -- as a user: the LRU with its D x through every command ----------------------------------------
LRU_CLAIMS = """\
[claims]
spec = "lru_phase.toml"
seeds = [1]

[steps]
"g" = "sqrt(1 - lam_re**2 - lam_im**2)"
"adj(h_re)" = "dL_t/dh_re + C_re.T @ adj(y) + next(lam_re) * next(adj(h_re)) + next(lam_im) * next(adj(h_im))"

[total]
"dL/dD" = "sum_t(outer(adj(y), x))"
"""


def test_the_lru_runs_through_every_command(tmp_path, capsys):
    from symrnn.cli import main

    spec = tmp_path / "lru_phase.toml"
    spec.write_text(LRU_PHASE)
    (tmp_path / "claims.toml").write_text(LRU_CLAIMS)
    assert main(["generate", "--spec", str(spec), "--backend", "all", "--out", str(tmp_path / "out")]) == 0
    assert {p.name for p in (tmp_path / "out").glob("lru_phase_*.py")} == {
        f"lru_phase_{b}.py" for b in ("numpy", "cupy", "numba", "torch")}
    assert main(["latex", "--spec", str(spec), "--format", "md", "-o", str(tmp_path / "lru.md")]) == 0
    md = (tmp_path / "lru.md").read_text()
    assert r"\cos" in md and r"\sin" in md and "D {x^{t}}" in md  # the phase, and the skip D x
    assert main(["verify", str(tmp_path / "claims.toml")]) == 0
    assert "3 claim(s), 3 correct" in capsys.readouterr().out


@pytest.mark.parametrize("claim, correct", [
    ("((1 - beta) * (M_A + M_A.T) + beta * (M_A - M_A.T) - gamma_A * I) @ h_prev", True),  # as the equation
    ("(M_A - 0.5 * M_A.T) @ h_prev - gamma_A * h_prev", True),  # the same matrix, otherwise combined
    ("M_A @ h_prev - 0.5 * (M_A.T @ h_prev) - 0.01 * (I @ h_prev)", True),
    ("(M_A - 0.5 * M_A.T - gamma_A * I) @ h_prev + 0.01 * h_prev", False),  # one term too many
    ("(M_A + 0.5 * M_A.T - gamma_A * I) @ h_prev", False),  # a sign
    ("(M_A - 0.5 * M_W.T - gamma_A * I) @ h_prev", False),  # another matrix
])
def test_a_combination_of_matrices_in_a_claim_is_judged(claim, correct, tmp_path, capsys):
    """(A - A.T - c * I) @ v in a claim reads as the equations read it (one product per matrix;
    beta = 0.75: (1 - beta)(A + A^T) + beta (A - A^T) = A - 0.5 A^T), and is judged like any claim."""
    from symrnn.cli import main

    (tmp_path / "lipschitz_rnn.toml").write_text(LIPSCHITZ)
    (tmp_path / "claims.toml").write_text(f'[claims]\nspec = "lipschitz_rnn.toml"\n\n[steps]\n"A_h" = "{claim}"\n')
    assert main(["verify", str(tmp_path / "claims.toml")]) == (0 if correct else 1)
    assert ("1 claim(s), 1 correct" if correct else "1 claim(s), 0 correct, 1 wrong") in capsys.readouterr().out


@pytest.mark.parametrize("claim, message", [
    ("(M_A - M_A) @ h_prev", "the combination of matrices is 0"),
    ("(M_A - I) @ (h_prev, x)", "a combination of matrices multiplies one vector, not a concatenation"),
    ("(h_prev * M_A) @ h_prev", "is not a scalar, so it cannot scale a matrix"),
    ("(M_A * M_W) @ h_prev", "a product of two matrices is not allowed"),
])
def test_a_wrong_combination_of_matrices_in_a_claim_is_one_line(claim, message, tmp_path, capsys):
    from symrnn.cli import main

    (tmp_path / "lipschitz_rnn.toml").write_text(LIPSCHITZ)
    (tmp_path / "claims.toml").write_text(f'[claims]\nspec = "lipschitz_rnn.toml"\n\n[steps]\n"A_h" = "{claim}"\n')
    assert main(["verify", str(tmp_path / "claims.toml")]) == 2
    err = capsys.readouterr().err
    assert "claims.toml:5" in err and message in err and len(err.strip().splitlines()) == 1, err


def test_a_combination_of_numbers_is_one_matrix_formed_once_and_a_scalar_parameter_keeps_the_products():
    """The Lipschitz RNN's A_beta and W_beta are each one derived matrix (M + (1 - 2 beta) M^T,
    I left as its term); with a scalar parameter as a coefficient each matrix keeps its own
    product, and both forms pass finite differences and BPTT = RTRL."""
    def h_products(g):
        return sorted((n.param, n.transpose) for n in g.nodes if isinstance(n, MatVecNode) and n.operand == "h_prev")

    g = build(parse_spec(LIPSCHITZ, "lipschitz.toml")).graph
    assert [[(float(c), p, t) for c, p, t in d.terms] for d in g.derived] == [
        [(1.0, "M_A", False), (-0.5, "M_A", True)], [(1.0, "M_W", False), (-0.5, "M_W", True)]]
    assert h_products(g) == sorted((d.name, False) for d in g.derived)
    scaled = LIPSCHITZ.replace('U = ["n_hidden", "n_in"]', 'U = ["n_hidden", "n_in"]\na = []').replace(
        "((1 - beta) * (M_A + M_A.T) + beta * (M_A - M_A.T) - gamma_A * I)", "(M_A - a * M_A.T)")
    cell = parse_spec(scaled, "scaled.toml")
    g = build(cell).graph
    assert [[(float(c), p, t) for c, p, t in d.terms] for d in g.derived] == [[(1.0, "M_W", False), (-0.5, "M_W", True)]]
    assert h_products(g) == sorted([("M_A", False), ("M_A", True), (g.derived[0].name, False)])
    results = check_module(module_of(cell), seed=2)
    assert results and all(r.ok for r in results), report("scaled", results)
