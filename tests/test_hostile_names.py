"""Any identifier a paper uses works as a name: the namer (symrnn.naming) names every
generated value around the user's names, so none is overwritten, shadowed or confused
with an adjoint, a buffer, a template variable, a C++ keyword or a CUDA built-in.

Each cell below gives every role (parameters of each kind, states, gates, readouts) a
name from a pool of names that look internal to the generated code, or to Python,
C++ and CUDA, or that papers use; rotating the pool puts every name in every role.
Every generated module must pass finite differences and BPTT = RTRL, and its CUDA,
compiled for the host, must match it.  (Issue "Trust", item 3.)
"""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest

from cupy_support import TOL
from symrnn.gradcheck import finite_differences, random_problem, rel_error, rtrl_vs_bptt
from symrnn.naming import C_FIXED, PYTHON_FIXED, Namer
from symrnn.ops import OPS
from symrnn.pipeline import build, load_module, render_cupy, render_numpy
from symrnn.spec import SpecError, SpecWarning, parse_spec

POOL = [
    # the generated code's own patterns
    "W_T", "common", "d_x", "d_h", "h_seq", "x_seq", "x_proj", "h_prev_proj", "W_stack_x", "dW_stack", "d_tmp0",
    "coef_tmp0", "tmp0", "o_x", "J_h", "d_h_next", "h_prev_0", "pre_g", "dh_dz", "d_coef",
    # the template's variables
    "B", "T", "K", "G", "t", "t0", "t1", "p", "np", "cp", "dtype", "cache", "params", "outputs", "grads",
    "grad_outputs", "state0", "cot", "dims", "CELL",
    # Python built-ins, C++ keywords, CUDA built-ins, the kernels' names
    "range", "len", "sum", "int", "float", "new", "this", "auto", "log", "sqrt", "tanhf", "threadIdx",
    "row_", "unit_", "scalar_t", "op_tanh", "self",
    # paper names
    "d_1", "o_t", "t1", "lam", "nu", "theta", "Lambda", "f_t",
]
# once each; a function's name (log, sqrt, sin, cos since issue 15) is no value's (it is refused as a name)
POOL = [n for n in dict.fromkeys(POOL) if n not in OPS]
ROLES = ["W", "U", "b", "a", "V", "h", "c", "g", "m", "y"]  # matrix, matrix, vector, scalar, readout matrix, states, gates, readout


def gated_cell(names: dict[str, str], name: str = "hostile") -> str:
    """A gated cell with a second state read in the step and in the readout through two
    different matrices (the shape of the readout bug), a scalar and a vector parameter."""
    n = names
    return f"""
[cell]
name = "{name}"
[inputs]
x = "n_in"
[states]
{n['h']} = "n_hidden"
{n['c']} = "n_hidden"
[params]
{n['W']} = ["n_hidden", "n_in"]
{n['U']} = ["n_hidden", "n_hidden"]
{n['b']} = ["n_hidden"]
{n['a']} = []
{n['V']} = ["n_out", "n_hidden"]
P = ["n_hidden", "n_hidden"]
[equations]
{n['g']} = "sigmoid({n['W']} @ x + {n['U']} @ {n['h']}_prev + {n['b']})"
{n['m']} = "{n['a']} * {n['g']} * {n['c']}_prev"
{n['c']} = "{n['g']} * {n['c']}_prev + (1 - {n['g']}) * tanh(P @ {n['h']}_prev)"
{n['h']} = "tanh(P @ {n['c']} + {n['m']}) * {n['g']}"
[readout]
{n['y']} = "{n['V']} @ {n['c']}"
[loss]
expr = "({n['y']} - target)**2 / 2"
target_of = "{n['y']}"
"""


def assignments() -> list[dict[str, str]]:
    """Every pool name in every role: role j of cell i takes pool[(i + 7 j) % len(pool)]."""
    out = []
    for i in range(len(POOL)):
        names = {role: POOL[(i + 7 * j) % len(POOL)] for j, role in enumerate(ROLES)}
        if len(set(names.values())) == len(ROLES):
            out.append(names)
    return out


def load(text: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SpecWarning)
        return parse_spec(text, "hostile.toml")


