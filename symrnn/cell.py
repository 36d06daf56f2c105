"""The cell definition API: a recurrent cell as SymPy expressions, per unit.

A cell names its inputs, states and parameters with their (symbolic) sizes and
gives, in order, the equations of one time step.  Equations are scalar SymPy
expressions for one unit; a parameter matrix times a vector (``W @ x``) is a
special atom, so elementwise calculus is plain ``sympy.diff`` and the linear
parts follow fixed rules (adjoint ``W^T delta``, gradient ``delta x^T``).

Names inside expressions are resolved by name: ``h_prev`` is state ``h`` at
t-1, ``h`` (once its update equation has been given) is its new value,
``target`` is the target in the loss.

>>> import sympy
>>> from symrnn import Cell, Loss, params, tanh
>>> x, s_prev, s, z, y, target = sympy.symbols("x s_prev s z y target")
>>> U, W, V = params("U W V")
>>> cell = Cell(
...     name="tiny",
...     inputs={"x": "n_in"},
...     states={"s": "n_hidden"},
...     params={"U": ("n_hidden", "n_in"), "W": ("n_hidden", "n_hidden"),
...             "V": ("n_out", "n_hidden")},
...     equations={"z": U @ x + W @ s_prev, "s": tanh(z)},
...     readout={"y": V @ s},
...     loss=Loss((y - target) ** 2),
... )
>>> cell.equations["s"]
tanh(z)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Literal, Union

import sympy

if TYPE_CHECKING:  # symrnn.init imports DIMS from here
    from .init import Init

__all__ = ["Block", "Cell", "I", "Identity", "Loss", "MatVec", "Param", "ParamSymbol", "State", "Transpose", "matvec",
           "params", "DIMS"]

#: the dimension symbols sizes are written in
DIMS: dict[str, sympy.Symbol] = {
    name: sympy.Symbol(name, integer=True, positive=True) for name in ("n_in", "n_hidden", "n_out")
}

SizeLike = Union[str, int, sympy.Expr]


class MatVec(sympy.Function):
    """``W @ v``: a parameter matrix (or one row block of it) times a vector.

    ``MatVec(W, Tuple(v1, v2))`` multiplies W by the concatenation [v1; v2]
    (as seed 003 writes W [h_{t-1}; x_t]); ``MatVec(Block(W, k), Tuple(v))``
    uses row block k of W (PyTorch stacks its gates that way).
    """

    nargs = 2

    def _sympystr(self, printer) -> str:
        weight, operands = self.args
        vec = printer._print(operands[0]) if len(operands) == 1 else "[" + "; ".join(printer._print(v) for v in operands) + "]"
        if len(operands) == 1 and isinstance(operands[0], (sympy.Add, sympy.Mul)):
            vec = f"({vec})"
        mat = printer._print(weight)
        if isinstance(weight, (sympy.Add, sympy.Mul)):
            mat = f"({mat})"
        return f"{mat} @ {vec}"

    def _latex(self, printer) -> str:
        weight, operands = self.args
        parts = [printer._print(v) for v in operands]
        vec = parts[0] if len(parts) == 1 else r"\begin{bmatrix}" + r" \\ ".join(parts) + r"\end{bmatrix}"
        mat = printer._print(weight)
        if isinstance(weight, (sympy.Add, sympy.Mul)):  # a combination: (W - W^T - gamma I) h
            mat = rf"\left({mat}\right)"
        return f"{mat} {vec}"


class Transpose(sympy.Function):
    """``W.T``: the transpose of a parameter matrix, in ``W.T @ v`` (and in a combination
    before ``@``, ``(W - W.T) @ v``)."""

    nargs = 1

    def __matmul__(self, other):
        return MatVec(self, _operands(other))

    def _sympystr(self, printer) -> str:
        return f"{printer._print(self.args[0])}.T"

    def _latex(self, printer) -> str:
        return f"{printer._print(self.args[0])}^{{\\top}}"


class Identity(sympy.Symbol):
    """The identity matrix ``I``, in a linear combination of matrices before ``@``:
    ``matvec(W - W.T - gamma * I, h)`` (in a spec file, ``(W - W.T - gamma * I) @ h``)."""

    def __new__(cls):
        return super().__new__(cls, "I")

    def __getnewargs__(self):
        return ()

    def _latex(self, printer) -> str:
        return "I"


#: the identity matrix (of the size of the vector it multiplies)
I = Identity()


def matvec(weight: sympy.Expr, vector) -> "MatVec":
    """``weight @ vector`` for a weight that is a linear combination of parameter matrices,
    their transposes and ``I`` (``matvec(W - W.T - gamma * I, h)``: SymPy's sums have no ``@``);
    the coefficients are numbers or scalar parameters."""
    if isinstance(weight, str):  # never parsed: text would be evaluated by sympify
        raise TypeError(f"matvec({weight!r}, ...): the weight must be a SymPy expression, not a string")
    return MatVec(sympy.sympify(weight, strict=True), _operands(vector))


class Block(sympy.Function):
    """Row block ``k`` of a parameter declared with ``Param(..., blocks=n)``."""

    nargs = 2

    def __matmul__(self, other):
        return MatVec(self, _operands(other))

    def _sympystr(self, printer) -> str:
        return f"{printer._print(self.args[0])}[{self.args[1]}]"

    def _latex(self, printer) -> str:
        return f"{printer._print(self.args[0])}_{{[{self.args[1]}]}}"


class ParamSymbol(sympy.Symbol):
    """A parameter's symbol: supports ``W @ x``, ``W @ (h_prev, x)``, ``W[k]`` and ``W.T``."""

    #: not a sequence, although W[k] is a row block (SymPy would iterate W[0], W[1], ... for ever)
    _iterable = False

    def __matmul__(self, other):
        return MatVec(self, _operands(other))

    @property
    def T(self) -> Transpose:
        return Transpose(self)

    def __getitem__(self, k: int) -> Block:
        return Block(self, sympy.Integer(k))


def _operands(other) -> sympy.Tuple:
    items = other if isinstance(other, (tuple, list)) else (other,)
    for v in items:
        if isinstance(v, str):  # never parsed: text would be evaluated by sympify
            raise TypeError(f"W @ {v!r}: the operand must be a SymPy expression, not a string")
    return sympy.Tuple(*[sympy.sympify(v, strict=True) for v in items])


def params(names: str) -> tuple[ParamSymbol, ...]:
    """Parameter symbols from a space-separated string: ``params("U W V")``."""
    return tuple(ParamSymbol(n) for n in names.split())


@dataclass(frozen=True)
class Param:
    """A parameter declaration: shape in dimension symbols, optional row blocks and initializer.

    ``Param(("4*n_hidden", "n_in"), blocks=4)`` is PyTorch's ``weight_ih_l0``
    of an LSTM: four row blocks of n_hidden rows, used as ``W[0] @ x`` ...
    ``W[3] @ x``.  A shape of ``()`` is a scalar parameter.  ``init`` (text such as
    ``"uniform(0.9, 0.999)"``, or a :class:`symrnn.init.Init`) is how ``init_params``
    draws it and where ``symrnn check`` draws it; the default is PyTorch's
    uniform(-1/sqrt(n_hidden), 1/sqrt(n_hidden)).
    """

    shape: tuple[SizeLike, ...]
    blocks: int = 1
    init: Union[str, "Init", None] = None


@dataclass(frozen=True)
class State:
    """A state declaration with an initializer for its initial value.

    ``State("n_hidden", init="uniform(0.5, 1.5)")``: ``symrnn check`` draws the
    initial state there (a normaliser that must stay away from 0), and the generated
    module's ``init_state0`` draws it so; a state given by its size alone starts at 0.
    """

    size: SizeLike
    init: Union[str, "Init", None] = None


@dataclass(frozen=True)
class Loss:
    """Per-step loss: ``expr`` summed over units and the batch, then reduced over time.

    ``expr`` is written per unit in the readout names and ``target``;
    ``reduction`` is ``"sum"`` or ``"mean"`` over time steps.
    """

    expr: sympy.Expr
    reduction: Literal["sum", "mean"] = "sum"
    #: the readout the target is compared with (its size is the target's size)
    target_of: str = "y"


@dataclass(frozen=True)
class Cell:
    """A recurrent cell: one time step as ordered per-unit equations.

    ``equations`` holds intermediates (gates, pre-activations) and one update
    per state, in order; ``readout`` the per-step outputs computed from the new
    states; ``dims`` pins dimensions to fixed values (``{"n_in": 1}``).
    ``source`` says where the equations come from (a paper, a seed document;
    it heads the generated modules and documents); ``description`` is one
    line about the cell (``symrnn list``, ``symrnn show``); ``constants`` the
    named numbers the equations were written with (an equations file's
    ``[constants]``, already substituted into ``equations``: claims about the
    cell may use their names).
    """

    name: str
    inputs: Mapping[str, SizeLike]
    states: Mapping[str, Union[SizeLike, State]]
    params: Mapping[str, Union[Param, tuple]]
    equations: Mapping[str, sympy.Expr]
    readout: Mapping[str, sympy.Expr] = field(default_factory=dict)
    loss: Loss | None = None
    dims: Mapping[str, int] = field(default_factory=dict)
    source: str = ""
    description: str = ""
    constants: Mapping[str, sympy.Expr] = field(default_factory=dict)

    def __post_init__(self):
        for name in ("inputs", "states", "params", "equations", "readout", "dims", "constants"):
            object.__setattr__(self, name, MappingProxyType(dict(getattr(self, name))))
        decls = {
            k: v if isinstance(v, Param) else Param(tuple(v)) for k, v in self.params.items()
        }
        object.__setattr__(self, "params", MappingProxyType(decls))

    def summary(self) -> str:
        """One line: name, source, description."""
        src = f" [{self.source}]" if self.source else ""
        return f"{self.name}{src}: {self.description}".rstrip(": ")

    def equations_text(self) -> str:
        """The equations as plain text, one per line (``symrnn show``)."""
        lines = [f"cell {self.name}" + (f"  ({self.source})" if self.source else "")]
        if self.description:
            lines.append(f"  {self.description}")
        sizes = ", ".join(f"{k} in R^{v.size if isinstance(v, State) else v}" for k, v in {**self.inputs, **self.states}.items())
        lines.append(f"  sizes: {sizes}")
        shapes = ", ".join(
            f"{k}: ({', '.join(str(s) for s in p.shape)})" + (f" in {p.blocks} row blocks" if p.blocks > 1 else "")
            for k, p in self.params.items()
        )
        lines.append(f"  params: {shapes}")
        inits = [f"{k} ~ {_init_text(v.init)}" for k, v in {**self.params, **self.states}.items() if isinstance(v, (Param, State)) and v.init is not None]
        if inits:
            lines.append("  init: " + ", ".join(inits))
        if self.dims:
            lines.append("  fixed: " + ", ".join(f"{k} = {v}" for k, v in self.dims.items()))
        for kind, eqs in (("step", self.equations), ("readout", self.readout)):
            for lhs, rhs in eqs.items():
                lines.append(f"  {kind:8s} {lhs} = {_plain(rhs)}")
        if self.loss is not None:
            lines.append(f"  loss     L^t = {_plain(self.loss.expr)};  L = {self.loss.reduction} over t of L^t")
        return "\n".join(lines)


def _init_text(init) -> str:
    from .escape import shown
    from .init import as_init

    try:
        return as_init(init).text
    except ValueError:
        return shown(str(init), 40)


def _plain(expr: sympy.Expr) -> str:
    return sympy.sstr(expr)
