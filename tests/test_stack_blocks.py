"""The stack_blocks pass (symrnn/passes/stack_blocks.py): cells written by blocks (gates with
their rows of stacked parameters) compute the same values with it as without it, pass finite
differences and BPTT = RTRL with it, and get stacked statements where their blocks are one
computation, and none where they are not (a block's own mean, an operand of the blocks' width
shared by them, blocks in another order); random cells by blocks (hypothesis) compute the same
values with it as without it, and BPTT = RTRL with it."""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from symrnn.gradcheck import check_module, random_problem, rel_error, rtrl_vs_bptt
from symrnn.passes import ALL
from symrnn.pipeline import build, load_module, render_numpy
from symrnn.spec import SpecWarning, parse_spec

from test_reductions import LN_GRU

_HEAD = """\
[cell]
name = "{name}"
[inputs]
x = "n_in"
[states]
h = "n_hidden"
"""

#: haste's LayerNormGRU: the stacked projections normalized over all 3 n_hidden units (test_reductions's
#: per-gate ln_gru, its equations of the normalizations and the gates replaced)
HASTE_LN_GRU = LN_GRU[:LN_GRU.index('lx_z = ')].replace('name = "ln_gru"', 'name = "haste_ln_gru"') + """\
mx = "(mean(ax_z) + mean(ax_r) + mean(ax_n)) / 3"
vx = "(mean((ax_z - mx)**2) + mean((ax_r - mx)**2) + mean((ax_n - mx)**2)) / 3"
mh = "(mean(ah_z) + mean(ah_r) + mean(ah_n)) / 3"
vh = "(mean((ah_z - mh)**2) + mean((ah_r - mh)**2) + mean((ah_n - mh)**2)) / 3"
z = "sigmoid(gx[0] * (ax_z - mx) * (vx + eps)**-0.5 + gr[0] * (ah_z - mh) * (vh + eps)**-0.5 + b[0])"
r = "sigmoid(gx[1] * (ax_r - mx) * (vx + eps)**-0.5 + gr[1] * (ah_r - mh) * (vh + eps)**-0.5 + b[1])"
n = "tanh(gx[2] * (ax_n - mx) * (vx + eps)**-0.5 + r * gr[2] * (ah_n - mh) * (vh + eps)**-0.5 + b[2])"
h = "z * h_prev + (1 - z) * n"
"""

#: peephole-style gains: a vector parameter's blocks times the previous cell state
PEEPHOLE_BLOCKS = """\
[cell]
name = "peephole_blocks"
[inputs]
x = "n_in"
[states]
h = "n_hidden"
c = "n_hidden"
[params]
W = { shape = ["3*n_hidden", "n_in"], blocks = 3 }
R = { shape = ["3*n_hidden", "n_hidden"], blocks = 3 }
p = { shape = ["3*n_hidden"], blocks = 3 }
b = { shape = ["3*n_hidden"], blocks = 3 }
Wg = ["n_hidden", "n_in"]
[equations]
i = "sigmoid(W[0] @ x + R[0] @ h_prev + p[0] * c_prev + b[0])"
f = "sigmoid(W[1] @ x + R[1] @ h_prev + p[1] * c_prev + b[1])"
o = "sigmoid(W[2] @ x + R[2] @ h_prev + p[2] * c_prev + b[2])"
c = "f * c_prev + i * tanh(Wg @ x)"
h = "o * tanh(c)"
"""

#: two blocks of a product and of a gain, and the equations of a, u (two gates) and h
_TWO_BLOCKS = _HEAD + """\
[params]
W = {{ shape = ["2*n_hidden", "n_in"], blocks = 2 }}
g = {{ shape = ["2*n_hidden"], blocks = 2 }}
[equations]
a = "{a}"
u = "{u}"
h = "{h}"
"""
#: each block shares an operand of the blocks' width (h_prev): nothing may stack over it
SHARED_WIDE = _TWO_BLOCKS.format(name="shared_wide", a="(W[0] @ x) * h_prev * g[0]", u="(W[1] @ x) * h_prev * g[1]",
                                 h="tanh(a) * sigmoid(u)")
#: each block normalized over its own units: its mean is not the stack's
OWN_MEANS = _TWO_BLOCKS.format(name="own_means", a="g[0] * (W[0] @ x - mean(W[0] @ x)) + h_prev",
                               u="g[1] * (W[1] @ x - mean(W[1] @ x))", h="tanh(a) * sigmoid(u)")
#: the blocks' statements pair block 1 of one stack with block 0 of another
CROSSED = _TWO_BLOCKS.format(name="crossed", a="(W[0] @ x) * g[1]", u="(W[1] @ x) * g[0]", h="tanh(a + h_prev) * sigmoid(u)")

