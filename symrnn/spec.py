"""Cells from an equations file (TOML): read by a person, never executed.

A spec file names the cell, its input, states, parameters with their shapes
(in ``n_in``, ``n_hidden``, ``n_out``), optional named constants, the equations
of one time step (intermediates and one update per state, in any order), an
optional readout and loss.  ``docs/spec-format.md`` describes the format.

Every expression is parsed with Python's :mod:`ast` (``mode="eval"``) and the
tree is walked against an allow-list: declared names, numbers, ``+ - * / **``,
``W @ v`` and ``W @ (a, b)`` (a parameter matrix times a vector or a
concatenation), ``W[k]`` (a row block) and calls of symrnn's nonlinearities.
The SymPy expression is built from the tree node by node, so nothing in the
file is ever evaluated as Python.

The result is a plain :class:`~symrnn.cell.Cell`, checked by the same lowering
as a cell written in Python; its errors come back as :class:`SpecError` naming
``file:line``.

>>> cell = parse_spec('''
... [cell]
... name = "tiny"
... [inputs]
... x = "n_in"
... [states]
... h = "n_hidden"
... [params]
... W = ["n_hidden", "n_hidden + n_in"]
... [equations]
... h = "tanh(W @ (h_prev, x))"
... ''', "tiny.toml")
>>> cell.equations["h"]
tanh(W @ [h_prev; x])
"""

from __future__ import annotations

import ast
import math
import operator
import re
import sys
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import sympy

from .cell import I, Cell, Loss, Param, ParamSymbol, State, matvec
from .errors import CellError, UserError, suggest
from .escape import one_line, shown
from .lower import MAX_DEPTH, NONDIFFERENTIABLE, instead, lower
from .ops import OPS
from .reductions import REDUCTIONS

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

__all__ = ["SpecError", "SpecWarning", "load_spec", "parse_spec"]

TABLES = ("cell", "inputs", "states", "params", "constants", "equations", "readout", "loss")
_CELL_KEYS = ("name", "description", "source", "dims")
_LOSS_KEYS = ("expr", "reduction", "target_of")


class SpecError(UserError):
    """A spec file is wrong; the message starts with ``file:line:``."""


class SpecWarning(UserWarning):
    """A spec file is suspicious (an unused parameter, a state that is not recurrent)."""


#: the largest spec file read (bytes): a cell's equations are a few kilobytes
MAX_FILE = 1_000_000


