"""Initializers: how a parameter or an initial state is drawn, written as text, never evaluated.

A declaration such as ``init = "uniform(0.9, 0.999)"`` (a spec file) or
``Param(("n_hidden",), init="uniform(0.9, 0.999)")`` (Python) says how the
generated module's ``init_params`` draws the parameter, and where ``symrnn check``
draws its random instance (a cell that only works for some values, such as a
decay in (0, 1), is checked there).  One of:

* ``uniform(low, high)``: uniformly in [low, high), low < high;
* ``normal(mean, std)``: normally distributed, std > 0;
* ``constant(value)``: every entry ``value`` (draws nothing).

Each argument is a number or a small constant expression: numbers, the dimensions
``n_in``, ``n_hidden``, ``n_out``, ``sqrt(...)``, ``+ - * /`` and parentheses
(``-1/sqrt(n_hidden)``, ``sqrt(6 / (n_in + n_hidden))``).  The text is parsed with
:mod:`ast` and the tree is checked against that list; a SymPy expression is built
from it node by node (for the checks: low < high and std > 0 for every size, no
division by a value that may be 0, no square root of a value that may be
negative) and the module's code is printed from the same tree.

>>> init = parse_init("uniform(-1/sqrt(n_hidden), 1/sqrt(n_hidden))")
>>> init.text
'uniform(-1 / sqrt(n_hidden), 1 / sqrt(n_hidden))'
>>> init.code('shapes["W"]')
'rng.uniform(-1 / np.sqrt(n_hidden), 1 / np.sqrt(n_hidden), shapes["W"])'
>>> check_init(parse_init("uniform(0.999, 0.9)"))
Traceback (most recent call last):
...
ValueError: init 'uniform(0.999, 0.9)': needs low < high, got low = 0.999, high = 0.9
"""

from __future__ import annotations

import ast
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import sympy

from .cell import DIMS
from .escape import shown

__all__ = ["INIT_KINDS", "Init", "parse_init", "check_init", "as_init"]

#: kind -> the names of its arguments
INIT_KINDS: dict[str, tuple[str, ...]] = {"uniform": ("low", "high"), "normal": ("mean", "std"), "constant": ("value",)}
#: the longest init text accepted (characters)
MAX_INIT = 200
#: the largest number an init may hold
MAX_NUMBER = 1e300

_HELP = ('an init is uniform(low, high), normal(mean, std) or constant(value); each argument a number or '
         'a constant expression in numbers, n_in, n_hidden, n_out, sqrt(...), + - * / (e.g. -1/sqrt(n_hidden))')


@dataclass(frozen=True)
class Init:
    """A checked initializer: its kind and the canonical text of each argument.

    Made by :func:`parse_init` (from text) or :func:`as_init`."""

    kind: Literal["uniform", "normal", "constant"]
    args: tuple[str, ...]

    @property
    def text(self) -> str:
        """The initializer as it is shown (``uniform(0.9, 0.999)``)."""
        return f"{self.kind}({', '.join(self.args)})"

    def __str__(self) -> str:
        return self.text

    def code(self, shape: str) -> str:
        """NumPy code for an array of shape ``shape`` drawn from the generator ``rng``
        (``constant`` draws nothing); the dimensions are the variables n_in, n_hidden, n_out."""
        args = [_code(_tree(a)) for a in self.args]
        if self.kind == "constant":
            return f"np.full({shape}, {args[0]})"
        return f"rng.{self.kind}({', '.join(args)}, {shape})"

    def values(self, fixed: Mapping[sympy.Symbol, sympy.Expr] | None = None) -> tuple[sympy.Expr, ...]:
        """The arguments as SymPy expressions in the dimensions (``fixed`` substituted)."""
        return tuple(_build(_tree(a), a, dict(fixed or {})) for a in self.args)


def parse_init(text: str) -> Init:
    """Init text -> :class:`Init`, read with :mod:`ast` against the allow-list (never
    evaluated).  Raises ValueError saying what is wrong."""
    if not isinstance(text, str):
        raise ValueError(f"an init is written as text such as \"uniform(0.9, 0.999)\", got {type(text).__name__}")
    if len(text) > MAX_INIT:
        raise ValueError(f"init {shown(text, 40)} is too long (at most {MAX_INIT} characters)")
    try:
        tree = ast.parse("(" + text.strip() + ")", mode="eval").body
    except (SyntaxError, ValueError):
        raise ValueError(f"init {shown(text)} cannot be read; {_HELP}") from None
    if not (isinstance(tree, ast.Call) and isinstance(tree.func, ast.Name)):
        raise ValueError(f"init {shown(text)} is not allowed; {_HELP}")
    kind = tree.func.id
    if kind not in INIT_KINDS:
        raise ValueError(f"init {shown(text)}: unknown initializer '{kind}' (allowed: {', '.join(INIT_KINDS)})")
    names = INIT_KINDS[kind]
    if tree.keywords or any(isinstance(a, ast.Starred) for a in tree.args) or len(tree.args) != len(names):
        raise ValueError(f"init {shown(text)}: {kind} takes {len(names)} argument{'s' * (len(names) > 1)} "
                         f"({', '.join(names)}), written in order without names")
    args = []
    for node in tree.args:
        _build(node, text, {})  # refuses what is not allowed, naming it
        args.append(ast.unparse(node))
    return Init(kind, tuple(args))


