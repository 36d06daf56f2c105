r"""Elementwise nonlinearities: every rule of one op in one place.

Each op is a SymPy ``Function`` subclass carrying

* ``derivative(y, a)``: d op(a) / da, written through its output ``y = op(a)``
  and/or its argument ``a`` (sigmoid' = y (1 - y), tanh' = 1 - y**2), so backward
  code reads stored forward values and recomputes no transcendental function
  (softplus is the one exception: its derivative 1 - exp(-y) needs one ``exp``);
  what backward must store follows from the derivative's free symbols;
* ``numpy``: its NumPy spelling, a format string over the argument ``{x}`` and the
  array library ``{xp}`` (``np``, or ``cp``: CuPy has NumPy's functions);
* ``numpy_inplace``: optionally, its NumPy spelling as in-place ufunc calls from
  ``{a}`` into an output array ``{out}`` (``{a}`` may be ``{out}``), so a fused step
  activates a GEMM's output where it lies;
* ``cuda``: its CUDA C spelling, for float (``f`` suffix) and double;
* ``numba``: its spelling in a numba-compiled kernel, over a scalar ``{x}``, the
  constants ``{one}`` and ``{zero}`` of the scalar's type (float32 math stays float32) and
  the backend's own ``{exp}`` and ``{tanh}`` (vectorizable in float32);
* ``latex``: its LaTeX spelling, a format string over the argument ``{x}`` and a mark
  on the function's name ``{mark}``: empty, ``'`` (its derivative, as the seeds write
  sigma'(a)) or a power (``^{2}``: tanh^2(c));
* ``domain``: the open interval (lo, hi) of arguments where the op is defined and
  differentiable (``log`` and ``sqrt``: (0, inf)); the tests draw points inside it, and
  ``symrnn check`` names it when a random instance leaves it (:mod:`symrnn.gradcheck`).

The printers dispatch on :class:`Op` before SymPy's own functions of the same name
(``tanh``, ``exp``), so these rules are the only spellings.
``tests/test_ops.py`` asserts that every op has every rule and that each
derivative agrees with SymPy's derivative of the op's explicit formula.

>>> import sympy
>>> y, a = sympy.symbols("y a")
>>> sigmoid.derivative(y, a)
y*(1 - y)
>>> print(sympy.latex(tanh(a)))
\tanh\left(a\right)
"""

from __future__ import annotations

import sympy

__all__ = ["OPS", "Op", "identity", "relu", "sigmoid", "softplus", "step", "tanh", "exp", "log", "sqrt", "sin", "cos"]


class Op(sympy.Function):
    """Base class of symrnn's elementwise nonlinearities (one argument)."""

    nargs = 1
    #: LaTeX spelling; ``{x}`` is the argument, e.g. ``\sigma\left({x}\right)``.
    latex: str = ""
    #: NumPy spelling; ``{x}`` is the argument, ``{xp}`` the array library.  A complete expression.
    numpy: str = ""
    #: NumPy ufunc calls computing op({a}) into the array ``{out}`` (empty: none)
    numpy_inplace: tuple[str, ...] = ()
    #: CUDA C spelling for (float, double); ``{x}`` is the argument.
    cuda: tuple[str, str] = ("", "")
    #: numba spelling (scalar Python); ``{x}`` the argument, ``{one}``/``{zero}`` typed constants.
    numba: str = ""
    #: explicit formula, used only to verify ``derivative`` in the tests.
    formula = None
    #: the open interval of arguments where the op is defined and differentiable
    domain: tuple[float, float] = (-float("inf"), float("inf"))

    @classmethod
    def derivative(cls, y: sympy.Expr, a: sympy.Expr) -> sympy.Expr:
        """d op(a) / da, written through the output ``y = op(a)`` and the argument ``a``."""
        raise NotImplementedError

    def fdiff(self, argindex: int = 1) -> sympy.Expr:
        return self.derivative(self, self.args[0])

    def _latex(self, printer) -> str:
        return self.latex.format(x=printer._print(self.args[0]), mark="")


class sigmoid(Op):
    latex = r"\sigma{mark}\left({x}\right)"
    # 1 / (1 + exp(-a)): accurate relative to its value for every a (as torch computes it),
    # where (1 + tanh(a/2)) / 2 loses it for a < 0 (and is exactly 0 below a = -17 in float32);
    # exp(-a) = inf gives 0, exactly the limit (the modules compute it under np.errstate(over="ignore"))
    numpy = "(1 / (1 + {xp}.exp(-({x}))))"
    numpy_inplace = ("{xp}.negative({a}, out={out})", "{xp}.exp({out}, out={out})", "{out} += 1",
                     "{xp}.reciprocal({out}, out={out})")
    cuda = ("(1.0f / (1.0f + expf(-({x}))))", "(1.0 / (1.0 + exp(-({x}))))")
    numba = "({one} / ({one} + {exp}(-({x}))))"
    formula = staticmethod(lambda a: 1 / (1 + sympy.exp(-a)))

    @classmethod
    def derivative(cls, y, a):
        return y * (1 - y)


