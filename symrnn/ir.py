"""The step graph: a small, closed, immutable IR between SymPy and the printers.

One time step of a cell, lowered from its equations (:mod:`symrnn.lower`):

* :class:`Leaf`: a value the step reads: the input, a state at t-1, a
  parameter used elementwise (a scalar, a vector or one row block of a vector),
  the loss target.
* :class:`Pointwise`: a node computed unit by unit from other values by a
  SymPy expression.  Every nonlinearity application is its own node, so an
  expression is either ``op(rational)`` or rational, and every derivative is
  rational in stored values.
* :class:`MatVecNode`: a node ``W[rows, cols] @ operand``, or with ``transpose``
  ``W[cols, :].T @ operand`` (``W.T @ v``: its columns range over W's rows).
* :class:`Reduction`: a node ``mean(operand)``, ``sum(operand)`` or
  ``logsumexp(operand)`` over the operand's units, broadcast back (every unit holds
  the reduced value; rules in :mod:`symrnn.reductions`).

Nodes are in topological order; names are unique and deterministic.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, TypeVar, Union

import sympy

from .errors import InternalError
from .init import Init
from .ops import Op
from .reductions import Reduce

LeafKind = Literal["input", "prev_state", "param", "target"]
Role = Literal["intermediate", "state", "readout", "auxiliary"]


@dataclass(frozen=True)
class ParamDecl:
    name: str
    shape: tuple[sympy.Expr, ...]
    blocks: int = 1
    init: Init | None = None  # None: the default, uniform(-1/sqrt(n_hidden), 1/sqrt(n_hidden))

    @property
    def kind(self) -> str:
        return ("scalar", "vector", "matrix")[len(self.shape)]

    @property
    def block_rows(self) -> sympy.Expr:
        return self.shape[0] / self.blocks


@dataclass(frozen=True)
class Leaf:
    name: str
    kind: LeafKind
    size: sympy.Expr | None  # None: a scalar, broadcast over units
    param: str = ""  # kind == "param": the declared parameter
    block: int | None = None  # kind == "param": its row block, if any
    state: str = ""  # kind == "prev_state": the state


@dataclass(frozen=True)
class Pointwise:
    name: str
    size: sympy.Expr
    expr: sympy.Expr
    role: Role
    equation: str  # the cell equation this node implements (or is part of)

    @property
    def deps(self) -> tuple[str, ...]:
        return tuple(sorted(s.name for s in self.expr.free_symbols))

    @property
    def op(self) -> type[Op] | None:
        """The nonlinearity if the node is ``op(argument)``."""
        return type(self.expr) if isinstance(self.expr, Op) else None


@dataclass(frozen=True)
class MatVecNode:
    name: str
    size: sympy.Expr
    param: str
    block: int | None  # row block of ``param``; None: all rows
    cols: tuple[sympy.Expr, sympy.Expr]  # column range [start, stop) of the operand
    operand: str
    role: Role
    equation: str
    #: ``W.T @ operand``: the node has W's column count of entries, and ``cols`` range over
    #: W's rows (a transposed product has no row block)
    transpose: bool = False

    @property
    def deps(self) -> tuple[str, ...]:
        return (self.operand,)


@dataclass(frozen=True)
class Reduction:
    """``reduce(operand)`` over the operand's units, broadcast back to its size.  The operand
    is always a node (lowering wraps a leaf in an auxiliary node)."""

    name: str
    size: sympy.Expr  # the operand's size (the value is broadcast back over its units)
    reduce: type[Reduce]
    operand: str
    role: Role
    equation: str

    @property
    def deps(self) -> tuple[str, ...]:
        return (self.operand,)

    def weight(self) -> sympy.Expr:
        """d self / d operand_j at every unit j (symrnn.reductions)."""
        return self.reduce.weight(sympy.Symbol(self.operand), sympy.Symbol(self.name), self.size)


@dataclass(frozen=True)
class DerivedMatrix:
    """A matrix formed from parameters once per call, ``M = sum_k c_k P_k`` (each ``P_k`` a
    whole matrix parameter or its transpose, each ``c_k`` a number): the weight of the one
    product a cell's combination of matrices makes (``(W - W.T - gamma * I) @ h`` is
    ``M h - gamma h`` with ``M = W - W^T``: one product per step, not one per matrix).  A
    product node reads it as it reads a parameter; it has no gradient of its own in a module:
    dL/dP_k += c_k dL/dM (its transpose for a transposed term)."""

    name: str
    shape: tuple[sympy.Expr, sympy.Expr]
    terms: tuple[tuple[sympy.Expr, str, bool], ...]  # (c_k, parameter, transposed)

    @property
    def decl(self) -> ParamDecl:
        return ParamDecl(self.name, self.shape)


Node = Union[Pointwise, MatVecNode, Reduction]
#: every kind of node; each stage that treats nodes by kind has a rule for each (tests/test_rules.py)
NODE_KINDS: tuple[type, ...] = (Pointwise, MatVecNode, Reduction)

T = TypeVar("T")


def rule(table: Mapping[type, T], node, what: str) -> T:
    """The rule of ``table`` for ``node``'s kind; a kind without one is a bug, never a default.

    >>> rule({Pointwise: "elementwise"}, MatVecNode("m", 1, "W", None, (0, 1), "x", "auxiliary", "m"), "adjoint")
    Traceback (most recent call last):
      ...
    symrnn.errors.InternalError: internal error (a bug in symrnn, please report it): no adjoint rule for a MatVecNode node ('m')
    """
    try:
        return table[type(node)]
    except KeyError:
        raise InternalError(f"no {what} rule for a {type(node).__name__} node ('{node.name}')") from None


@dataclass(frozen=True)
class StateDecl:
    name: str
    size: sympy.Expr
    prev: str  # name of the leaf holding its value at t-1
    init: Init | None = None  # how check (and init_state0) draws its initial value; None: 0


@dataclass(frozen=True)
class LossIR:
    expr: sympy.Expr  # per unit, in readout/state names and the target
    reduction: Literal["sum", "mean"]
    target: str  # the target leaf's name
    target_of: str  # the readout it is compared with


@dataclass(frozen=True)
class StepGraph:
    cell: str
    source: str
    description: str
    dims: tuple[tuple[str, int | None], ...]  # (dimension, fixed value or None)
    input: Leaf
    states: tuple[StateDecl, ...]
    params: tuple[ParamDecl, ...]
    leaves: tuple[Leaf, ...]
    nodes: tuple[Node, ...]
    readouts: tuple[str, ...]
    loss: LossIR | None
    equations: tuple[tuple[str, sympy.Expr], ...]  # the user's equations, for documents
    warnings: tuple[str, ...] = ()
    derived: tuple[DerivedMatrix, ...] = ()  # matrices formed from the parameters once per call

    # -- lookups -----------------------------------------------------------
    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    def leaf(self, name: str) -> Leaf:
        for leaf in self.leaves:
            if leaf.name == name:
                return leaf
        raise KeyError(name)

    def param(self, name: str) -> ParamDecl:
        """A parameter's declaration, or a derived matrix's (its name and shape)."""
        for p in self.params:
            if p.name == name:
                return p
        return self.derived_matrix(name).decl

    def derived_matrix(self, name: str) -> DerivedMatrix:
        for d in self.derived:
            if d.name == name:
                return d
        raise KeyError(name)

    def weight_terms(self, node: "MatVecNode") -> tuple[tuple[sympy.Expr, str, bool], ...]:
        """The parameters a product's weight is made of, as (coefficient, parameter,
        transposed): its own parameter, or a derived matrix's terms."""
        if self.is_derived(node.param):
            return self.derived_matrix(node.param).terms
        return ((sympy.Integer(1), node.param, node.transpose),)

    def is_derived(self, name: str) -> bool:
        return any(d.name == name for d in self.derived)

    def is_leaf(self, name: str) -> bool:
        return any(leaf.name == name for leaf in self.leaves)

    def size(self, name: str) -> sympy.Expr | None:
        return self.leaf(name).size if self.is_leaf(name) else self.node(name).size

    def consumers(self, name: str) -> tuple[Node, ...]:
        return tuple(n for n in self.nodes if name in n.deps)

    @property
    def state_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.states)

    @property
    def outputs(self) -> tuple[str, ...]:
        """Per-step outputs of ``forward``: every state, then every readout."""
        return self.state_names + self.readouts

    def verify(self) -> None:
        """Check the IR's invariants; raise InternalError naming the bad node."""
        known = {leaf.name for leaf in self.leaves}
        for n in self.nodes:
            if n.name in known:
                raise InternalError(f"node '{n.name}' of cell '{self.cell}' is defined twice")
            for d in n.deps:
                if d not in known:
                    raise InternalError(f"node '{n.name}' of cell '{self.cell}' reads '{d}' before it is defined")
            if isinstance(n, Pointwise):
                for sub in sympy.preorder_traversal(n.expr):
                    if isinstance(sub, Op) and sub is not n.expr:
                        raise InternalError(f"node '{n.name}': nested nonlinearity {sub}")
            known.add(n.name)
        for s in self.states:
            if s.name not in known:
                raise InternalError(f"state '{s.name}' of cell '{self.cell}' has no node")
