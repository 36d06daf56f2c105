"""Every nonlinearity has every rule, and its derivative through its output is right."""

from __future__ import annotations

import numpy as np
import pytest
import sympy

from symrnn.ops import OPS, Op, step


@pytest.mark.parametrize("name", sorted(OPS))
def test_every_op_has_every_rule(name):
    op = OPS[name]
    assert issubclass(op, Op)
    assert "{x}" in op.latex and "{mark}" in op.latex and "{x}" in op.numpy and "np." not in op.numpy and "np." not in "".join(op.numpy_inplace)
    assert len(op.cuda) == 2 and all("{x}" in c for c in op.cuda)
    assert all("{out}" in call for call in op.numpy_inplace) and (not op.numpy_inplace or "{a}" in op.numpy_inplace[0])
    assert op.formula is not None
    y, a = sympy.symbols("y a")
    assert isinstance(op.derivative(y, a), sympy.Expr)


def inside(op, values):
    """``values`` (points around 0) moved into the op's domain: as they are on the whole
    line, shifted past the lower end of a half line (log, sqrt: (0, inf))."""
    lo, hi = op.domain
    assert lo < hi and (lo == -np.inf or hi == np.inf), op.__name__
    values = np.asarray(values, dtype=np.float64)
    return values if lo == -np.inf else lo + 0.05 + values - values.min()


@pytest.mark.parametrize("name", sorted(OPS))
def test_every_op_has_an_open_domain_and_is_finite_inside_it(name):
    op = OPS[name]
    a = inside(op, np.linspace(-3, 3, 13))
    assert op.domain[0] < a.min() and a.max() < op.domain[1]
    with np.errstate(all="raise"):
        assert np.all(np.isfinite(eval(op.numpy.format(x="a", xp="np"), {"np": np, "a": a})))  # noqa: S307


@pytest.mark.parametrize("name", sorted(n for n, op in OPS.items() if op.domain[0] > -np.inf))
def test_an_op_of_a_half_line_is_not_finite_outside_it(name):
    """log and sqrt: the check's random instance must stay inside (symrnn.gradcheck names the domain)."""
    op = OPS[name]
    with np.errstate(all="ignore"):
        value = eval(op.numpy.format(x="a", xp="np"), {"np": np, "a": np.array([op.domain[0] - 0.5])})  # noqa: S307
    assert not np.all(np.isfinite(value))


@pytest.mark.parametrize("name", sorted(set(OPS) - {"step"}))
def test_derivative_through_output(name):
    op = OPS[name]
    a = sympy.Symbol("a", real=True)
    exact = sympy.diff(op.formula(a), a)
    through_output = op.derivative(op.formula(a), a)
    for value in inside(op, (-2.3, -0.4, 0.7, 1.9)):
        value = float(value)
        lhs = float(exact.subs(a, value).rewrite(sympy.Piecewise).evalf()) if name == "relu" else float(exact.subs(a, value))
        assert abs(lhs - float(through_output.subs(a, value).replace(step, lambda u: sympy.Heaviside(u, 0)))) < 1e-12


@pytest.mark.parametrize("name", sorted(set(OPS) - {"step", "identity"}))
def test_numpy_spelling_matches_formula(name):
    op = OPS[name]
    a = inside(op, np.linspace(-3, 3, 13))
    code = op.numpy.format(x="a", xp="np")
    got = eval(code, {"np": np, "a": a})  # noqa: S307 - our own format string
    want = np.array([float(op.formula(sympy.Float(v))) for v in a])
    np.testing.assert_allclose(got, want, rtol=1e-14, atol=1e-15)


def test_backward_recomputes_no_transcendental():
    """Derivatives of sigmoid, tanh, relu, identity, exp are rational in the output."""
    y = sympy.Symbol("y")
    for name in ("sigmoid", "tanh", "relu", "identity", "exp"):
        d = OPS[name].derivative(y, sympy.Symbol("a"))
        assert not d.atoms(sympy.exp, sympy.tanh, sympy.log), name


@pytest.mark.parametrize("name", sorted(name for name, op in OPS.items() if op.numpy_inplace))
def test_numpy_inplace_spelling_matches_the_expression(name):
    op = OPS[name]
    a = np.linspace(-3, 3, 13)
    out = a.copy()
    for call in op.numpy_inplace:  # in place, and from a into another array
        exec(call.format(a="out", out="out", xp="np"), {"np": np, "out": out})  # noqa: S102 - our own format strings
    other = np.empty_like(a)
    for call in op.numpy_inplace:
        exec(call.format(a="a", out="other", xp="np"), {"np": np, "a": a, "other": other})  # noqa: S102
    want = eval(op.numpy.format(x="a", xp="np"), {"np": np, "a": a})  # noqa: S307
    np.testing.assert_array_equal(out, want)
    np.testing.assert_array_equal(other, want)


@pytest.mark.parametrize("name", sorted(OPS))
def test_latex_spelling_compiles_into_the_printer(name):
    a = sympy.Symbol("a")
    text = sympy.latex(OPS[name](a + 1))
    assert "a + 1" in text and "{x}" not in text