def load_spec(path: str | Path, constants: Mapping[str, float] | None = None) -> Cell:
    """Read, parse and check a spec file; ``constants`` overrides its ``[constants]``.

    At most MAX_FILE bytes are read (a device such as /dev/zero, or a huge file, is refused)."""
    path = Path(path)
    shown_path = shown(str(path), 200)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE + 1)
        if len(data) > MAX_FILE:
            raise SpecError(f"spec file {shown_path} is larger than {MAX_FILE // 1000} kB; a spec file holds one cell's "
                            "equations")
        text = data.decode("utf-8")
    except FileNotFoundError:
        raise SpecError(f"spec file {shown_path} does not exist") from None
    except UnicodeDecodeError as exc:
        raise SpecError(f"cannot read spec file {shown_path}: it is not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise SpecError(f"cannot read spec file {shown_path}: {exc.strerror or exc}") from None
    return parse_spec(text, str(path), constants)


def parse_spec(text: str, filename: str = "<spec>", constants: Mapping[str, float] | None = None) -> Cell:
    """Spec text -> a checked Cell.  Warnings are issued as :class:`SpecWarning`."""
    return _Reader(text, filename).read(constants or {})


# -- where things are in the file -------------------------------------------------
_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
_TABLE_LINE = re.compile(r"^\s*\[\s*([A-Za-z0-9_.\"-]+)\s*\]\s*(#.*)?$")
_KEY_LINE = re.compile(r"""^\s*(?:"([^"]+)"|'([^']+)'|([A-Za-z0-9_-]+))\s*=""")


def _index(text: str) -> dict[tuple[str, str], int]:
    """(table, key) -> line number (1-based); (table, '') is the table's header."""
    where: dict[tuple[str, str], int] = {}
    table = ""
    in_multiline = False
    for lineno, line in enumerate(text.split("\n"), start=1):  # TOML's lines (not str.splitlines')
        if in_multiline:
            if line.count('"""') % 2 == 1 or line.count("'''") % 2 == 1:
                in_multiline = False
            continue
        m = _TABLE_LINE.match(line)
        if m:
            table = m.group(1).strip('"')
            where.setdefault((table, ""), lineno)
            continue
        m = _KEY_LINE.match(line)
        if m:
            key = m.group(1) or m.group(2) or m.group(3)
            where.setdefault((table, key), lineno)
            rest = line[m.end():]
            if rest.count('"""') % 2 == 1 or rest.count("'''") % 2 == 1:
                in_multiline = True
    return where


@dataclass(frozen=True)
class _Expr:
    """One expression of the file: its table, key, text and line."""

    table: str
    key: str
    text: str
    line: int
    col0: int | None = None  # where the text starts on its line (single-line strings)


class FileErrors:
    """The one-line errors of a reader of a TOML file (spec files here, claims files in
    symrnn.claims): ``file:line[:col]: [table] key: message``, the line found from
    ``self.lines`` ((table, key) -> line) and ``self.filename``."""

    error_type: type[UserError] = SpecError
    filename: str
    lines: dict[tuple[str, str], int]

    def line_of(self, table: str, key: str = "") -> int | None:
        return self.lines.get((table, key)) or self.lines.get((table, ""))

    def key_text(self, key: str) -> str:
        return one_line(key)

    def error(self, table: str, key: str, message: str, line: int | None = None, col: int | None = None,
              field: bool = True) -> UserError:
        """``file:line[:col]: [table] key: message`` (the field is left out when the message names it)."""
        line = line or self.line_of(table, key)
        place = f"{self.filename}:{line}" + (f":{col}" if col else "") if line else self.filename
        name = (f"[{one_line(table)}] {self.key_text(key)}: " if key else f"[{one_line(table)}]: ") if field else ""
        return self.error_type(f"{place}: {name}{message}")


class _Reader(FileErrors):
    def __init__(self, text: str, filename: str):
        self.text, self.filename = text, one_line(filename)
        self.lines: dict[tuple[str, str], int] = {}
        self.cell_name = "?"

    # -- the pass ------------------------------------------------------------------
    def read(self, overrides: Mapping[str, float]) -> Cell:
        try:
            data = tomllib.loads(self.text)
        except tomllib.TOMLDecodeError as exc:
            m = re.search(r"\(at line (\d+), column (\d+)\)", str(exc))
            msg = re.sub(r"\s*\((at line \d+, column \d+|at end of document)\)", "", str(exc))
            place = f"{self.filename}:{m.group(1)}:{m.group(2)}" if m else self.filename
            if "Illegal character '\\n'" in msg:
                msg += " (a string that is not closed on its line?)"
            if "at end of document" in str(exc):
                place, msg = f"{self.filename}:{len(self.text.splitlines()) or 1}", msg + " (at the end of the file)"
            raise SpecError(f"{place}: not valid TOML: {msg}") from None
        self.lines = _index(self.text)
        for table, value in data.items():
            if table not in TABLES:
                raise self.error(table, "", f"unknown table{suggest(table, TABLES)}; a spec has the tables {', '.join(TABLES)}")
            if not isinstance(value, dict):
                raise self.error(table, "", f"'{table}' must be a table: write [{table}] on its own line")
        for table in ("cell", "inputs", "states", "equations"):
            if table not in data:
                raise SpecError(f"{self.filename}: missing table [{table}] (a spec needs [cell], [inputs], [states], [equations])")

        meta = self.cell_table(data["cell"])
        self.cell_name = meta["name"]
        for table in ("inputs", "states", "params", "constants", "equations", "readout"):
            for key in data.get(table, {}):
                if not _NAME.fullmatch(key):
                    raise self.error(table, key, f"{shown(key)} is not a valid name (letters, digits and _, "
                                     "starting with a letter)", field=False)
                if key in OPS or key in NONDIFFERENTIABLE:
                    raise self.error(table, key, f"'{key}' is the name of a function, so an equation could not "
                                     f"use it as a value; choose another name (e.g. {key}_)")
        inputs = self.sizes("inputs", data["inputs"])
        states = self.states(data["states"])
        params = {k: self.param(k, v) for k, v in data.get("params", {}).items()}
        consts = self.constants(data.get("constants", {}), overrides)

        eq_exprs = self.strings("equations", data["equations"])
        ro_exprs = self.strings("readout", data.get("readout", {}))
        for key in eq_exprs:
            if key.endswith("_prev") and key[: -len("_prev")] in states:
                raise self.error("equations", key, f"'{key}' is the value of state '{key[:-5]}' at t-1 and cannot be assigned; "
                                 f"write the update as {key[:-5]} = ...")
        missing = [s for s in states if s not in eq_exprs]
        if missing:
            raise self.error("states", missing[0], f"state '{missing[0]}' has no update equation; add {missing[0]} = \"...\" to [equations]")

        for table, exprs in (("equations", eq_exprs), ("readout", ro_exprs)):
            if "target" in exprs:
                raise self.error(table, "target", "'target' is reserved for the target in the loss; choose another name")
        prevs = {f"{s}_prev" for s in states}
        for name in consts:
            if name in {*inputs, *states, *prevs, *params, *eq_exprs, *ro_exprs}:
                raise self.error("constants", name, f"'{name}' is already the name of an input, state, parameter or equation")
        eq_names = set(inputs) | prevs | set(params) | set(consts) | set(eq_exprs)
        ro_names = eq_names | set(ro_exprs)
        self.builder = _Builder(self, params, consts)
        equations = {e.key: self.builder.expr(e, eq_names) for e in eq_exprs.values()}
        order = self.order(eq_exprs, equations)
        readout = {e.key: self.builder.expr(e, ro_names) for e in ro_exprs.values()}
        loss = self.loss(data["loss"], ro_names | {"target"}) if "loss" in data else None

        cell = Cell(
            name=meta["name"],
            inputs=inputs,
            states=states,
            params=params,
            equations={k: equations[k] for k in order},
            readout=readout,
            loss=loss,
            dims=meta["dims"],
            source=meta["source"],
            description=meta["description"],
            constants=consts,
        )
        self.check(cell)
        return cell

    def check(self, cell: Cell) -> None:
        """Lower the cell once: its errors and warnings, located in the file."""
        try:
            graph = lower(cell)
        except CellError as exc:
            table, key = self.field_of(exc.where, cell)
            line = self.line_of(table, key)
            raise SpecError(f"{self.filename}:{line}: {exc}" if line else f"{self.filename}: {exc}") from None
        for w in graph.warnings:
            table, key = self.field_of(getattr(w, "where", ""), cell)
            line = self.line_of(table, key)
            warnings.warn(SpecWarning(f"{self.filename}:{line}: {w}" if line else f"{self.filename}: {w}"), stacklevel=4)

    def field_of(self, where: str, cell: Cell) -> tuple[str, str]:
        """lower's ``where`` (``equation 'z'``, ``params['W']``, ``loss``) -> (table, key)."""
        m = re.match(r"^(equation|readout) '(\w+)'", where)
        if m:
            key = m.group(2)
            return ("readout" if key in cell.readout and key not in cell.equations else "equations"), key
        m = re.match(r"^(\w+)\['(\w+)'\]", where)
        if m:
            return ("cell", "dims") if m.group(1) == "dims" else (m.group(1), m.group(2))
        if where == "loss":
            return "loss", "expr"
        if where in ("name", "source", "description"):
            return "cell", where
        return where, ""

    # -- tables -------------------------------------------------------------------
    def cell_table(self, table: dict) -> dict:
        for key in table:
            if key not in _CELL_KEYS:
                raise self.error("cell", key, f"unknown key{suggest(key, _CELL_KEYS)}; [cell] has {', '.join(_CELL_KEYS)}")
        if "name" not in table:
            raise self.error("cell", "", 'missing name = "..." (the cell\'s name, used for the module <name>_numpy.py)')
        out = {"dims": {}}
        for key in ("name", "description", "source"):
            value = table.get(key, "")
            if not isinstance(value, str):
                raise self.error("cell", key, f"expected a string, got {value!r}")
            out[key] = value
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", out["name"]):
            raise self.error("cell", "name", f"{shown(out['name'])} is not a valid cell name (letters, digits and _, "
                             "starting with a letter)")
        dims = table.get("dims", {})
        if not isinstance(dims, dict):
            raise self.error("cell", "dims", "expected a table such as dims = { n_in = 1 }")
        for k, v in dims.items():
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise self.error("cell", "dims", f"{k} = {v!r}: a fixed dimension is a positive integer")
        out["dims"] = dims
        return out

    def sizes(self, table: str, entries: dict) -> dict:
        for key, value in entries.items():
            if isinstance(value, bool) or not isinstance(value, (str, int)):
                raise self.error(table, key, f'expected a size such as "n_hidden" or 2, got {value!r}')
        return dict(entries)

    def states(self, entries: dict) -> dict:
        """[states]: a size, or { size = ..., init = "..." } (read by lowering, never evaluated)."""
        out = {}
        for key, value in entries.items():
            if isinstance(value, dict):
                extra = sorted(set(value) - {"size", "init"})
                if extra or "size" not in value:
                    raise self.error("states", key, 'expected a size such as "n_hidden", or { size = "n_hidden", '
                                     'init = "uniform(0.5, 1.5)" }' + (f"; unknown key {shown(extra[0])}" if extra else ""))
                self.sizes("states", {key: value["size"]})
                out[key] = State(value["size"], init=self.init_text("states", key, value.get("init")))
            else:
                out[key] = self.sizes("states", {key: value})[key]
        return out

    def init_text(self, table: str, key: str, value) -> str | None:
        if value is not None and not isinstance(value, str):
            kind = {bool: "a boolean", int: "a number", float: "a number", list: "an array", dict: "a table"}.get(type(value), "a date")
            raise self.error(table, key, f'init: expected an initializer in quotes, such as init = "uniform(0.9, 0.999)", '
                             f'"normal(0, 0.1)" or "constant(1.0)", got {kind}')
        return value

    def param(self, key: str, value) -> Param:
        expect = 'expected a shape: ["n_hidden", "n_in"] (a matrix), ["n_hidden"] (a vector), [] (a scalar), ' \
                 'or { shape = [...], blocks = k, init = "..." }'
        blocks, init = 1, None
        if isinstance(value, dict):
            extra = sorted(set(value) - {"shape", "blocks", "init"})
            if extra or "shape" not in value:
                raise self.error("params", key, expect + (f"; unknown key {shown(extra[0])}" if extra else ""))
            blocks, init, value = value.get("blocks", 1), self.init_text("params", key, value.get("init")), value["shape"]
            if isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 1:
                raise self.error("params", key, f"blocks = {blocks!r}: expected a positive integer")
        if isinstance(value, str):
            raise self.error("params", key, f'{expect}; a size in a string alone is ambiguous: write ["{value}"] for a vector')
        if not isinstance(value, list) or len(value) > 2 or any(isinstance(v, bool) or not isinstance(v, (str, int)) for v in value):
            raise self.error("params", key, expect)
        return Param(tuple(value), blocks=blocks, init=init)

    def constants(self, table: dict, overrides: Mapping[str, float]) -> dict[str, sympy.Expr]:
        for name in overrides:
            if name not in table:
                raise SpecError(f"{self.filename}: no constant '{name}' to set{suggest(name, table)}; "
                                f"[constants] has: {', '.join(table) or 'none'}")
        out = {}
        for name, value in {**table, **overrides}.items():
            if not _NAME.fullmatch(name):
                raise self.error("constants", name, f"{shown(name)} is not a valid name (letters, digits and _, "
                                 "starting with a letter)")
            setting = f"--set {name}={value}" if name in overrides else None
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise self.error("constants", name, f"expected a number, got {shown(repr(value))}")
            if (isinstance(value, float) and not math.isfinite(value)) or abs(value) > 1e300:
                what = f"{setting}: " if setting else ""
                message = f"{what}constant '{name}' = {value!r} is not allowed; a constant is a finite number (at most 1e300 in size)"
                if setting:
                    raise SpecError(f"{self.filename}: {message}")
                raise self.error("constants", name, message)
            out[name] = sympy.Integer(value) if isinstance(value, int) else sympy.Float(value)
        return out

    def strings(self, table: str, entries: dict) -> dict[str, _Expr]:
        out = {}
        for key, value in entries.items():
            if not isinstance(value, str):
                raise self.error(table, key, f'expected an expression in quotes, e.g. {key} = "tanh(W @ x)", got {value!r}')
            line = self.line_of(table, key) or 0
            raw = self.text.split("\n")[line - 1] if line else ""
            col0 = None  # the column where the text starts in the file (None: unknown, e.g. escapes)
            m = re.search(r"=\s*(\"\"\"|\'\'\'|\"|\')", raw)
            if m and len(m.group(1)) == 3 and not raw[m.end():].strip():
                line, col0 = line + 1, 0  # a multi-line string that starts on the next line
            elif m:
                col0 = m.end()
            if "\\" in value or (m and len(m.group(1)) == 1 and "\\" in raw):
                col0 = None
            out[key] = _Expr(table, key, value, line, col0)
        return out

    def loss(self, table: dict, names: set[str]) -> Loss:
        for key in table:
            if key not in _LOSS_KEYS:
                raise self.error("loss", key, f"unknown key{suggest(key, _LOSS_KEYS)}; [loss] has {', '.join(_LOSS_KEYS)}")
        if "expr" not in table:
            raise self.error("loss", "", 'missing expr = "..." (the per-step loss, e.g. "(y - target)**2 / 2")')
        (expr,) = self.strings("loss", {"expr": table["expr"]}).values()
        reduction = table.get("reduction", "sum")
        if reduction not in ("sum", "mean"):
            raise self.error("loss", "reduction", f"expected \"sum\" or \"mean\" (over time), got {reduction!r}")
        target_of = table.get("target_of", "y")
        if not isinstance(target_of, str):
            raise self.error("loss", "target_of", f"expected the name of a readout, got {target_of!r}")
        return Loss(self.builder.expr(expr, names), reduction=reduction, target_of=target_of)

    def order(self, exprs: dict[str, _Expr], built: dict[str, sympy.Expr]) -> list[str]:
        """Equations in an order where each comes after what it uses: repeatedly the first
        one in the file whose inputs are all computed (the file's order, where it is valid)."""
        uses = {k: {s.name for s in v.free_symbols if s.name in built} for k, v in built.items()}
        order: list[str] = []
        left = list(exprs)  # file order
        while left:
            ready = next((k for k in left if uses[k] <= set(order)), None)
            if ready is None:
                raise self.cycle_error(exprs, {k: sorted(uses[k]) for k in left})
            order.append(ready)
            left.remove(ready)
        return order

    def cycle_error(self, exprs: dict[str, _Expr], uses: dict[str, list[str]]) -> SpecError:
        """The error for equations that use each other in a circle (named from its first line)."""
        path: list[str] = []
        name = min(uses, key=lambda k: exprs[k].line)
        while name not in path:  # every equation left uses another one left: walk until one repeats
            path.append(name)
            name = next(d for d in uses[name] if d in uses)
        cycle = path[path.index(name):] + [name]
        first = min(cycle[:-1], key=lambda k: exprs[k].line)
        k = cycle.index(first)
        cycle = cycle[k:-1] + cycle[:k] + [first]
        return self.error("equations", first, "circular definition: " + " -> ".join(cycle)
                          + " (each uses the next; a state's own value at t-1 is <state>_prev)")


#: the largest expression of a spec file: names, numbers and operations (a real cell's have tens);
#: its nesting (an operation, sign or call inside another) is held to lower.MAX_DEPTH here too
MAX_EXPR_SIZE = 4000
_LIMITS = (f"an expression has at most {MAX_EXPR_SIZE} names, numbers and operations and nests at most {MAX_DEPTH} "
           "levels deep")
_ALLOWED = ("names, numbers, + - * / **, W @ v, W @ (a, b), W[k], W.T @ v, (W - W.T - gamma * I) @ v, the "
            "functions " + ", ".join(OPS) + " and the reductions over units " + ", ".join(REDUCTIONS))
_SUM, _PRODUCT = (ast.Add, ast.Sub), (ast.Mult, ast.Div)
_APPLY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


class _Builder:
    """ast of one expression -> SymPy, against the allow-list."""

    def __init__(self, reader: _Reader, params: dict[str, Param], constants: dict[str, sympy.Expr]):
        self.reader = reader
        self.params = {k: ParamSymbol(k) for k in params}
        self.decls = params
        self.constants = constants

    def expr(self, e: _Expr, names: set[str]) -> sympy.Expr:
        self.e, self.names, self.depth = e, names, 0
        # in parentheses, so that an expression may run over several lines
        self.source = "(" + e.text + ")"
        try:
            tree = ast.parse(self.source, mode="eval")
        except SyntaxError as exc:
            hint = " (use ** for powers)" if "^" in e.text else ""
            if "too many nested" in exc.msg:
                hint = f" ({_LIMITS})"
            raise self.fail(None, f"cannot parse {shown(' '.join(e.text.split()))}: {exc.msg}{hint}", exc.lineno,
                            (exc.offset or 1) - (exc.lineno == 1)) from None
        except (RecursionError, MemoryError):  # Python's parser gives up on a huge or very deep expression
            raise self.fail(None, f"the expression is too big or nested too deeply to read ({_LIMITS})") from None
        size = sum(isinstance(node, ast.expr) for node in ast.walk(tree))  # ast.walk does not recurse
        if size > MAX_EXPR_SIZE:
            raise self.fail(None, f"the expression has {size} names, numbers and operations; at most {MAX_EXPR_SIZE} "
                            "are allowed (split it into several equations)")
        return self.build(tree.body)

    def fail(self, node: ast.AST | None, message: str, lineno: int | None = None, col: int | None = None) -> SpecError:
        e = self.e
        if node is not None:
            lineno, col = getattr(node, "lineno", None), getattr(node, "col_offset", None)
            col = None if col is None else col + 1 - (lineno == 1)  # the added "("
        line = e.line + (lineno - 1 if lineno else 0) if e.line else None
        file_col = None
        if col and e.col0 is not None:  # continuation lines of a multi-line string start at column 1
            file_col = e.col0 + col if lineno == 1 else col
        where = f"equation '{e.key}'" if e.table == "equations" else (f"readout '{e.key}'" if e.table == "readout" else "loss")
        return self.reader.error(e.table, e.key, f"cell '{self.reader.cell_name}', {where}: {message}", line=line, col=file_col,
                                 field=False)

    def snippet(self, node: ast.AST) -> str:
        return ast.get_source_segment(self.source, node) or type(node).__name__

    def build(self, node: ast.AST):
        method = getattr(self, f"_{type(node).__name__}", None)
        if method is None:
            raise self.fail(node, f"'{self.snippet(node)}' is not allowed in an equation (allowed: {_ALLOWED})")
        if self.depth >= MAX_DEPTH:
            raise self.fail(node, f"the expression is nested more than {MAX_DEPTH} levels deep; split it into "
                            "several equations")
        self.depth += 1
        value = method(node)
        self.depth -= 1
        return value

    def _Name(self, node: ast.Name):
        name = node.id
        if name in self.constants:
            return self.constants[name]
        if name in self.params:
            return self.params[name]
        if name in OPS or name in NONDIFFERENTIABLE or (name in REDUCTIONS and name not in self.names):
            raise self.fail(node, f"'{name}' is a function; write {name}(...)")
        if name == "I" and name not in self.names:
            raise self.fail(node, "I is the identity matrix: it is only allowed in a combination of matrices before @, "
                            "as (W - gamma * I) @ h")
        if name not in self.names:
            hint = suggest(name, self.names)
            if name == "target" and self.e.table != "loss":
                raise self.fail(node, "'target' is only available in the loss")
            raise self.fail(node, f"unknown symbol '{name}'{hint}")
        return sympy.Symbol(name)

    def _Constant(self, node: ast.Constant):
        value = node.value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.fail(node, f"{value!r} is not a number")
        if not math.isfinite(value) or abs(value) > 1.7e308:
            raise self.fail(node, f"the number {shown(self.snippet(node), 30)} is beyond the range of a float64 (about 1e308)")
        return sympy.Integer(value) if isinstance(value, int) else sympy.Float(value)

    def _UnaryOp(self, node: ast.UnaryOp):
        if isinstance(node.op, ast.USub):
            return -self.build(node.operand)
        if isinstance(node.op, ast.UAdd):
            return self.build(node.operand)
        raise self.fail(node, f"'{self.snippet(node)}': only + and - may precede a value")

    def _BinOp(self, node: ast.BinOp):
        op = node.op
        if isinstance(op, ast.MatMult):
            return self.matmul(node)
        if isinstance(op, (*_SUM, *_PRODUCT)):
            return self.chain(node)
        if isinstance(op, ast.Pow):
            left, right = self.operand(node.left, node), self.operand(node.right, node)
            if not right.is_Number:  # a ** b with an expression b: exp(b log a), for a > 0
                return left**right
            if left.is_Number:  # a number: its size first (9**9**9 would take SymPy forever)
                return self.number_power(left, right, node)
            return left**right
        if isinstance(op, ast.BitXor):
            base = self.snippet(node.left)
            if not isinstance(node.left, (ast.Name, ast.Constant, ast.Call, ast.Subscript)):
                base = f"({base})"
            power = f"{base}**{self.snippet(node.right)}" if isinstance(node.right, ast.Constant) \
                else "a**2 (a number as exponent)"
            raise self.fail(node, f"'{self.snippet(node)}': ^ is not a power (use ** for powers): write {power}")
        raise self.fail(node, f"operator in '{self.snippet(node)}' is not allowed (allowed: + - * / ** @)")

    def number_power(self, base: sympy.Expr, exponent: sympy.Expr, node: ast.BinOp) -> sympy.Expr:
        """``base ** exponent`` of two numbers, exactly where that is small, else as a float;
        a result beyond float64 (or 0 to a negative power) is refused."""
        b, e = float(base), float(exponent)
        if b == 0 and e < 0:
            raise self.fail(node, f"'{self.snippet(node)}' divides by zero")
        if b < 0 and not float(e).is_integer():
            raise self.fail(node, f"'{self.snippet(node)}' is not a real number")
        magnitude = e * math.log10(abs(b)) if b != 0 else 0.0  # log10 of the result's size
        if magnitude > 300:
            raise self.fail(node, f"'{self.snippet(node)}' is beyond the range of a float64 (about 1e308)")
        if abs(e) <= 64 and magnitude > -300:
            return base**exponent
        return sympy.Float(math.copysign(abs(b) ** e, b if e % 2 else 1.0))  # tiny, or a large exponent of about 1

    def chain(self, node: ast.BinOp):
        """``a + b - c ...`` or ``a * b / c ...``: Python's tree of a long sum is as deep as the
        sum is long (on its left side), so the chain is walked in a loop, not recursed into."""
        family = _SUM if isinstance(node.op, _SUM) else _PRODUCT
        links = []
        while isinstance(node, ast.BinOp) and isinstance(node.op, family):
            links.append(node)
            node = node.left
        value = self.operand(node, links[-1])
        if family is _PRODUCT:
            self.precedence_warning(node, links[-1])
        for link in reversed(links):  # left to right, one operator at a time, as Python evaluates it
            value = _APPLY[type(link.op)](value, self.operand(link.right, link))
        return value

    def precedence_warning(self, product: ast.AST, link: ast.BinOp) -> None:
        """``W @ x * v`` is ``(W @ x) * v`` (@ and * have Python's equal precedence, left to
        right): a warning where that is not ``W @ (x * v)``, v a vector, and no parentheses
        say which is meant."""
        if not (isinstance(product, ast.BinOp) and isinstance(product.op, ast.MatMult)):
            return
        if (link.lineno, link.col_offset) != (product.lineno, product.col_offset):
            return  # (W @ x) * v: written with its parentheses
        factor = self.build(link.right)
        if all(s.name in self.constants or len(getattr(self.decls.get(s.name), "shape", (0,))) == 0
               for s in factor.free_symbols):
            return  # a number or a scalar: (W @ x) * c = W @ (x * c)
        text, vector, right = self.snippet(link), self.snippet(product.left), self.snippet(product.right)
        factor_text, op = self.snippet(link.right), "*" if isinstance(link.op, ast.Mult) else "/"
        warnings.warn(SpecWarning(str(self.fail(
            link, f"'{text}' reads as ({vector} @ {right}) {op} {factor_text}: @ and {op} have equal precedence and "
            f"apply left to right; write the parentheses, ({vector} @ {right}) {op} {factor_text} or "
            f"{vector} @ ({right} {op} {factor_text})"))), stacklevel=2)

    def operand(self, node: ast.AST, op: ast.BinOp):
        """One side of an elementwise operator ``op``: anything but a bare matrix."""
        value = self.build(node)
        if isinstance(value, ParamSymbol) and self._is_matrix(value.name):
            raise self.fail(op, f"matrix '{value.name}' can only multiply a vector: write {value.name} @ v")
        return value

    def _is_matrix(self, name: str) -> bool:
        p = self.decls.get(name)
        return p is not None and len(p.shape) == 2

    def matmul(self, node: ast.BinOp):
        left = node.left
        if isinstance(left, (ast.BinOp, ast.UnaryOp)) or (isinstance(left, ast.Name) and left.id == "I"
                                                           and left.id not in self.params):
            weight = self.combination(left, node)
            if weight == 0:
                raise self.fail(left, f"in '{self.snippet(node)}': the combination of matrices is 0")
            right = node.right
            if isinstance(right, ast.Tuple):
                raise self.fail(right, "a combination of matrices multiplies one vector, not a concatenation")
            return matvec(weight, self.build(right))
        if isinstance(left, ast.Attribute):
            weight = self.transpose(left)
        elif isinstance(left, ast.Subscript):
            weight = self._Subscript(left)
        elif isinstance(left, ast.Name) and left.id in self.params:
            weight = self.params[left.id]
        else:
            got = self.snippet(left)
            hint = suggest(got, self.params) if isinstance(left, ast.Name) else ""
            raise self.fail(left, f"the left of @ must be a parameter matrix declared in [params], got '{got}'{hint}")
        right = node.right
        if isinstance(right, ast.Tuple):
            if not right.elts:
                raise self.fail(right, "W @ (): the concatenation is empty")
            return weight @ tuple(self.build(v) for v in right.elts)
        return weight @ self.build(right)

    def combination(self, node: ast.AST, matmul: ast.BinOp) -> sympy.Expr:
        """The left of ``(W - W.T - gamma * I) @ v``: a sum of terms, each a matrix, its
        transpose or ``I``, times numbers and scalars (a vector is refused: ``v * W @ x`` is
        ``(v * W) @ x``)."""
        if isinstance(node, ast.Name):
            if node.id == "I" and node.id not in self.params:
                return I
            if self._is_matrix(node.id):
                return self.params[node.id]
        if isinstance(node, ast.Attribute):
            return self.transpose(node)
        if isinstance(node, ast.Subscript):
            return self._Subscript(node)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            value = self.combination(node.operand, matmul)
            return -value if isinstance(node.op, ast.USub) else value
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub)):
            return _APPLY[type(node.op)](self.combination(node.left, matmul), self.combination(node.right, matmul))
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Mult, ast.Div)):
            if isinstance(node.op, ast.Mult) and not self.has_matrix(node.left):  # gamma * W
                return self.scalar(node.left, node.right, matmul) * self.combination(node.right, matmul)
            right = self.scalar(node.right, node.left, matmul)
            return _APPLY[type(node.op)](self.combination(node.left, matmul), right)
        got = self.snippet(node)
        hint = suggest(got, self.params) if isinstance(node, ast.Name) else ""
        raise self.fail(node, f"the left of @ must be a parameter matrix declared in [params], its transpose W.T, or a "
                        f"combination of them with I, got '{got}'{hint}")

    def has_matrix(self, node: ast.AST) -> bool:
        """Whether a part of a combination names a matrix, a transpose or I."""
        for sub in ast.walk(node):
            if isinstance(sub, ast.Name) and (self._is_matrix(sub.id) or (sub.id == "I" and sub.id not in self.params)):
                return True
        return False

    def scalar(self, node: ast.AST, matrix: ast.AST, matmul: ast.BinOp) -> sympy.Expr:
        """A coefficient (of ``matrix``) in a combination of matrices: a number, a constant or a
        scalar parameter."""
        if self.has_matrix(node):
            raise self.fail(node, f"in '{self.snippet(matmul)}': a product of two matrices is not allowed; write "
                            f"M @ (N @ v) for the product of M and N with a vector")
        value = self.build(node)
        vectors = [s.name for s in value.free_symbols
                   if not (s.name in self.constants or len(getattr(self.decls.get(s.name), "shape", (0,))) == 0)]
        if vectors:
            v = self.snippet(node)
            raise self.fail(node, f"'{self.snippet(matmul)}' reads as ({self.snippet(matmul.left)}) @ "
                            f"{self.snippet(matmul.right)} (@ and * have equal precedence, left to right), and '{v}' "
                            f"is not a scalar, so it cannot scale a matrix; write {v} * ({self.snippet(matrix)} @ "
                            f"{self.snippet(matmul.right)}) for a product scaled unit by unit")
        return value

    def transpose(self, node: ast.Attribute) -> sympy.Expr:
        """``W.T`` of a matrix parameter."""
        if node.attr == "T" and isinstance(node.value, ast.Name) and self._is_matrix(node.value.id):
            return self.params[node.value.id].T
        if node.attr == "T" and isinstance(node.value, ast.Subscript):
            raise self.fail(node, f"'{self.snippet(node)}': a row block has no transpose; declare the block as a "
                            "parameter of its own to use its transpose")
        raise self.attribute_error(node)

    def _Attribute(self, node: ast.Attribute):
        if node.attr == "T" and isinstance(node.value, ast.Name) and self._is_matrix(node.value.id):
            raise self.fail(node, f"'{self.snippet(node)}': a transpose can only multiply a vector: write "
                            f"{self.snippet(node)} @ v")
        raise self.attribute_error(node)

    def attribute_error(self, node: ast.Attribute) -> SpecError:
        """An attribute other than a matrix's transpose: refused."""
        if node.attr == "T" and isinstance(node.value, ast.Name):
            return self.fail(node, f"'{self.snippet(node)}': only a matrix parameter has a transpose "
                             f"('{node.value.id}' is not one)")
        return self.fail(node, f"'{self.snippet(node)}': attributes are not allowed in an equation (allowed: {_ALLOWED})")

    def _Subscript(self, node: ast.Subscript):
        if not (isinstance(node.value, ast.Name) and node.value.id in self.params):
            raise self.fail(node, f"'{self.snippet(node)}': only a parameter with row blocks can be indexed, as W[k]")
        index = node.slice
        if not (isinstance(index, ast.Constant) and isinstance(index.value, int) and not isinstance(index.value, bool)):
            raise self.fail(node, f"'{self.snippet(node)}': a row block is chosen by an integer, as W[0]")
        return self.params[node.value.id][index.value]

    def _Tuple(self, node: ast.Tuple):
        raise self.fail(node, f"'{self.snippet(node)}': a tuple (a, b) is only allowed after @, as W @ (a, b) (concatenation)")

    def softplus_hint(self, node: ast.Call) -> str:
        """'; write softplus(z)' for log(1 + exp(z)) (in either order), else ''."""
        if node.func.id != "log" or len(node.args) != 1:
            return ""
        arg = node.args[0]
        if isinstance(arg, ast.BinOp) and isinstance(arg.op, ast.Add):
            for one, call in ((arg.left, arg.right), (arg.right, arg.left)):
                if (isinstance(one, ast.Constant) and one.value == 1 and isinstance(call, ast.Call)
                        and isinstance(call.func, ast.Name) and call.func.id == "exp" and len(call.args) == 1):
                    return f"; write softplus({self.snippet(call.args[0])})"
        return ""

    def reduction(self, node: ast.Call, name: str):
        """``mean(e)``, ``sum(e)``, ``logsumexp(e)``: over the units of a vector (symrnn.reductions);
        not in the loss, which is per unit (compute the reduction in a readout)."""
        if node.keywords or len(node.args) != 1 or isinstance(node.args[0], ast.Starred):
            raise self.fail(node, f"{name}(...) takes exactly one argument (a vector expression; it reduces over its units)")
        if self.e.table == "loss":
            raise self.fail(node, f"{name}(...) is not allowed in the loss, which is per unit; compute it in a readout, "
                            "e.g. logp = \"z - logsumexp(z)\" and expr = \"-target * logp\"")
        return REDUCTIONS[name](self.build(node.args[0]))

    def _Call(self, node: ast.Call):
        func = node.func
        arg = self.snippet(node.args[0]) if len(node.args) == 1 else "a"
        if not isinstance(func, ast.Name):
            name = func.attr if isinstance(func, ast.Attribute) else ""
            hint = f"; write {name}({arg})" if name in OPS else instead(name, arg)
            raise self.fail(node, f"'{self.snippet(func)}' cannot be called; the functions are {', '.join(OPS)}{hint}")
        name = func.id
        if name in NONDIFFERENTIABLE:
            raise self.fail(node, f"{NONDIFFERENTIABLE[name]} (a gradient is needed here)")
        if name in REDUCTIONS:
            return self.reduction(node, name)
        if name not in OPS:
            hint = self.softplus_hint(node) or instead(name, arg) or suggest(name, OPS)
            raise self.fail(node, f"function '{name}' is not allowed (allowed: {', '.join(OPS)}){hint}")
        if node.keywords or len(node.args) != 1 or isinstance(node.args[0], ast.Starred):
            raise self.fail(node, f"{name}(...) takes exactly one argument")
        return OPS[name](self.build(node.args[0]))