#: two gates normalized together (their sums, fused into the recurrent GEMM's output, are other names of
#: its views), then the state normalized
LN_STATE = _HEAD.format(name="ln_state") + """\
[params]
W = { shape = ["2*n_hidden", "n_in"], blocks = 2 }
R = { shape = ["2*n_hidden", "n_hidden"], blocks = 2 }
b = { shape = ["2*n_hidden"], blocks = 2 }
g = { shape = ["n_hidden"], init = "constant(1)" }
[constants]
eps = 1e-5
[equations]
u = "W[0] @ x + R[0] @ h_prev + b[0]"
v = "W[1] @ x + R[1] @ h_prev + b[1]"
m = "(mean(u) + mean(v)) / 2"
s = "((mean((u - m)**2) + mean((v - m)**2)) / 2 + eps)**-0.5"
z = "sigmoid((u - m) * s)"
q = "tanh((v - m) * s)"
hh = "z * h_prev + (1 - z) * q"
h = "g * (hh - mean(hh)) * (mean((hh - mean(hh))**2) + eps)**-0.5"
"""

CELLS = {"ln_gru": LN_GRU, "ln_state": LN_STATE, "haste_ln_gru": HASTE_LN_GRU, "peephole_blocks": PEEPHOLE_BLOCKS,
         "shared_wide": SHARED_WIDE, "own_means": OWN_MEANS, "crossed": CROSSED}
#: cells whose module has stacked statements; the others must have none: peephole_blocks's gains
#: multiply c_prev, of the blocks' width, in every block; ln_gru's gates are normalized each over
#: its own units, so that one statement only (the gains' gradient) would stack, not worth the copies
#: into a stacked array it would need
STACKED = {"haste_ln_gru", "layer_norm_lstm", "ln_state"}
#: a name the pass gives (the template's own dW_stack is not one)
PASS_NAME = re.compile(r"\b(?!dW_stack\b)\w+_stack(_\d+)?\b")
#: a stacked statement that computes nothing: another name for an array
RENAMING = re.compile(r"^\s*\w+_stack(_\d+)? = \w+(\[[^\]]*\])?\s*(#.*)?$", re.MULTILINE)


def _plan(name: str):
    return build(name) if name not in CELLS else build(parse_spec(CELLS[name], f"{name}.toml"))


def value_differences(on, off, pr, **kw) -> dict[str, float]:
    """The outputs and gradients (``d_<name>``) of modules ``on`` and ``off`` on problem ``pr``
    (forward's keywords ``kw``) that differ by more than 1e-12 relative, with their difference."""
    results = []
    for m in (on, off):
        out, cache = m.forward(pr.params, pr.x, pr.state0, **kw)
        results.append((out, m.backward(pr.params, cache, pr.grad_outputs)))
    (out, grads), (out_off, grads_off) = results
    assert set(grads) == set(grads_off)
    errors = {k: rel_error(out[k], out_off[k]) for k in out_off} | {f"d_{k}": rel_error(grads[k], grads_off[k]) for k in grads_off}
    return {k: e for k, e in errors.items() if not e <= 1e-12}


def _modules(name: str):
    plan = _plan(name)
    on, off = render_numpy(plan, passes=ALL), render_numpy(plan, passes=ALL - {"stack_blocks"})
    return on, off, load_module(on, f"{name}_stacked"), load_module(off, f"{name}_unstacked")


@pytest.mark.parametrize("name", [*sorted(CELLS), "layer_norm_lstm"])
@pytest.mark.parametrize("mode", ["all steps", "lengths", "lengths reversed"])
def test_stacked_blocks_compute_the_same_values(name, mode):
    _, _, on, off = _modules(name)
    pr = random_problem(on, T=6, B=4, seed=3)
    kw = {} if mode == "all steps" else {"lengths": np.array([6, 2, 0, 5]), "reverse": mode == "lengths reversed"}
    bad = value_differences(on, off, pr, **kw)
    assert not bad, bad


@pytest.mark.parametrize("name", sorted(CELLS))
def test_stacked_modules_pass_finite_differences_and_rtrl(name):
    _, _, on, _ = _modules(name)
    results = check_module(on, seed=1, T=5, B=2)
    bad = [(r.check, r.name, r.error) for r in results if not r.error <= r.tol]
    assert results and not bad, bad


@pytest.mark.parametrize("name", [*sorted(CELLS), "layer_norm_lstm"])
def test_blocks_stack_only_where_they_are_one_computation(name):
    source, unstacked, _, _ = _modules(name)
    assert not PASS_NAME.search(unstacked)
    assert bool(PASS_NAME.search(source)) == (name in STACKED), name
    # a stacked statement computes something (centred_in_place may leave one another name of an
    # array it centred: `d_tmp12_stack = h_prev_proj_seq[t]` for `h_prev_proj_seq[t] - mh`)
    stacked_only = render_numpy(_plan(name), passes=ALL - {"centred_in_place"})
    assert not RENAMING.search(stacked_only), RENAMING.search(stacked_only).group(0)