def check_numpy(cell, n_in=3, n_hidden=3, n_out=3):
    """FD and BPTT = RTRL at sizes where every dimension is the same (so a wrong matrix
    or a swapped buffer gives wrong numbers, not a shape error)."""
    module = load_module(render_numpy(build(cell)), cell.name)
    problem = random_problem(module, seed=1, T=3, B=2, n_in=n_in, n_hidden=n_hidden, n_out=n_out)
    errors = {f"FD {r.name}": r.error for r in finite_differences(module, problem)}
    if hasattr(module, "loss_and_grads"):
        errors |= {f"loss FD {r.name}": r.error for r in finite_differences(module, problem, loss=True)}
    bad = {k: e for k, e in errors.items() if not e < 1e-6}
    bad |= {f"RTRL {r.name}": r.error for r in rtrl_vs_bptt(module, problem) if not r.error < 1e-10}
    return module, problem, bad


@pytest.mark.parametrize("names", assignments(), ids=lambda n: "-".join(n.values()))
def test_every_name_in_every_role_gives_a_correct_module(names):
    cell = load(gated_cell(names))
    module, problem, bad = check_numpy(cell)
    assert not bad, bad
    grads = module.backward(problem.params, module.forward(problem.params, problem.x, problem.state0)[1],
                            problem.grad_outputs)
    assert set(grads) == {names["W"], names["U"], names["b"], names["a"], names["V"], "P", "x",
                          f"{names['h']}0", f"{names['c']}0"}


HOST_CASES = [names for k, names in enumerate(assignments()) if k % 6 == 0]


@pytest.fixture(scope="module")
def host_xp(tmp_path_factory):
    from host_cupy import host_cupy

    return host_cupy(tmp_path_factory.mktemp("hostile_kernels"))


@pytest.mark.parametrize("names", HOST_CASES, ids=lambda n: "-".join(n.values()))
def test_cuda_of_hostile_names_compiles_and_matches_numpy(names, host_xp, monkeypatch):
    cell = load(gated_cell(names))
    plan = build(cell)
    ref = load_module(render_numpy(plan), cell.name)
    monkeypatch.setitem(__import__("sys").modules, "cupy", host_xp)
    cu = load_module(render_cupy(plan), cell.name + "_cupy")
    pr = random_problem(ref, T=4, B=2, seed=2, n_in=3, n_hidden=3, n_out=3)
    out_ref, cache_ref = ref.forward(pr.params, pr.x, pr.state0)
    out, cache = cu.forward(pr.params, pr.x, pr.state0)
    grads_ref, grads = ref.backward(pr.params, cache_ref, pr.grad_outputs), cu.backward(pr.params, cache, pr.grad_outputs)
    errors = {k: rel_error(out[k], out_ref[k]) for k in out_ref} | {"d_" + k: rel_error(grads[k], grads_ref[k]) for k in grads_ref}
    bad = {k: e for k, e in errors.items() if not e <= TOL[np.float64]}
    assert not bad, bad


def test_the_readout_bug_cell_is_right():
    """A state multiplied by one matrix in the step and by another in the readout: the
    step used to get the readout's matrix (issue "Trust", item 3)."""
    text = """
[cell]
name = "readout_shared_operand"
[inputs]
x = "n_in"
[states]
s = "n_hidden"
h = "n_hidden"
[params]
A = ["n_hidden", "n_in"]
P = ["n_hidden", "n_hidden"]
V = ["n_out", "n_hidden"]
[equations]
s = "A @ x + s_prev"
h = "tanh(P @ s + h_prev)"
[readout]
y = "V @ s"
"""
    cell = load(text)
    for n_out in (3, 2):
        module, problem, bad = check_numpy(cell, n_out=n_out)
        assert not bad, bad
        # the forward values themselves, by hand
        p, x = problem.params, problem.x
        s, h = problem.state0["s"], problem.state0["h"]
        outputs, cache = module.forward(p, x, problem.state0)
        for t in range(x.shape[0]):
            s = x[t] @ p["A"].T + s
            h = np.tanh(s @ p["P"].T + h)
            assert np.allclose(outputs["h"][t], h, rtol=1e-12) and np.allclose(outputs["y"][t], s @ p["V"].T, rtol=1e-12)
        seeds = {k: v.copy() for k, v in problem.grad_outputs.items()}
        module.backward(p, cache, problem.grad_outputs)
        assert all(np.array_equal(seeds[k], problem.grad_outputs[k]) for k in seeds)  # the caller's arrays untouched


