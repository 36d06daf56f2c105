"""The derivation states the seeds' recursions (with the seeds' slips corrected)."""

from __future__ import annotations

import sympy

from symrnn.derive import derive
from symrnn.lower import lower
from symrnn.cells import builtin

l, i, j = sympy.symbols("l i j", integer=True)
m = sympy.Symbol("m1", integer=True)


def derivation(name):
    return derive(lower(builtin(name)))


def test_seed002_sensitivity_recursions():
    der = derivation("single_sigmoid")
    v = sympy.Symbol("v")  # a scalar parameter
    h, x, h_prev = (sympy.IndexedBase(name)[l] for name in ("h", "x", "h_prev"))
    sigma_prime = h * (1 - h)  # sigma'(a^t), through the stored h^t
    for param, direct in (("b", 1), ("w", x), ("v", h_prev)):
        sens = der.sensitivity("h", param)
        prev = sympy.IndexedBase(f"dh_prev_d{param}")[l]
        seed = sigma_prime * (v * prev + direct)  # dh^t/dθ = σ'(a^t)[v dh^{t-1}/dθ + ∂a/∂θ]
        assert sympy.expand(sens.rhs - seed) == 0, param
        assert sens.initial == 0
        # at t = 0 the sensitivity at t-1 is zero: dh^0/db = σ'(a^0), dh^0/dw = σ'(a^0) x^0
        assert sympy.expand(sens.rhs.subs(prev, 0) - sigma_prime * direct) == 0


def test_seed000_elman_sensitivity_for_U():
    der = derivation("elman")
    sens = der.sensitivity("s", "U")
    s = sympy.IndexedBase("s")[l]
    x = sympy.IndexedBase("x")
    w = sympy.IndexedBase("w")
    ds_prev = sympy.IndexedBase("ds_prev_dU")
    n_hidden = sympy.Symbol("n_hidden", integer=True, positive=True)
    # ds^t_l/du_ij = f'(z^t_l) (x^t_j δ_li + Σ_m w_lm ds^{t-1}_m/du_ij), f' = 1 - s^2
    seed = (1 - s**2) * (x[j] * sympy.KroneckerDelta(l, i) + sympy.Sum(w[l, m] * ds_prev[m, i, j], (m, 0, n_hidden - 1)))
    assert sympy.simplify(sens.rhs - seed) == 0
    assert sens.indices == (i, j)


def test_gru_sensitivity_indexes_values_inside_the_sum():
    """Seed 003's GRU: the reset gate enters a matrix product, so its tangent is
    needed at the summed-over unit m, and r, h_prev must be indexed there."""
    sens = derivation("gru").sensitivity("h", "b_h")
    inner = [s for s in sens.rhs.atoms(sympy.Sum)]
    assert inner, sens.rhs
    summed = {str(a) for s in inner for a in s.function.atoms(sympy.Indexed)}
    assert any(a.startswith("r[m") for a in summed) and any(a.startswith("h_prev[m") for a in summed)
    bare = sens.rhs.replace(lambda e: isinstance(e, sympy.Indexed), lambda e: sympy.Integer(1)).free_symbols
    assert not {s.name for s in bare} & {"r", "z", "h_prev", "h_tilde"}, bare  # vector values are always indexed


def test_local_partials_use_stored_values():
    der = derivation("lstm_torch")
    # dh/dc = o (1 - tanh(c)^2) through the stored tanh_c; no transcendental recomputed
    o, tanh_c = sympy.symbols("o tanh_c")
    assert der.partial("tanh_c", "c") == 1 - tanh_c**2
    assert der.partial("h", "tanh_c") == o
    for terms in der.partials.values():
        for _, p in terms:
            assert not p.atoms(sympy.Function) - p.atoms(sympy.Symbol), p


def test_seed002_output_gradients():
    """Seed 002: dL^t/dd = -(y^t - yhat^t), dL^t/du = -(y^t - yhat^t) h^t (its y is our target,
    its yhat our y); with L the mean over time, the derivation's pieces give exactly that."""
    der = derivation("single_sigmoid")
    y, target, h = sympy.symbols("y target h")
    dL_dy = dict(der.loss_partials)["y"]
    assert sympy.expand(dL_dy - (-(target - y))) == 0
    assert der.partial("y", "d") == 1
    assert der.partial("y", "u") == h
    assert der.graph.loss.reduction == "mean"  # L = (1/T) sum_t L^t