def as_init(value) -> Init:
    """An init given as text or as an :class:`Init` -> a checked :class:`Init` (ValueError if bad)."""
    if isinstance(value, Init):
        if value.kind not in INIT_KINDS or not isinstance(value.args, tuple) or not all(isinstance(a, str) for a in value.args):
            raise ValueError(f"not a valid Init: {value!r}; make one with parse_init(\"uniform(0.9, 0.999)\")")
        return parse_init(value.text)
    return parse_init(value)


def check_init(init: Init, fixed: Mapping[sympy.Symbol, sympy.Expr] | None = None) -> None:
    """The rules that hold for every size (with ``fixed`` dimensions substituted):
    low < high, std > 0, finite numbers.  Raises ValueError saying which is broken."""
    values = init.values(fixed)
    names = INIT_KINDS[init.kind]
    for name, arg, value in zip(names, init.args, values):
        probe = value.subs({d: 1 for d in DIMS.values()})
        if not (probe.is_finite and abs(float(probe)) <= MAX_NUMBER):
            raise ValueError(f"init '{init.text}': {name} = {arg} is not a finite number of at most {MAX_NUMBER:g}")
    if init.kind == "uniform":
        low, high = values
        if (high - low).is_positive is not True:
            sure = (high - low).is_nonpositive is True
            raise ValueError(f"init '{init.text}': needs low < high" + (
                f", got low = {init.args[0]}, high = {init.args[1]}" if sure else
                " for every size, and that cannot be shown for this low and high; write bounds whose order does not "
                "depend on the sizes"))
    elif init.kind == "normal" and values[1].is_positive is not True:
        raise ValueError(f"init '{init.text}': needs std > 0" + (
            f", got std = {init.args[1]}" if values[1].is_nonpositive is True else " for every size"))


# -- the argument allow-list ------------------------------------------------------
def _tree(arg: str) -> ast.expr:
    return ast.parse(arg, mode="eval").body


def _build(node: ast.AST, text: str, fixed: dict) -> sympy.Expr:
    """One argument's tree -> SymPy, refusing anything outside the allow-list."""
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        value = node.value
        if not (math.isfinite(value) and abs(value) <= MAX_NUMBER):
            raise ValueError(f"init {shown(text)}: {value!r} is not a finite number of at most {MAX_NUMBER:g}")
        return sympy.Integer(value) if type(value) is int else sympy.Float(value)
    if isinstance(node, ast.Name) and node.id in DIMS:
        return fixed.get(DIMS[node.id], DIMS[node.id])
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _build(node.operand, text, fixed)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult, ast.Div)):
        left, right = _build(node.left, text, fixed), _build(node.right, text, fixed)
        if isinstance(node.op, ast.Div):
            if right.is_zero is not False:
                raise ValueError(f"init {shown(text)}: divides by {ast.unparse(node.right)}, which may be 0")
            return left / right
        if isinstance(node.op, ast.Add):
            return left + right
        return left - right if isinstance(node.op, ast.Sub) else left * right
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "sqrt"
            and len(node.args) == 1 and not node.keywords and not isinstance(node.args[0], ast.Starred)):
        value = _build(node.args[0], text, fixed)
        if value.is_nonnegative is not True:
            raise ValueError(f"init {shown(text)}: sqrt({ast.unparse(node.args[0])}) of a value that may be negative")
        return sympy.sqrt(value)
    if isinstance(node, ast.Name):
        raise ValueError(f"init {shown(text)}: unknown name '{node.id}' (an argument may use n_in, n_hidden, n_out "
                         "and sqrt)")
    try:
        what = ast.unparse(node)
    except Exception:  # pragma: no cover - every parsed node unparses
        what = type(node).__name__
    raise ValueError(f"init {shown(text)}: {shown(what, 40)} is not allowed in an argument; {_HELP}")


def _code(node: ast.expr) -> str:
    """An argument as NumPy code: the same tree, sqrt spelled np.sqrt."""

    class _NumpySqrt(ast.NodeTransformer):
        def visit_Call(self, call: ast.Call):
            self.generic_visit(call)
            call.func = ast.Attribute(value=ast.Name(id="np", ctx=ast.Load()), attr="sqrt", ctx=ast.Load())
            return call

    return ast.unparse(_NumpySqrt().visit(node))