@pytest.mark.parametrize("text, message", [
    ('b = ["n_hidden"]\nh0 = ["n_hidden"]', "the gradient of parameter 'h0' would have the key of the gradient of "
                                          "the initial value of state 'h'"),
    ('b = ["n_hidden"]\nx = ["n_hidden"]', "'x' is defined twice"),
    ('b = ["n_hidden"]\nexp = ["n_hidden"]', "'exp' is the name of a function, so an equation could not use it"),
    ('b = ["n_hidden"]\nlambda = ["n_hidden"]', "'lambda' is a Python keyword"),
])
def test_names_that_cannot_work_get_a_clear_error(text, message):
    base = gated_cell({role: role for role in ROLES}).replace('h = "n_hidden"', 'h = "n_hidden"', 1)
    with pytest.raises(SpecError, match=re.escape(message)):
        load(base.replace('b = ["n_hidden"]', text))


def test_a_parameter_named_x_beside_an_input_named_u():
    text = (gated_cell({role: role for role in ROLES}).replace('x = "n_in"', 'u = "n_in"').replace("@ x", "@ u")
            .replace('b = ["n_hidden"]', 'b = ["n_hidden"]\nx = ["n_hidden"]').replace("+ b)", "+ b + x)"))
    with pytest.raises(SpecError, match=r"hostile.toml:\d+: cell 'hostile', params\['x'\]: .*the gradient of the input 'u'"):
        load(text)
    cell = load(text.replace('x = ["n_hidden"]', 'x_ = ["n_hidden"]').replace("+ b + x)", "+ b + x_)"))
    _, _, bad = check_numpy(cell)  # an input named u works like one named x
    assert not bad, bad


def test_the_namer_never_gives_two_things_one_name():
    n = Namer(PYTHON_FIXED, ["h", "h_seq", "d_h", "T"])
    names = [n.value("h"), n.value("h_seq"), n.value("d_h"), n.value("T"), n("seq", "h"), n("adj", "h"),
             n("adj_seq", "h"), n("seq", "h_seq"), n("adj", "d_h"), n.fresh("h"), n.fresh("h"), n("adj_part", "h", 0),
             n("adj", "h_0")]
    assert len(set(names)) == len(names)
    assert n.value("T") != "T" and all(name not in PYTHON_FIXED for name in names)
    assert n("seq", "h") == n("seq", "h")  # the same thing, the same name
    c = Namer(C_FIXED, ["int", "exp", "row_"])
    assert {c.value("int"), c.value("exp"), c.value("row_")}.isdisjoint(C_FIXED)


C_HOSTILE = {"W": "threadIdx", "U": "blockDim", "b": "new", "a": "this", "V": "auto", "h": "int", "c": "float",
             "g": "scalar_t", "m": "row_", "y": "i_"}


def test_c_and_cuda_names_compile_with_nvcc(tmp_path):
    """The __global__ wrappers too (the host compile leaves them out): C++ keywords,
    CUDA's built-ins and the kernels' own index names as the user's names."""
    import os
    import shutil
    import subprocess

    from symrnn.pipeline import render_cuda

    nvcc = shutil.which("nvcc")
    if nvcc is None:
        if os.environ.get("CI") or os.environ.get("SYMRNN_REQUIRE_NVCC"):
            pytest.fail("nvcc is not on PATH, and CI / SYMRNN_REQUIRE_NVCC is set")
        pytest.skip("nvcc is not installed")
    src = tmp_path / "hostile.cu"
    src.write_text(render_cuda(build(load(gated_cell(C_HOSTILE)))))
    proc = subprocess.run([nvcc, "-std=c++17", "-cubin", "--gpu-architecture=sm_80", "--Werror", "all-warnings",
                           str(src), "-o", str(tmp_path / "hostile.cubin")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-4000:]


def test_c_and_cuda_names_match_numpy_on_the_host(host_xp, monkeypatch):
    test_cuda_of_hostile_names_compiles_and_matches_numpy(C_HOSTILE, host_xp, monkeypatch)
