"""The optimisation passes of the NumPy module (symrnn.passes): each can be switched off,
and with any of them off (or all) every module computes the same outputs and gradients
as with all of them on; each one does what it says on the cells that have its pattern."""

from __future__ import annotations

import re

import numpy as np
import pytest
import sympy

import test_custom_cells
from conftest import CELLS
from symrnn.gradcheck import random_problem, rel_error, rtrl_vs_bptt
from symrnn.ir import Leaf, Pointwise, Reduction
from symrnn.passes import ALL, PASSES
from symrnn.passes.hoist_coefficients import MIN_BLOCK_STEPS, block_steps
from symrnn.passes.unit_sums import UnitSums
from symrnn.pipeline import build, load_module, render_numpy
from symrnn.reductions import mean

CUSTOM = ("min_gru", "ind_rnn", "gated_readout", "two_stage")
WITHOUT = [(name,) for name in PASSES] + [PASSES]  # each one off, then all of them


def _plan(cell: str):
    return build(getattr(test_custom_cells, cell)() if cell in CUSTOM else cell)


def _module(plan, passes):
    return load_module(render_numpy(plan, passes=passes), f"{plan.graph.cell}_{abs(hash(passes))}")


def _run(module, pr):
    out, cache = module.forward(pr.params, pr.x, pr.state0)
    return out, module.backward(pr.params, cache, pr.grad_outputs)


@pytest.mark.parametrize("cell", [*CELLS, *CUSTOM])
def test_every_pass_off_computes_the_same_values(cell):
    plan = _plan(cell)
    reference = _module(plan, ALL)
    pr = random_problem(reference, T=5, B=3, seed=4)
    out_ref, grads_ref = _run(reference, pr)
    for off in WITHOUT:
        module = _module(plan, ALL - set(off))
        out, grads = _run(module, pr)
        errors = {k: rel_error(out[k], out_ref[k]) for k in out_ref} | {f"d_{k}": rel_error(grads[k], grads_ref[k]) for k in grads_ref}
        bad = {k: e for k, e in errors.items() if not e <= 1e-12}
        assert not bad, f"{cell} without {', '.join(off)}: {bad}"


@pytest.mark.parametrize("cell", ["lstm", "gru_torch", "lstm_peephole"])
def test_with_no_pass_bptt_equals_rtrl(cell):
    module = _module(_plan(cell), frozenset())
    bad = [(r.name, r.error) for r in rtrl_vs_bptt(module, random_problem(module, T=4, B=2, seed=1)) if not r.error < 1e-10]
    assert not bad, bad


def _source(cell: str, passes) -> str:
    return render_numpy(_plan(cell), passes=passes)


