"""The centred_in_place pass (symrnn/passes/centred_in_place.py): where it centres, it computes the
module's values; where an array is read otherwise too, it leaves the module as it is."""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from symrnn.gradcheck import check_module, random_problem
from symrnn.passes import ALL
from symrnn.pipeline import build, load_module, render_numpy
from symrnn.spec import SpecWarning, parse_spec

from test_stack_blocks import CELLS as BLOCK_CELLS, value_differences

_HEAD = """\
[cell]
name = "{name}"
[inputs]
x = "n_in"
[states]
h = "n_hidden"
[params]
W = ["n_hidden", "n_in"]
U = ["n_hidden", "n_hidden"]
[constants]
eps = 1e-5
[equations]
"""

#: name -> (equations, whether the pass centres something)
CELLS = {
    # a layer norm of the recurrent product: read only centred after its mean
    "ln_rec": ('a = "U @ h_prev"\nm = "mean(a)"\n'
               'h = "tanh(W @ x + (a - m) * (mean((a - m)**2) + eps)**-0.5)"\n', True),
    # the input side's product centred over every step, before the loop
    "ln_in": ('a = "W @ x"\nm = "mean(a)"\n'
              'h = "tanh((a - m) * (mean((a - m)**2) + eps)**-0.5 + U @ h_prev)"\n', True),
    # read uncentred too: a plain term beside the normalized one
    "ln_and_plain": ('a = "U @ h_prev"\nm = "mean(a)"\n'
                     'h = "tanh(W @ x + (a - m) * (mean((a - m)**2) + eps)**-0.5 + a)"\n', False),
    # twice the mean subtracted: not S - M
    "twice_mean": ('a = "U @ h_prev"\nm = "mean(a)"\nh = "tanh(W @ x + a - 2 * m)"\n', False),
    # a full-width value subtracted: S -= M would not be S - M's broadcast
    "full_width": ('a = "U @ h_prev"\nh = "tanh(W @ x + (a - h_prev) * mean(a))"\n', False),
    # the state itself centred (a layer norm of h): the next step reads it uncentred
    "ln_state": ('s = "tanh(W @ x + U @ h_prev)"\nm = "mean(s)"\n'
                 'h = "(s - m) * (mean((s - m)**2) + eps)**-0.5"\n', False),
}

CENTRING = re.compile(r"^\s*\w+ -= \w+\s*$", re.MULTILINE)


def _plan(name: str):
    if name in CELLS:
        return build(parse_spec(_HEAD.format(name=name) + CELLS[name][0], f"{name}.toml"))
    if name in BLOCK_CELLS:
        return build(parse_spec(BLOCK_CELLS[name], f"{name}.toml"))
    return build(name)


NAMES = [*CELLS, "haste_ln_gru", "ln_gru", "layer_norm_lstm"]
#: cells whose module centres an array (ln_gru normalizes each gate by its own mean: three M for one S)
CENTRED = {n for n, (_, yes) in CELLS.items() if yes} | {"haste_ln_gru", "layer_norm_lstm"}


@pytest.fixture(scope="module", params=NAMES)
def modules(request):
    plan = _plan(request.param)
    on, off = render_numpy(plan, passes=ALL), render_numpy(plan, passes=ALL - {"centred_in_place"})
    return request.param, on, off, load_module(on, f"{request.param}_centred"), load_module(off, f"{request.param}_plain")


def test_the_pass_centres_where_it_is_proved(modules):
    name, on, off, _, _ = modules
    assert not CENTRING.search(off)
    assert bool(CENTRING.search(on)) == (name in CENTRED), name
    if name not in CENTRED:
        assert on == off


@pytest.mark.parametrize("mode", ["all steps", "lengths reversed"])
def test_centred_modules_compute_the_same_values(modules, mode):
    name, _, _, on, off = modules
    pr = random_problem(on, T=6, B=4, seed=5)
    kw = {} if mode == "all steps" else {"lengths": np.array([6, 2, 0, 5]), "reverse": True}
    bad = value_differences(on, off, pr, **kw)
    assert not bad, (name, bad)


def test_centred_modules_pass_finite_differences_and_rtrl(modules):
    name, _, _, on, _ = modules
    if name not in CENTRED:
        pytest.skip("the module is the one without the pass")
    results = check_module(on, seed=2, T=4, B=2)
    bad = [(r.check, r.name, r.error) for r in results if not r.error <= r.tol]
    assert results and not bad, bad


def test_backward_reads_the_centred_array_not_the_difference(modules):
    name, on, _, _, _ = modules
    if name != "layer_norm_lstm":
        pytest.skip("the shipped cell's lines")
    backward = on[on.index("def backward("):on.index("def loss_and_grads(")]
    assert "x_proj_seq[t] - " not in backward and "-mu_x_seq[t] + x_proj_seq[t]" not in backward
    assert "h_prev_proj_seq[t] - mu_r" not in backward


#: terms of a random cell's update that read a = (a product) only centred, as a - m ...
_CENTRED_TERMS = ("(a - m) * (mean((a - m)**2) + eps)**-0.5", "tanh(a - m)", "g * (a - m)", "(a - m)**2 / 4")
#: ... and that read it otherwise too (the pass may centre it only after such a read: sigmoid(a)
#: computed over every step before the loop)
_OTHER_TERMS = ("a", "sigmoid(a)", "a - 2 * m", "(a - m) * a / 4")


@st.composite
def centred_cells(draw):
    product = draw(st.sampled_from(["W @ x", "U @ h_prev"]))
    other = "U @ h_prev" if product == "W @ x" else "W @ x"
    mean = draw(st.sampled_from(["mean(a)", "sum(a) / 3", "(mean(a) + mean(h_prev)) / 2"]))
    terms = draw(st.lists(st.sampled_from(_CENTRED_TERMS), min_size=1, max_size=3))
    plain = draw(st.lists(st.sampled_from(_OTHER_TERMS), max_size=1))
    h = " + ".join([*terms, *plain, other])
    text = (_HEAD.format(name="random_centred").replace('[constants]', 'g = ["n_hidden"]\n[constants]')
            + f'a = "{product}"\nm = "{mean}"\nh = "tanh({h})"\n')
    return text


@settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(centred_cells())
def test_random_centred_cells_compute_the_same_values(text):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SpecWarning)  # g, where no term reads it
        plan = build(parse_spec(text, "random_centred.toml"))
    on = load_module(render_numpy(plan, passes=ALL), "random_centred_on")
    off = load_module(render_numpy(plan, passes=ALL - {"centred_in_place"}), "random_centred_off")
    pr = random_problem(on, T=4, B=3, seed=6)
    bad = value_differences(on, off, pr)
    assert not bad, (bad, text)