class tanh(Op):
    latex = r"\tanh{mark}\left({x}\right)"
    numpy = "{xp}.tanh({x})"
    numpy_inplace = ("{xp}.tanh({a}, out={out})",)
    cuda = ("tanhf({x})", "tanh({x})")
    numba = "{tanh}({x})"
    formula = staticmethod(sympy.tanh)

    @classmethod
    def derivative(cls, y, a):
        return 1 - y**2


class relu(Op):
    latex = r"\operatorname{{relu}}{mark}\left({x}\right)"
    numpy = "{xp}.maximum({x}, 0)"
    cuda = ("fmaxf({x}, 0.0f)", "fmax({x}, 0.0)")
    numba = "max({x}, {zero})"
    formula = staticmethod(lambda a: sympy.Max(a, 0))

    @classmethod
    def derivative(cls, y, a):
        # relu'(0) = 0, as in PyTorch
        return step(y)


class softplus(Op):
    latex = r"\operatorname{{softplus}}{mark}\left({x}\right)"
    numpy = "{xp}.logaddexp(0, {x})"
    cuda = ("log1pf(expf(-fabsf({x}))) + fmaxf({x}, 0.0f)", "log1p(exp(-fabs({x}))) + fmax({x}, 0.0)")
    numba = "(np.log1p({exp}(-abs({x}))) + max({x}, {zero}))"
    formula = staticmethod(lambda a: sympy.log(1 + sympy.exp(a)))

    @classmethod
    def derivative(cls, y, a):
        # sigma(a) = 1 - exp(-softplus(a)): one exp, the only transcendental
        # function any backward pass recomputes.
        return 1 - exp(-y)


class exp(Op):
    latex = r"\exp{mark}\left({x}\right)"
    numpy = "{xp}.exp({x})"
    cuda = ("expf({x})", "exp({x})")
    numba = "{exp}({x})"
    formula = staticmethod(sympy.exp)

    @classmethod
    def derivative(cls, y, a):
        return y


class identity(Op):
    latex = r"\operatorname{{id}}{mark}\left({x}\right)"
    numpy = "({x})"
    cuda = ("({x})", "({x})")
    numba = "({x})"
    formula = staticmethod(lambda a: a)

    @classmethod
    def eval(cls, a):
        return a

    @classmethod
    def derivative(cls, y, a):
        return sympy.Integer(1)


class step(Op):
    """Heaviside step at y > 0 (step(0) = 0); the derivative of relu."""

    latex = r"\mathbb{{1}}{mark}\left[{x} > 0\right]"
    numpy = "{xp}.heaviside({x}, 0)"
    cuda = ("(({x}) > 0.0f ? 1.0f : 0.0f)", "(({x}) > 0.0 ? 1.0 : 0.0)")
    numba = "({one} if ({x}) > {zero} else {zero})"
    formula = staticmethod(lambda a: sympy.Heaviside(a, 0))

    @classmethod
    def derivative(cls, y, a):
        # zero almost everywhere; only ever needed inside a second derivative
        return sympy.Integer(0)


class log(Op):
    r"""The natural logarithm (log-sigmoid, cross-entropy); defined for a > 0."""

    latex = r"\log{mark}\left({x}\right)"
    numpy = "{xp}.log({x})"
    cuda = ("logf({x})", "log({x})")
    numba = "np.log({x})"
    formula = staticmethod(sympy.log)
    domain = (0.0, float("inf"))

    @classmethod
    def derivative(cls, y, a):
        # through the argument: backward stores a (log(sigmoid(z)) stores sigmoid(z))
        return 1 / a


class sqrt(Op):
    r"""The square root; defined (and differentiable) for a > 0."""

    latex = r"{{\sqrt{{{x}}}}}{mark}"
    numpy = "{xp}.sqrt({x})"
    cuda = ("sqrtf({x})", "sqrt({x})")
    numba = "np.sqrt({x})"
    formula = staticmethod(sympy.sqrt)
    domain = (0.0, float("inf"))

    @classmethod
    def derivative(cls, y, a):
        return 1 / (2 * y)


class sin(Op):
    latex = r"\sin{mark}\left({x}\right)"
    numpy = "{xp}.sin({x})"
    cuda = ("sinf({x})", "sin({x})")
    numba = "np.sin({x})"
    formula = staticmethod(sympy.sin)

    @classmethod
    def derivative(cls, y, a):
        # cos a is not a function of sin a (its sign is lost): backward stores a
        return cos(a)


class cos(Op):
    latex = r"\cos{mark}\left({x}\right)"
    numpy = "{xp}.cos({x})"
    cuda = ("cosf({x})", "cos({x})")
    numba = "np.cos({x})"
    formula = staticmethod(sympy.cos)

    @classmethod
    def derivative(cls, y, a):
        return -sin(a)


#: every op, by the name used in equations (and in spec files)
OPS: dict[str, type[Op]] = {
    op.__name__: op for op in (sigmoid, tanh, relu, softplus, exp, identity, step, log, sqrt, sin, cos)
}