@pytest.mark.parametrize("name, cell, present", [
    ("fusion", "lstm", "x_proj += h_prev_proj  # + the recurrent side of every slot"),  # one add for the input side
    ("fusion", "lstm", "np.exp(x_proj, out=x_proj)"),  # the gates activated where the GEMM wrote them
    ("in_place", "lstm", "np.multiply(d_h, dh_dW_o_h_prev[t - t0], out=d_W_o_h_prev)"),  # into the adjoint buffer's slot
    ("in_place", "lstm", "np.multiply(o, tanh_c, out=h)"),  # a state straight into its stored buffer
    # a value of several in-place calls (sigmoid) straight into its stored buffer, not copied there
    ("in_place", "layer_norm_lstm", "np.reciprocal(i, out=i)"),
    # the input side's adjoints in one stacked buffer: the rest of each added into its view, no concatenation
    ("in_place", "layer_norm_lstm", "d_wx_i_seq += d_wx_f_from_mean_wx_f + d_wx_i_from1  # eq:layer_norm_lstm:adj:wx_i"),
    # the four gates' recurrent products, all stored, written by the GEMM into their stored buffer
    ("fusion", "layer_norm_lstm", "np.dot(h_prev, R_T, out=h_prev_proj)  # rh_i, rh_g, rh_f, rh_o"),
    # a mean's and an inverse standard deviation's adjoints from the loop as one value per row
    ("in_place", "layer_norm_lstm", "d_rstd_x_seq = np.zeros((T, B, 1), dtype)"),
    ("hoist_coefficients", "gru", "for t1 in range(T, 0, -_COEF_STEPS):"),  # coefficients per block of steps
    ("lean_buffers", "lstm", "writable=False"),  # a seed nothing writes is the caller's array
    ("lean_buffers", "gru", "np.matmul("),  # the first write to d_x is a GEMM into it
    # the four gate blocks' means have one adjoint: one share over the units for all four
    ("shared_unit_sums", "layer_norm_lstm", "d_rh_o = d_rh_f_from_mean_rh_f + d_rh_o_from1 + d_rh_o_from2"),
    # sum_k (wx_k - mu_x) = 0: the mean's adjoint keeps only what the loop passed it
    ("zero_unit_sums", "layer_norm_lstm", "d_mu_x = d_mu_x_seq  # eq:layer_norm_lstm:adj:mu_x"),
    ("zero_unit_sums", "layer_norm_lstm", "d_mu_c = d_mu_c_from4  # eq:layer_norm_lstm:adj:mu_c"),
    # a uniform value's adjoint as its mean over the units, one value per row, and a reduction's
    # share of it passed on without a sum over the units
    ("compact_unit_adjoints", "layer_norm_lstm",
     "d_rstd_r = _mean_units(d_tmp10*d_tmp12 + d_tmp13*d_tmp15 + d_tmp4*d_tmp6 + d_tmp7*d_tmp9)  # eq:layer_norm_lstm:adj:rstd_r"),
    ("compact_unit_adjoints", "layer_norm_lstm", "d_mean_in_msd_x_i_from_msd_x_i = d_msd_x_o\n"),
    ("compact_unit_adjoints", "layer_norm_lstm", "d_mu_c_from4 = -_mean_units(d_tmp3)"),
    # sums over a short axis as products with ones: a reduction, a reduction's adjoint, a parameter's sum in the loop
    ("unit_products", "layer_norm_lstm", "mu_c = _mean_units(c)  # eq:layer_norm_lstm:mu_c"),
    ("unit_products", "elman_classifier", "d_logsumexp_z = -_mean_units(d_logp)"),
    ("unit_products", "lstm_peephole", "d_p_i += _sum_rows(d_c*d_coef[t - t0])"),
    # the centred rh_i - mu_r of an earlier stage (the gains' adjoints) read by the variance's
    ("shared_temporaries", "layer_norm_lstm", "d_rh_i_from1 = d_tmp10*d_tmp24"),
    # the four gates' statements as one on the stacked arrays: a product with the gains, an adjoint
    # added into the stacked input-side adjoint, the gains' gradients, a mean of the four blocks' sum
    ("stack_blocks", "layer_norm_lstm", "d_tmp12_stack = d_tmp11_stack*gamma_r\n"),
    ("stack_blocks", "layer_norm_lstm", "d_x_proj_seq[t] += d_tmp16_stack*rstd_x_seq[t]"),
    # (a sum over the rows of a product with a row's value: that sum weighted by the value)
    ("stack_blocks", "layer_norm_lstm", "d_gamma_r += _sum_rows_by(d_tmp10_stack*d_tmp11_stack, rstd_r)"),
    # (a mean over the units of a product of two arrays: of the two, the product not formed)
    ("stack_blocks", "layer_norm_lstm", "d_rstd_r = 4*_mean_units(d_tmp12_stack, d_tmp10_stack)"),
    # (a stacked value computed where it goes: into the stacked product's adjoint, a new stack's blocks)
    ("stack_blocks", "layer_norm_lstm", "d_rh_i_from2_stack, out=d_h_prev_proj_seq[t])  # eq:layer_norm_lstm:adj:rh_i"),
    ("stack_blocks", "layer_norm_lstm", "np.multiply(d_g, 1 - g**2, out=d_tmp11_stack[:, n_hidden:2*n_hidden])"),
    # the four blocks' means, and mean squared deviations, one mean of the stacked array each
    ("stack_blocks", "layer_norm_lstm", "mu_r[...] = _mean_units(h_prev_proj)  # eq:layer_norm_lstm:mu_r"),
    ("stack_blocks", "layer_norm_lstm", "var_x_seq = _mean_units(x_proj_seq, x_proj_seq)  # eq:layer_norm_lstm:var_x"),
    # the projections centred once, where they are made, and read centred in forward and backward
    ("centred_in_place", "layer_norm_lstm", "x_proj_seq -= mu_x_seq\n"),
    ("centred_in_place", "layer_norm_lstm", "h_prev_proj -= mu_r\n"),
    ("centred_in_place", "layer_norm_lstm", "d_tmp22_stack = x_proj_seq[t]\n"),
    ("centred_in_place", "layer_norm_lstm", "d_wx_i_from1_stack = d_tmp25*x_proj_seq[t]\n"),
    # the input side's adjoint step by step in backward's loop, not over every step after it
    ("input_side_in_loop", "layer_norm_lstm", "        d_var_x = -0.5*d_rstd_x*(var_x_seq[t] + 1.0e-5)**(-1.5)"),
    ("input_side_in_loop", "layer_norm_lstm", "        d_x_proj_seq[t] += d_wx_f_from_mean_wx_f + d_wx_i_from1_stack"),
])
def test_each_pass_does_what_it_says(name, cell, present):
    # stack_blocks restates, on the stacked arrays, statements the other passes wrote block by block
    base = ALL if name in ("stack_blocks", "centred_in_place", "input_side_in_loop") else ALL - {"stack_blocks"}
    on, off = _source(cell, base), _source(cell, base - {name})
    assert present in on
    assert present not in off


def test_stacked_input_adjoints_are_not_concatenated():
    """With in_place, layer_norm_lstm's four input-side adjoints live in the buffer the adjoint
    GEMM reads; without it they are concatenated into it."""
    on, off = _source("layer_norm_lstm", ALL), _source("layer_norm_lstm", ALL - {"in_place"})
    assert "np.concatenate" not in on and "d_wx_i_seq = d_x_proj_seq[..., :n_hidden]" in on
    assert "d_x_proj_seq = np.concatenate([d_wx_i, d_wx_g, d_wx_f, d_wx_o], axis=-1)" in off