def test_float32_stacked_module_matches_the_unstacked_one():
    _, _, on, off = _modules("layer_norm_lstm")
    pr = random_problem(on, T=6, B=4, seed=5)
    params = {k: v.astype(np.float32) for k, v in pr.params.items()}
    x, state0 = pr.x.astype(np.float32), {k: v.astype(np.float32) for k, v in pr.state0.items()}
    grads = []
    for m in (on, off):
        out, cache = m.forward(params, x, state0)
        grads.append(m.backward(params, cache, {k: np.ones_like(v) for k, v in out.items()}))
    assert all(grads[0][k].dtype == np.float32 for k in grads[0])
    bad = {k: rel_error(grads[0][k], grads[1][k]) for k in grads[1] if not rel_error(grads[0][k], grads[1][k]) <= 1e-5}
    assert not bad, bad


# -- random cells by blocks --------------------------------------------------------------------------
#: a gate's pre-activation: terms over block {k}'s rows (its product with x, with h_prev, its gain and
#: bias), the blocks' shared normalization (m, s: one value per row), a block's own mean (which must
#: not stack), h_prev (of the blocks' width, shared: which must not stack either) and numbers
TERMS = ("(W[{k}] @ x)", "(R[{k}] @ h_prev)", "g[{k}]", "b[{k}]", "(wx{k} - m) * s", "mean(wx{k})", "h_prev", "0.5")
ACTS = ("sigmoid({})", "tanh({})")


@st.composite
def _template(draw, depth=0):
    """A pre-activation with ``{k}`` where block k's rows go."""
    if depth >= 2 or draw(st.booleans()):
        return draw(st.sampled_from(TERMS))
    a, b = draw(_template(depth + 1)), draw(_template(depth + 1))
    form = draw(st.sampled_from(("{} + {}", "{} * {}", "{} - {}", "tanh({}) * {}")))
    return "(" + form.format(a, b) + ")"


@st.composite
def block_cells(draw):
    """K gates over the K row blocks of stacked parameters: one pre-activation template for all
    of them (possibly under different activations) or each its own, then a bounded state update."""
    blocks = draw(st.integers(2, 4))
    shared = draw(st.booleans())
    common = draw(_template())
    templates = [common if shared else draw(_template()) for _ in range(blocks)]
    acts = [draw(st.sampled_from(ACTS)) for _ in range(blocks)]
    rows = f"{blocks}*n_hidden"
    lines = [f'wx{k} = "W[{k}] @ x"' for k in range(blocks)]
    lines.append(f'm = "({" + ".join(f"mean(wx{k})" for k in range(blocks))}) / {blocks}"')
    lines.append(f's = "(({" + ".join(f"mean((wx{k} - m)**2)" for k in range(blocks))}) / {blocks} + 0.5)**-0.5"')
    # every gate reads its block's normalized product and bias: each gate is a vector, every equation used
    lines += [f'a{k} = "{acts[k].format(templates[k].format(k=k) + f" + (wx{k} - m) * s + b[{k}]")}"' for k in range(blocks)]
    rest = " + ".join(f"a{k}" for k in range(1, blocks))
    lines.append(f'h = "tanh(a0 * h_prev + {rest})"')
    return _HEAD.format(name="random_blocks") + f"""\
[params]
W = {{ shape = ["{rows}", "n_in"], blocks = {blocks} }}
R = {{ shape = ["{rows}", "n_hidden"], blocks = {blocks} }}
g = {{ shape = ["{rows}"], blocks = {blocks} }}
b = {{ shape = ["{rows}"], blocks = {blocks} }}
[equations]
""" + "\n".join(lines) + "\n"


@settings(max_examples=50, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(block_cells())
def test_random_block_cells_compute_the_same_values_stacked(text):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SpecWarning)  # a block's row of a parameter no gate reads is fine here
        plan = build(parse_spec(text, "random_blocks.toml"))
    on = load_module(render_numpy(plan, passes=ALL), "random_blocks_stacked")
    off = load_module(render_numpy(plan, passes=ALL - {"stack_blocks"}), "random_blocks_unstacked")
    pr = random_problem(on, T=5, B=3, seed=2, n_in=3, n_hidden=3, n_out=3)
    for kw in ({}, {"lengths": np.array([5, 0, 2]), "reverse": True}):
        bad = value_differences(on, off, pr, **kw)
        assert not bad, (bad, text)
    bad = [(r.name, r.error) for r in rtrl_vs_bptt(on, pr) if not r.error <= r.tol]
    assert not bad, (bad, text)
