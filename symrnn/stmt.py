"""Statements as data: a small, closed, frozen IR of what a generated module computes.

The backends build their functions from these objects instead of strings, so what
a statement reads and writes is known without reading code back (``reads``,
``writes``), passes can rewrite statements, and one printer per backend spells
them.  Values:

* :class:`Ref`: an array by its generated name (symrnn.naming), optionally indexed
  (``h_seq[t + 1]``, ``buf[:, a:b]``) or transposed (``W.T``);
* :class:`Elementwise`: a SymPy expression whose free symbols stand for refs
  (``refs``) or for names of the module (``h_prev``, ``d_h``);
* :class:`Call` (a function of the array library: ``dot``, ``sum``, ...), :class:`Helper`
  (a function of the module: ``_seed``, ``_add_matrix``), :class:`MatMul` (``a @ b``),
  :class:`Reshape`, :class:`Concat`, :class:`Size` (a size in n_in, n_hidden, n_out, T, B),
  :class:`Text` (a literal the printer writes as it is: a key, ``dtype``).

Statements: :class:`Assign`, :class:`Update` (``+=``, ``*=``), :class:`Do` (a call for
its effect: ``np.dot(a, b, out=c)``), :class:`OpCall` (one of an op's in-place ufunc
calls, :attr:`symrnn.ops.Op.numpy_inplace`), :class:`If`, :class:`Loop`, :class:`Comment`.
:func:`verify` names a malformed statement; :func:`dump` prints statements as plain
text for debugging and golden tests.

>>> import sympy
>>> s = Assign(Ref("h"), Elementwise(sympy.Symbol("a") + 1, (("a", Ref("a_seq", (t_SYM,))),)), "eq:x:h")
>>> sorted(s.reads), sorted(s.writes)
(['a_seq', 't'], ['h'])
>>> print(dump([s]))
h = a + 1  [a = a_seq[t]]  # eq:x:h
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
import dataclasses
from dataclasses import dataclass, replace
from typing import Union

import sympy

from .errors import InternalError

__all__ = [
    "T_SYM", "B_SYM", "t_SYM", "t0_SYM", "t1_SYM", "ALL", "ETC", "NEW", "Span", "Ref", "Elementwise", "Call", "Helper", "MatMul", "Reshape",
    "Concat", "Size", "Text", "Key", "Infix", "Paren", "Attr", "Method", "Index", "Dict", "Assign", "Update", "Do", "OpCall",
    "If", "Loop", "Comment", "Stmt", "Value", "verify", "span", "empty",
    "dump", "reads_of", "writes_of", "rewrite_values", "rewrite_stmt", "refs_read",
]

#: the symbols of the time axis: T steps, B rows, step t, the steps t0 .. t1 - 1 of a block
T_SYM, B_SYM = sympy.Symbol("T"), sympy.Symbol("B")
t_SYM, t0_SYM, t1_SYM = sympy.Symbol("t"), sympy.Symbol("t0"), sympy.Symbol("t1")


class _Marker(str):
    """An index item that is not a position: ``:`` (the whole axis), ``...``, ``None``."""


ALL, ETC, NEW = _Marker(":"), _Marker("..."), _Marker("None")


@dataclass(frozen=True)
class Span:
    """``lo:hi`` on one axis (None: that end open)."""

    lo: sympy.Expr | None = None
    hi: sympy.Expr | None = None

    def __post_init__(self):
        for end in ("lo", "hi"):
            if isinstance(getattr(self, end), int):
                object.__setattr__(self, end, sympy.Integer(getattr(self, end)))


IndexItem = Union[sympy.Expr, Span, _Marker]


@dataclass(frozen=True)
class Ref:
    """An array (a name the module's namer gave), or a part of it."""

    name: str
    index: tuple[IndexItem, ...] = ()
    T: bool = False  # transposed (``.T``)

    def __getitem__(self, index) -> "Ref":
        items = index if isinstance(index, tuple) else (index,)
        items = tuple(sympy.sympify(i) if isinstance(i, int) else i for i in items)
        if self.index:
            raise InternalError(f"'{self.name}' is indexed twice")
        return Ref(self.name, items, self.T)

    @property
    def t(self) -> "Ref":
        return Ref(self.name, self.index, not self.T)


@dataclass(frozen=True)
class Elementwise:
    """A SymPy expression; ``refs`` says which array each of its free symbols is (a symbol
    not there is a name of the module: a value at one step, an adjoint, a temporary)."""

    expr: sympy.Expr
    refs: tuple[tuple[str, "Value"], ...] = ()


@dataclass(frozen=True)
class Call:
    """``<library>.<func>(args, key=value)`` (NumPy's or CuPy's, as the printer says)."""

    func: str
    args: tuple["Value", ...] = ()
    kwargs: tuple[tuple[str, "Value"], ...] = ()


@dataclass(frozen=True)
class Helper:
    """``func(args, key=value)``: a function of the module itself (``_seed``) or a name."""

    func: str
    args: tuple["Value", ...] = ()
    kwargs: tuple[tuple[str, "Value"], ...] = ()


@dataclass(frozen=True)
class MatMul:
    """``a @ b``."""

    a: "Value"
    b: "Value"


@dataclass(frozen=True)
class Reshape:
    """``value.reshape(-1, cols)`` (rows of every step), or with ``steps``
    ``value.reshape(T, B, cols)``; ``T``: then transposed."""

    value: "Value"
    cols: sympy.Expr
    steps: bool = False
    T: bool = False


@dataclass(frozen=True)
class Concat:
    """``<library>.concatenate([parts], axis=axis)`` (``axis`` None: the default)."""

    parts: tuple["Value", ...]
    axis: int | None = None


@dataclass(frozen=True)
class Size:
    """A size or shape item: an expression in n_in, n_hidden, n_out, T, B."""

    expr: sympy.Expr


@dataclass(frozen=True)
class Text:
    """A literal the printer writes as it is (``dtype``, ``1.0``, ``T * n_in``): never a
    generated name (those are refs, so that reads are known)."""

    text: str


@dataclass(frozen=True)
class Key:
    """A string key, printed quoted: ``"h"`` (a user's name, checked to be an identifier)."""

    name: str


@dataclass(frozen=True)
class Infix:
    """``a op b op c``, in this order (offsets of RTRL's directions: ``o_W + W.size``)."""

    op: str
    parts: tuple["Value", ...]


@dataclass(frozen=True)
class Paren:
    """``(value)``."""

    value: "Value"


@dataclass(frozen=True)
class Attr:
    """``value.name`` (``W.size``, ``W.shape``)."""

    value: "Value"
    name: str


@dataclass(frozen=True)
class Method:
    """``value.name(args, key=value)`` (``J.copy()``, ``G[...].sum(axis=1)``)."""

    value: "Value"
    name: str
    args: tuple["Value", ...] = ()
    kwargs: tuple[tuple[str, "Value"], ...] = ()


@dataclass(frozen=True)
class Index:
    """``value[items]`` of any value (``W[:, :n].T[:, None, :]``)."""

    value: "Value"
    items: tuple = ()


@dataclass(frozen=True)
class Dict:
    """``{"key": value, ...}``."""

    items: tuple[tuple[str, "Value"], ...]


Value = Union[Ref, Elementwise, Call, Helper, MatMul, Reshape, Concat, Size, Text, Key, Infix, Paren, Attr, Method,
              Index, Dict, tuple]
_VALUES = (Ref, Elementwise, Call, Helper, MatMul, Reshape, Concat, Size, Text, Key, Infix, Paren, Attr, Method, Index,
           Dict, tuple)


@dataclass(frozen=True)
class Assign:
    """``dst = value`` (``dst`` a tuple of refs: several at once)."""

    dst: Ref | tuple[Ref, ...]
    value: Value
    comment: str = ""


@dataclass(frozen=True)
class Update:
    """``dst <op>= value``."""

    dst: Ref
    op: str
    value: Value
    comment: str = ""


@dataclass(frozen=True)
class Do:
    """A call for its effect; ``out`` names the array it writes (``np.dot(a, b, out=c)``,
    or the first argument of a module helper that writes into it)."""

    call: Call | Helper
    out: Ref | None = None
    comment: str = ""


@dataclass(frozen=True)
class OpCall:
    """Call ``step`` of ``op``'s in-place NumPy spelling, from ``a`` into ``out``."""

    op: type
    step: int
    a: Value
    out: Ref
    comment: str = ""


@dataclass(frozen=True)
class If:
    """``if <key> in <mapping>:`` and its body."""

    key: str
    mapping: str
    body: tuple["Stmt", ...]


@dataclass(frozen=True)
class Loop:
    """``for <var> in range(stop):`` (``reverse``: from stop - 1 down to 0) and its body."""

    var: str
    stop: "Value"
    body: tuple["Stmt", ...]
    reverse: bool = False


@dataclass(frozen=True)
class Comment:
    text: str


Stmt = Union[Assign, Update, Do, OpCall, If, Loop, Comment]
_STATEMENTS = (Assign, Update, Do, OpCall, If, Loop, Comment)


# -- building values ------------------------------------------------------------------------
def span(start: sympy.Expr, size: sympy.Expr) -> Span:
    """The span ``start:start + size``."""
    return Span(start, sympy.expand(start + size))


def empty(*shape, fill: str = "empty") -> Call:
    """A new array of the module's dtype: ``<library>.empty(shape, dtype)`` (or ``zeros``)."""
    return Call(fill, (tuple(shape), Text("dtype")))


# -- rewriting the values of statements --------------------------------------------------
def rewrite_values(value, fn):
    """``value`` with ``fn`` applied to each of its parts, innermost first (an elementwise
    expression's refs, a call's arguments, then the value itself): ``fn`` returns the part or
    what replaces it."""
    if isinstance(value, Elementwise):
        value = Elementwise(value.expr, tuple((n, rewrite_values(v, fn)) for n, v in value.refs))
    elif isinstance(value, (Call, Helper)):
        value = replace(value, args=tuple(rewrite_values(a, fn) for a in value.args),
                        kwargs=tuple((k, rewrite_values(v, fn)) for k, v in value.kwargs))
    elif isinstance(value, tuple):
        return tuple(rewrite_values(v, fn) for v in value)
    return fn(value)


def rewrite_stmt(stmt, fn):
    """``stmt`` with :func:`rewrite_values` applied to the values it computes (not to what it writes)."""
    if isinstance(stmt, (Assign, Update)):
        return replace(stmt, value=rewrite_values(stmt.value, fn))
    if isinstance(stmt, Do):
        return replace(stmt, call=rewrite_values(stmt.call, fn))
    if isinstance(stmt, OpCall):
        return replace(stmt, a=rewrite_values(stmt.a, fn))
    return stmt


def refs_read(value) -> list[Ref]:
    """The refs a statement or value reads, in order (a name in an expression as a ref of that name;
    a statement's destination is not read, an ``out=`` argument is)."""
    out: list[Ref] = []

    def walk(v):
        if isinstance(v, Ref):
            out.append(v)
        elif isinstance(v, Elementwise):
            refs = dict(v.refs)
            for sym in sorted(v.expr.free_symbols, key=lambda s: s.name):
                walk(refs.get(sym.name, Ref(sym.name)))
        elif dataclasses.is_dataclass(v) and not isinstance(v, type):
            for f in dataclasses.fields(v):
                if f.name not in ("dst", "out", "comment"):
                    walk(getattr(v, f.name))
        elif isinstance(v, tuple):
            for item in v:
                walk(item)

    walk(value)
    return out


# -- what statements read and write ------------------------------------------------------
def _item_reads(item) -> Iterator[str]:
    if isinstance(item, Span):
        for end in (item.lo, item.hi):
            yield from _item_reads(end)
    elif isinstance(item, sympy.Basic):
        yield from (s.name for s in item.free_symbols)
    elif item is not None and not isinstance(item, _Marker):
        yield from _value_reads(item)


def _value_reads(value) -> Iterator[str]:
    if isinstance(value, Ref):
        yield value.name
        for item in value.index:
            yield from _item_reads(item)
    elif isinstance(value, (Infix, tuple)):
        for v in (value.parts if isinstance(value, Infix) else value):
            yield from _value_reads(v)
    elif isinstance(value, (Attr, Method, Paren)):
        yield from _value_reads(value.value)
        if isinstance(value, Method):
            for a in (*value.args, *(v for _, v in value.kwargs)):
                yield from _value_reads(a)
    elif isinstance(value, Index):
        yield from _value_reads(value.value)
        for item in value.items:
            yield from _item_reads(item)
    elif isinstance(value, Dict):
        for _, v in value.items:
            yield from _value_reads(v)
    elif isinstance(value, Elementwise):
        refs = dict(value.refs)
        for s in value.expr.free_symbols:
            if s.name in refs:
                yield from _value_reads(refs[s.name])
            else:
                yield s.name
    elif isinstance(value, (Call, Helper)):
        for a in (*value.args, *(v for _, v in value.kwargs)):
            yield from _value_reads(a)
        if isinstance(value, Helper):
            yield value.func
    elif isinstance(value, MatMul):
        yield from _value_reads(value.a)
        yield from _value_reads(value.b)
    elif isinstance(value, Reshape):
        yield from _value_reads(value.value)
    elif isinstance(value, Concat):
        for p in value.parts:
            yield from _value_reads(p)


def reads_of(stmt: Stmt) -> frozenset[str]:
    """The names a statement reads (an array it writes in part counts as read too)."""
    if isinstance(stmt, Assign):
        names = set(_value_reads(stmt.value))
        for dst in stmt.dst if isinstance(stmt.dst, tuple) else (stmt.dst,):
            if dst.index:  # writes into part of an array: the array is read (it must exist)
                names |= set(_value_reads(dst))
        return frozenset(names)
    if isinstance(stmt, Update):
        return frozenset({*_value_reads(stmt.value), *_value_reads(stmt.dst)})
    if isinstance(stmt, Do):
        return frozenset(_value_reads(stmt.call))
    if isinstance(stmt, OpCall):
        return frozenset({*_value_reads(stmt.a), *_value_reads(stmt.out)})
    if isinstance(stmt, If):
        return frozenset({stmt.mapping}).union(*(reads_of(s) for s in stmt.body))
    if isinstance(stmt, Loop):
        return frozenset(_value_reads(stmt.stop)).union(*(reads_of(s) for s in stmt.body))
    return frozenset()


def writes_of(stmt: Stmt) -> frozenset[str]:
    """The names a statement assigns or writes into."""
    if isinstance(stmt, Assign):
        return frozenset(d.name for d in (stmt.dst if isinstance(stmt.dst, tuple) else (stmt.dst,)))
    if isinstance(stmt, (Update, OpCall)):
        return frozenset({(stmt.dst if isinstance(stmt, Update) else stmt.out).name})
    if isinstance(stmt, Do):
        return frozenset({stmt.out.name}) if stmt.out is not None else frozenset()
    if isinstance(stmt, If):
        return frozenset().union(*(writes_of(s) for s in stmt.body))
    if isinstance(stmt, Loop):
        return frozenset({stmt.var}).union(*(writes_of(s) for s in stmt.body))
    return frozenset()


# frozen dataclasses cannot take cached attributes: properties
for _cls in _STATEMENTS:
    _cls.reads = property(reads_of)
    _cls.writes = property(writes_of)


def verify(stmts: Iterable[Stmt], where: str = "") -> None:
    """Check that every statement is one of the IR's, with values of the IR's types;
    raise InternalError naming the first that is not."""
    values = _VALUES
    for stmt in stmts:
        if not isinstance(stmt, _STATEMENTS):
            raise InternalError(f"{where}: {stmt!r} is not a statement")
        for name in ("value", "a"):
            v = getattr(stmt, name, None)
            if v is not None and not isinstance(v, values):
                raise InternalError(f"{where}: statement {stmt!r} holds {v!r}, not a value")
        if isinstance(stmt, (If, Loop)):
            verify(stmt.body, where)


# -- plain text, for debugging and golden tests ---------------------------------------------
def _text(value) -> str:
    if isinstance(value, Ref):
        items = ", ".join(_item(i) for i in value.index)
        return value.name + (f"[{items}]" if value.index else "") + (".T" if value.T else "")
    if isinstance(value, Elementwise):
        return sympy.sstr(value.expr)
    if isinstance(value, (Call, Helper)):
        args = [_text(a) for a in value.args] + [f"{k}={_text(v)}" for k, v in value.kwargs]
        return f"{'xp.' if isinstance(value, Call) else ''}{value.func}({', '.join(args)})"
    if isinstance(value, MatMul):
        return f"({_text(value.a)} @ {_text(value.b)})"
    if isinstance(value, Reshape):
        return f"{_text(value.value)}.reshape({'T, B' if value.steps else '-1'}, {value.cols}){'.T' if value.T else ''}"
    if isinstance(value, Concat):
        return f"concat([{', '.join(_text(p) for p in value.parts)}], {value.axis})"
    if isinstance(value, Size):
        return str(value.expr)
    if isinstance(value, Text):
        return value.text
    if isinstance(value, Key):
        return repr(value.name)
    if isinstance(value, Infix):
        return f" {value.op} ".join(_text(p) for p in value.parts)
    if isinstance(value, Paren):
        return f"({_text(value.value)})"
    if isinstance(value, Attr):
        return f"{_text(value.value)}.{value.name}"
    if isinstance(value, Method):
        args = [_text(a) for a in value.args] + [f"{k}={_text(v)}" for k, v in value.kwargs]
        return f"{_text(value.value)}.{value.name}({', '.join(args)})"
    if isinstance(value, Index):
        return f"{_text(value.value)}[{', '.join(_item(i) for i in value.items)}]"
    if isinstance(value, Dict):
        return "{" + ", ".join(f"{k!r}: {_text(v)}" for k, v in value.items) + "}"
    if isinstance(value, tuple):
        return "(" + ", ".join(_text(v) for v in value) + ")"
    raise InternalError(f"{value!r} is not a value")


def _item(item) -> str:
    if isinstance(item, Span):
        return f"{'' if item.lo is None else _item(item.lo)}:{'' if item.hi is None else _item(item.hi)}"
    if isinstance(item, (sympy.Basic, _Marker)):
        return str(item)
    return _text(item)


def dump(stmts: Iterable[Stmt], indent: int = 0) -> str:
    """Statements as plain text, one a line (the refs of an expression in brackets)."""
    lines = []
    pad = " " * indent
    for s in stmts:
        note = f"  # {s.comment}" if getattr(s, "comment", "") else ""
        if isinstance(s, Assign):
            dst = ", ".join(_text(d) for d in s.dst) if isinstance(s.dst, tuple) else _text(s.dst)
            refs = ""
            if isinstance(s.value, Elementwise) and s.value.refs:
                refs = "  [" + ", ".join(f"{k} = {_text(v)}" for k, v in s.value.refs) + "]"
            lines.append(f"{pad}{dst} = {_text(s.value)}{refs}{note}")
        elif isinstance(s, Update):
            lines.append(f"{pad}{_text(s.dst)} {s.op}= {_text(s.value)}{note}")
        elif isinstance(s, Do):
            lines.append(f"{pad}{_text(s.call)}{note}")
        elif isinstance(s, OpCall):
            lines.append(f"{pad}{s.op.__name__}[{s.step}]({_text(s.a)} -> {_text(s.out)}){note}")
        elif isinstance(s, If):
            lines.append(f"{pad}if {s.key!r} in {s.mapping}:")
            lines.append(dump(s.body, indent + 4))
        elif isinstance(s, Loop):
            steps = f"range({_text(s.stop)})"
            lines.append(f"{pad}for {s.var} in {f'reversed({steps})' if s.reverse else steps}:")
            lines.append(dump(s.body, indent + 4))
        elif isinstance(s, Comment):
            lines.append(f"{pad}# {s.text}")
    return "\n".join(lines)