def test_prune_views_drops_the_views_nothing_reads():
    on, off = _source("lstm_torch", ALL), _source("lstm_torch", ALL - {"prune_views"})
    on_lines, off_lines = set(on.splitlines()), set(off.splitlines())
    assert on_lines < off_lines | on_lines and len(off.splitlines()) > len(on.splitlines())
    dropped = [line.strip() for line in off_lines - on_lines]
    assert dropped and all("[..., " in line for line in dropped), dropped


def test_an_unknown_pass_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown pass 'fuse'; the passes are fusion"):
        render_numpy(build("elman"), passes={"fuse"})


def test_passes_are_deterministic_and_default_to_all():
    plan = build("gru")
    assert render_numpy(plan) == render_numpy(plan, passes=ALL) == render_numpy(plan, passes=list(PASSES))
    assert np.all([render_numpy(plan, passes=ALL - {p}) != render_numpy(plan) for p in ("fusion", "hoist_coefficients")])


def test_shared_unit_sums_sums_one_adjoint_once():
    """The four msd reductions of one stacked projection have one adjoint (d_msd_r_f = d_msd_r_o, ...):
    its sum over units is computed once, not once per reduction; held as its mean over the
    units (compact_unit_adjoints), one share of it is passed on, not four."""
    full = ALL - {"compact_unit_adjoints"}
    on, off = _source("layer_norm_lstm", full), _source("layer_norm_lstm", full - {"shared_unit_sums"})
    assert on.count("# sum over the units of d_msd_r_o") == 1
    assert off.count("# sum over the units of d_msd_r_o") == 4
    on, off = _source("layer_norm_lstm", ALL), _source("layer_norm_lstm", ALL - {"shared_unit_sums"})
    assert "# sum over the units of d_msd_r" not in on + off
    shares = re.compile(r"d_mean_in_msd_r_\w+_from_msd_r_\w+ = d_msd_r_o$", re.M)  # one value per row: no view
    assert len(shares.findall(on)) == 1 and len(shares.findall(off)) == 4


@pytest.mark.parametrize("k, zero", [
    ("mu - a", True),  # sum_k (a_k - mean(a)) = 0
    ("(mu_f + mu_g)/2 - f", False),  # f alone is not centred on the joint mean
    ("(mu_f + mu_g) - f - g", True),  # f and g together are
    ("w*(mu - a)", False),  # a per-unit gain: its mean is not known, so kept
    ("(mu - a)**2", False),  # not linear in a
    ("s*(mu - a)", True),  # a uniform factor
])
def test_zero_unit_sums_proves_only_identities(k, zero):
    """zero_unit_sums leaves a term out only where its mean over units is 0 by the reductions' definitions."""
    n = sympy.Symbol("n_hidden")
    nodes = [Reduction("mu_a", n, mean, "a", "intermediate", "e"), Reduction("mean_f", n, mean, "f", "intermediate", "e"),
             Reduction("mean_g", n, mean, "g", "intermediate", "e"),
             Pointwise("mu", n, sympy.Symbol("mu_a"), "intermediate", "e"),
             Pointwise("mu_f", n, sympy.Symbol("mean_f"), "intermediate", "e"),
             Pointwise("mu_g", n, sympy.Symbol("mean_g"), "intermediate", "e")]

    class Graph:
        dims = (("n_hidden", None),)
        leaves = (Leaf("s", "param", None, "s"), Leaf("w", "param", n, "w"))

    Graph.nodes = nodes

    class Backward:
        g = Graph

    assert UnitSums(Backward).is_zero_mean(sympy.sympify(k)) is zero


@pytest.mark.parametrize("cell, steps", [("lstm", 16), ("lstm_peephole", 16)])
def test_coefficient_blocks_are_shorter_where_there_are_many_coefficients(cell, steps):
    """A block of the backward recursion is 16 steps, fewer where the coefficient buffers are many
    (so that a block's buffers stay in cache): block_steps of the module's own count."""
    source = _source(cell, ALL)
    block = source.split("for t1 in range(T, 0, -_COEF_STEPS):")[1].split("for t in reversed")[0]
    buffers = sum(1 for line in block.splitlines() if " = " in line) - 1  # less t0 = max(t1 - _COEF_STEPS, 0)
    assert block_steps(buffers) == steps
    assert f"\n_COEF_STEPS = {steps}\n" in source
    assert block_steps(1) == 16 and block_steps(10 ** 6) == 1


def test_hoisting_is_left_out_where_blocks_would_be_short():
    """layer_norm_lstm's 66 coefficient buffers would make blocks of 3 steps, where hoisting does
    not pay: its module is the one emitted without the pass; with 32 buffers or fewer it is kept."""
    assert block_steps(66) == 3 < MIN_BLOCK_STEPS <= block_steps(32)
    plan = build("layer_norm_lstm")
    assert render_numpy(plan) == render_numpy(plan, passes=ALL - {"hoist_coefficients"})
    assert "for t1 in range(T, 0, -_COEF_STEPS):" not in render_numpy(plan)
