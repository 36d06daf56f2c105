"""Claims files: a hand derivation to check with ``symrnn verify`` (``docs/claims-format.md``).

A claims file names a cell (built-in, or an equations file) and lists formulas derived by
hand, each ``"left side" = "right side"`` in the expression language of equations files
(:mod:`symrnn.spec`, whose expression builder this module extends), plus

* derivatives: ``dh/db`` (the sensitivity dh^t/db), ``dh/dW[i, j]`` (to one entry of a
  matrix), ``ds[l]/dU[i, j]`` (unit l, per-unit form), ``dL/dh`` (the adjoint of h^t, as
  ``adj(h)``), ``dL/dW[i, j]`` (the gradient), ``dL_t/dy`` (the partial derivative of the
  per-step loss), ``dL_t/db`` (its total derivative); ``adj(pre(f))`` the adjoint of the
  argument of f's nonlinearity, ``pre(f)`` that argument;
* time: ``prev(X)`` (X at t-1), ``next(X)`` (at t+1), ``at(X, k)`` (at step k); ``h_prev``
  is ``prev(h)``;
* ``sigmoid_prime(a)`` (also written ``sigmoid'(a)``) and the same for every function;
* indices: ``h[l]``, ``W[l, m]``, ``sum(expr, m)``, ``delta(l, i)``, ``e(i)`` (a unit
  vector), ``W.T @ v``, ``(A - A.T - c * I) @ v`` (a combination of matrices, as in the
  equations), ``outer(a, b)``, ``(a, b)`` a concatenation, ``v[a:b]`` rows;
* ``sum_t(expr)`` (over all steps, in ``[total]``), ``T`` the number of steps, ``L`` the loss.

Nothing in the file is evaluated: it is read with :mod:`tomllib` and :mod:`ast` against an
allow-list (the spec reader's, extended), so every mistake is one line naming
``file:line`` (a :class:`ClaimsError`, a :class:`~symrnn.spec.SpecError`).
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import sympy
from sympy.printing.str import StrPrinter

from .cell import Block, Cell, Identity, MatVec, ParamSymbol, Transpose
from .cells import BUILTIN, builtin
from .errors import suggest
from .escape import check_text, one_line, shown
from .lower import NONDIFFERENTIABLE, parse_size
from .ops import OPS, Op
from .spec import MAX_FILE, FileErrors, SpecError, _Builder, _Expr, _index, load_spec, tomllib

__all__ = ["ClaimsError", "Claim", "ClaimsFile", "SizeClaim", "load_claims", "parse_claims", "TIME",
           "Q", "CMatVec", "Entry", "ISum", "Delta", "Unit", "Outer", "Cat", "Rows", "TSum", "Prime", "Transposed"]


class ClaimsError(SpecError):
    """A claims file is wrong; the message starts with ``file:line:``."""


#: the tables of a claims file; each of SCOPES holds claims checked at the steps it names
SCOPES = ("steps", "first", "last", "initial", "total")
TABLES = ("claims", "names", "dims", "constants", "sizes", *SCOPES)
_CLAIMS_KEYS = ("cell", "spec", "source", "first_step", "initial_states", "steps", "seeds")
SCOPE_HELP = {
    "steps": "at every step t",
    "first": "at the first step",
    "last": "at the last step",
    "initial": "before the first step (the initial states)",
    "total": "over the whole sequence",
}

#: the time of the step a claim is evaluated at (a Dummy: no name in a file can be it)
TIME = sympy.Dummy("t", integer=True)
_NONE = sympy.Symbol("_")


class _Atom(sympy.Function):
    """A function of the claims language: commutative in products (its arguments include
    Tuples, which SymPy would otherwise treat as of unknown commutativity)."""

    is_commutative = True


class CMatVec(MatVec):
    """``W @ v`` in a claim (the cell's MatVec, commutative in elementwise products)."""

    is_commutative = True


class Q(_Atom):
    """A quantity of the cell: ``Q(kind, name, wrt, time, Tuple(entry indices))``.

    kinds: ``val`` (a value), ``pre`` (the argument of a value's nonlinearity), ``adj``
    (dL/d value), ``preadj`` (dL/d pre), ``lossp`` (dL^t/d output, partial), ``losst`` (L^t),
    ``sens`` (d value / d parameter entry), ``lsens`` (dL^t / d parameter entry),
    ``grad`` (dL / d parameter entry), ``loss`` (L)."""

    nargs = 5

    @property
    def kind(self) -> str:
        return self.args[0].name

    @property
    def qname(self) -> str:
        return self.args[1].name

    @property
    def wrt(self) -> str:
        return self.args[2].name

    @property
    def time(self) -> sympy.Expr:
        return self.args[3]

    @property
    def entries(self) -> tuple[sympy.Symbol, ...]:
        return tuple(self.args[4])



def q(kind: str, name: str = "_", wrt: str = "_", time=TIME, entries=()) -> Q:
    return Q(sympy.Symbol(kind), sympy.Symbol(name), sympy.Symbol(wrt), sympy.sympify(time), sympy.Tuple(*entries))


class Entry(_Atom):
    """``Entry(v, l)``: entry l of a vector; ``Entry(W, l, m)``: of a matrix (named indices)."""


class ISum(_Atom):
    """``ISum(body, m)``: the sum of body over index m."""

    nargs = 2


class Delta(_Atom):
    """Kronecker's delta of two index expressions."""

    nargs = 2


class Unit(_Atom):
    """``Unit(i)``: the unit vector e_i (the size of i's range)."""

    nargs = 1


class Outer(_Atom):
    """``Outer(a, b)``: the outer product a b^T of two vectors."""

    nargs = 2


class Cat(_Atom):
    """``Cat(a, b, ...)``: the concatenation [a; b; ...] of vectors."""


class Rows(_Atom):
    """``Rows(v, lo, hi)``: rows lo..hi-1 of a vector (0-based, hi excluded)."""

    nargs = 3


class TSum(_Atom):
    """``TSum(body)``: body summed over every step."""

    nargs = 1


class Transposed(_Atom):
    """``W.T``: only on the left of ``@``."""

    nargs = 1


class Prime(_Atom):
    """``Prime(op, a)``: the derivative op'(a), ``op`` the function's name as a Symbol."""

    nargs = 2


@dataclass(frozen=True)
class Claim:
    scope: str
    key: str  # the left side as written
    text: str  # the right side as written
    line: int | None
    lhs: sympy.Expr
    rhs: sympy.Expr
    note: str = ""


@dataclass(frozen=True)
class SizeClaim:
    name: str
    text: str
    line: int | None
    size: sympy.Expr
    note: str = ""


@dataclass(frozen=True)
class ClaimsFile:
    path: str
    cell: Cell
    command: str  # how the cell was named: the built-in name, or --spec FILE
    source: str
    first_step: int
    zero_states: bool
    steps: int
    seeds: tuple[int, ...]
    claims: tuple[Claim, ...]
    sizes: tuple[SizeClaim, ...]
    aliases: tuple[tuple[str, str], ...] = ()  # [names]: (the file's name, the cell's name)


#: the most claims one file holds, the longest key
MAX_CLAIMS, MAX_KEY = 500, 300


def load_claims(path: str | Path) -> ClaimsFile:
    """Read and check a claims file (at most MAX_FILE bytes, UTF-8)."""
    path = Path(path)
    shown_path = shown(str(path), 200)
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_FILE + 1)
        if len(data) > MAX_FILE:
            raise ClaimsError(f"claims file {shown_path} is larger than {MAX_FILE // 1000} kB")
        text = data.decode("utf-8")
    except FileNotFoundError:
        raise ClaimsError(f"claims file {shown_path} does not exist") from None
    except IsADirectoryError:
        raise ClaimsError(f"claims file {shown_path} is a folder, not a file") from None
    except UnicodeDecodeError as exc:
        raise ClaimsError(f"cannot read claims file {shown_path}: it is not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise ClaimsError(f"cannot read claims file {shown_path}: {exc.strerror or exc}") from None
    return parse_claims(text, str(path), base=path.parent)


def parse_claims(text: str, filename: str = "<claims>", base: Path | None = None) -> ClaimsFile:
    return _ClaimsReader(text, filename, base or Path(".")).read()


# -- derivative shorthand ---------------------------------------------------------------
_D = r"(?:d|∂)"
_DERIV = re.compile(rf"(?<![\w.]){_D}([A-Za-z]\w*)(\[[^\[\]]*\])?\s*/\s*{_D}([A-Za-z]\w*)(\[[^\[\]]*\])?(?![\w(\[])")
_PRIME = re.compile(r"\b([A-Za-z]\w*)'\s*\(")


class _ClaimsReader(FileErrors):
    error_type = ClaimsError

    def __init__(self, text: str, filename: str, base: Path):
        self.text, self.filename, self.base = text, one_line(filename), base
        self.lines: dict[tuple[str, str], int] = {}
        self.cell_name = "?"

    def key_text(self, key: str) -> str:
        return shown(key, 60)  # a claim's key is a formula: shortened

    # -- the pass ------------------------------------------------------------------
    def read(self) -> ClaimsFile:
        try:
            data = tomllib.loads(self.text)
        except tomllib.TOMLDecodeError as exc:
            m = re.search(r"\(at line (\d+), column (\d+)\)", str(exc))
            msg = re.sub(r"\s*\((at line \d+, column \d+|at end of document)\)", "", str(exc))
            place = f"{self.filename}:{m.group(1)}:{m.group(2)}" if m else self.filename
            raise ClaimsError(f"{place}: not valid TOML: {msg}") from None
        self.lines = _index(self.text)
        for table, value in data.items():
            if table not in TABLES:
                raise self.error(table, "", f"unknown table{suggest(table, TABLES)}; a claims file has the tables "
                                 f"{', '.join(TABLES)}")
            if not isinstance(value, dict):
                raise self.error(table, "", f"'{table}' must be a table: write [{table}] on its own line")
        if "claims" not in data:
            raise ClaimsError(f"{self.filename}: missing table [claims] (it names the cell: cell = \"lstm\", or "
                              "spec = \"mycell.toml\")")
        head = data["claims"]
        for key in head:
            if key not in _CLAIMS_KEYS:
                raise self.error("claims", key, f"unknown key{suggest(key, _CLAIMS_KEYS)}; [claims] has "
                                 f"{', '.join(_CLAIMS_KEYS)}")
        cell, command = self.the_cell(head)
        self.cell_name = cell.name
        self.cell_constants = dict(cell.constants)
        source = self.string(head, "source", "")
        first_step = self.first_step = self.integer(head, "first_step", 0, -10**6, 10**6)
        states = self.string(head, "initial_states", "random")
        if states not in ("random", "zero"):
            raise self.error("claims", "initial_states", f"expected \"random\" or \"zero\", got {shown(states)}")
        steps = self.integer(head, "steps", 5, 2, 50)
        seeds = head.get("seeds", [1, 2])
        if (not isinstance(seeds, list) or not 1 <= len(seeds) <= 10
                or any(isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < 2**32 for s in seeds)):
            raise self.error("claims", "seeds", "expected a list of 1 to 10 seeds (integers), e.g. seeds = [1, 2]")
        from .lower import lower

        self.graph = lower(cell)
        self.scope_names = self.names_table(data.get("names", {}))
        self.dims = self.dims_table(data.get("dims", {}))
        constants = self.constants_table(data.get("constants", {}))
        self.builder = _ClaimBuilder(self, constants)
        claims = []
        count = 0
        for scope in SCOPES:
            for key, value in data.get(scope, {}).items():
                count += 1
                if count > MAX_CLAIMS:
                    raise self.error(scope, key, f"more than {MAX_CLAIMS} claims in one file")
                claims.append(self.claim(scope, key, value))
        sizes = [self.size_claim(k, v) for k, v in data.get("sizes", {}).items()]
        if not claims and not sizes:
            raise ClaimsError(f"{self.filename}: no claims: write them in [{'], ['.join(SCOPES)}] (or [sizes])")
        return ClaimsFile(self.filename, cell, command, source, first_step, states == "zero", steps,
                          tuple(seeds), tuple(claims), tuple(sizes), tuple(self.scope_names.items()))

    def the_cell(self, head: dict) -> tuple[Cell, str]:
        if ("cell" in head) == ("spec" in head):
            raise self.error("claims", "", "name the cell with cell = \"<built-in name>\" or spec = \"<equations "
                             "file>\" (one of the two)")
        if "cell" in head:
            name = self.string(head, "cell", "")
            if name not in BUILTIN:
                raise self.error("claims", "cell", f"unknown cell {shown(name)}{suggest(name, BUILTIN)}; built-in "
                                 f"cells: {', '.join(BUILTIN)} (or spec = \"file.toml\")")
            return builtin(name), name
        path = self.string(head, "spec", "")
        if not path.strip():
            raise self.error("claims", "spec", "the equations file's name is empty")
        full = Path(path) if Path(path).is_absolute() else self.base / path
        try:
            return load_spec(full), f"--spec {full}"
        except SpecError as exc:
            raise self.error("claims", "spec", f"{exc}", field=True) from None

    def string(self, table: dict, key: str, default: str) -> str:
        value = table.get(key, default)
        if not isinstance(value, str):
            raise self.error("claims", key, f"expected a string, got {shown(repr(value), 40)}")
        try:
            check_text(value, key)
        except ValueError as exc:
            raise self.error("claims", key, str(exc)) from None
        return value

    def integer(self, table: dict, key: str, default: int, lo: int, hi: int) -> int:
        value = table.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise self.error("claims", key, f"expected an integer from {lo} to {hi}, got {shown(repr(value), 40)}")
        return value

    # -- names -------------------------------------------------------------------------
    def cell_names(self) -> dict[str, str]:
        """Every name a claim may use -> what it is."""
        g = self.graph
        kinds = {g.input.name: "the input"}
        for s in g.states:
            kinds[s.name], kinds[s.prev] = "a state", f"state '{s.name}' at t-1"
        for n in g.nodes:
            if n.role != "auxiliary" and n.name not in kinds:
                kinds[n.name] = "a readout" if n.role == "readout" else "an intermediate value"
        for p in g.params:
            kinds[p.name] = "a parameter"
        if g.loss is not None:
            kinds["target"] = "the target"
        for special, what in (("L", "the loss"), ("L_t", "the loss of step t"), ("T", "the number of steps")):
            kinds.setdefault(special, what)
        return kinds

    def names_table(self, table: dict) -> dict[str, str]:
        """[names]: the claims' name -> the cell's name (seed 002's y_hat = "y")."""
        kinds = self.cell_names()
        out = {}
        for alias, name in table.items():
            if not re.fullmatch(r"[A-Za-z]\w*", alias) or len(alias) > 64:
                raise self.error("names", alias, f"{shown(alias)} is not a valid name (letters, digits and _, "
                                 "starting with a letter)", field=False)
            if not isinstance(name, str) or name not in kinds:
                got = shown(name, 40) if isinstance(name, str) else shown(repr(name), 40)
                raise self.error("names", alias, f"{got} is not a name of cell '{self.cell_name}'"
                                 f"{suggest(str(name), kinds)}; its names: {', '.join(kinds)}")
            if alias in OPS or alias in _FUNCTIONS:
                raise self.error("names", alias, f"'{alias}' is the name of a function in claims; choose another")
            out[alias] = name
        return out

    def dims_table(self, table: dict) -> dict[str, str]:
        from .cell import DIMS

        out = {}
        for alias, dim in table.items():
            if not re.fullmatch(r"[A-Za-z]\w*", alias) or not isinstance(dim, str) or dim not in DIMS:
                raise self.error("dims", alias, f"expected a name = one of {', '.join(DIMS)}, e.g. d = \"n_hidden\"")
            out[alias] = dim
        return out

    def constants_table(self, table: dict) -> dict[str, sympy.Expr]:
        """The claims' constants: the cell's own (its equations file's [constants]), then the
        claims file's, which may repeat a cell constant only with its value."""
        import math

        out = dict(self.cell_constants)
        for name, value in table.items():
            if not re.fullmatch(r"[A-Za-z]\w*", name):
                raise self.error("constants", name, f"{shown(name)} is not a valid name", field=False)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or abs(value) > 1e300:
                raise self.error("constants", name, f"expected a finite number, got {shown(repr(value), 40)}")
            if name in self.cell_names() or name in self.scope_names:
                raise self.error("constants", name, f"'{name}' is already a name of cell '{self.cell_name}'")
            number = sympy.Integer(value) if isinstance(value, int) else sympy.Float(value)
            if name in self.cell_constants and sympy.Float(number) != sympy.Float(self.cell_constants[name]):
                raise self.error("constants", name, f"already a constant of cell '{self.cell_name}' "
                                 f"(= {float(self.cell_constants[name]):g}); a claim uses the cell's value: leave it out")
            out[name] = number
        return out

    # -- claims -------------------------------------------------------------------------
    def claim(self, scope: str, key: str, value) -> Claim:
        note = ""
        if isinstance(value, dict):
            extra = sorted(set(value) - {"expr", "note"})
            if extra or "expr" not in value:
                raise self.error(scope, key, 'expected "right side", or { expr = "right side", note = "..." }'
                                 + (f"; unknown key {shown(extra[0])}" if extra else ""))
            note = value.get("note", "")
            if not isinstance(note, str):
                raise self.error(scope, key, "note: expected a string")
            try:
                check_text(note, "note", limit=1000)
            except ValueError as exc:
                raise self.error(scope, key, str(exc)) from None
            value = value["expr"]
        if not isinstance(value, str):
            raise self.error(scope, key, f'expected a formula in quotes, e.g. "dh/db" = "h * (1 - h) * (v * '
                             f'prev(dh/db) + 1)", got {shown(repr(value), 40)}')
        if len(key) > MAX_KEY:
            raise self.error(scope, key[:40], f"the left side is {len(key)} characters long; at most {MAX_KEY}")
        for what, text in (("the left side", key), ("the formula", value)):
            try:  # no control character reaches a report, even in a comment of the formula
                check_text(text, what, limit=MAX_FILE)
            except ValueError as exc:
                raise self.error(scope, key, str(exc)) from None
        line = self.line_of(scope, key)
        lhs = self.builder.parse(scope, key, key, line, side="left")
        lhs = self.check_lhs(scope, key, lhs)
        rhs = self.builder.parse(scope, key, value, line, side="right")
        self.check_rhs(scope, key, lhs, rhs)
        return Claim(scope, key, value, line, lhs, rhs, note)

    def check_lhs(self, scope: str, key: str, lhs: sympy.Expr) -> sympy.Expr:
        core = lhs.args[0] if isinstance(lhs, Entry) else lhs
        if not isinstance(core, Q) or core.kind in ("loss",) and scope != "total":
            raise self.error(scope, key, "the left side must be one quantity: a value (h), a derivative (dh/db, "
                             "dL/dh, dL/dW[i, j], dL_t/dy), adj(pre(f)), optionally with a unit index (ds[l]/dU[i, j]) "
                             "or at(..., k)")
        if isinstance(lhs, Entry) and (len(lhs.args) != 2 or not lhs.args[1].is_Symbol):
            raise self.error(scope, key, "on the left side a unit is one named index, as in ds[l]/dU[i, j]")
        timeless = core.kind in ("grad", "loss")
        if scope == "total" and not timeless:
            raise self.error(scope, key, "[total] holds whole-sequence quantities: dL/dW[i, j], dL/db, L; a "
                             "quantity of one step goes in [steps], [first], [last] or [initial]")
        if scope != "total" and timeless:
            raise self.error(scope, key, "the gradient dL/d<parameter> (and L) is a whole-sequence quantity: put it in "
                             "[total] (as sum_t(...) of per-step terms)")
        if scope == "initial" and core.kind not in ("val", "sens", "adj"):
            raise self.error(scope, key, "[initial] holds what is known before the first step: a state (h), its "
                             "sensitivity (dh/db) or its adjoint (dL/dh)")
        return lhs

    def check_rhs(self, scope: str, key: str, lhs: sympy.Expr, rhs: sympy.Expr) -> None:
        if scope != "total" and rhs.has(TSum):
            raise self.error(scope, key, "sum_t(...) sums over all steps: it belongs in [total]")
        if scope == "total":
            for atom in rhs.atoms(Q):
                if atom.kind not in ("grad", "loss", "steps") and not _inside(rhs, atom, TSum):

                    raise self.error(scope, key, f"in [total], '{claim_text(atom)}' has no step: write it inside "
                                     "sum_t(...)")
        bound = set(lhs.args[1:]) if isinstance(lhs, Entry) else set()
        core = lhs.args[0] if isinstance(lhs, Entry) else lhs
        bound |= set(core.entries)
        free = _free_indices(rhs)
        extra = sorted(i.name for i in free - bound)
        if extra:
            raise self.error(scope, key, f"index '{extra[0]}' is free on the right side but not on the left; sum over "
                             f"it (sum(..., {extra[0]})) or name it on the left")

    def size_claim(self, name: str, value) -> SizeClaim:
        line = self.line_of("sizes", name)
        kinds = self.cell_names()
        real = self.scope_names.get(name, name)
        if real not in kinds or kinds[real] in ("a parameter", "the loss", "the loss of step t", "the number of steps"):
            raise self.error("sizes", name, f"cell '{self.cell_name}' has no value '{name}'{suggest(name, kinds)}")
        note = ""
        if isinstance(value, dict) and set(value) <= {"expr", "note"} and isinstance(value.get("note", ""), str):
            value, note = value.get("expr"), value.get("note", "")
            try:
                check_text(note, "note", limit=1000)
            except ValueError as exc:
                raise self.error("sizes", name, str(exc)) from None
        if not isinstance(value, str):
            raise self.error("sizes", name, 'expected a size in quotes, e.g. "n_hidden", or { expr = "...", note = "..." }')
        text = value
        for alias, dim in self.dims.items():
            text = re.sub(rf"\b{re.escape(alias)}\b", dim, text)
        try:
            size = parse_size(text)
        except ValueError as exc:
            raise self.error("sizes", name, str(exc)) from None
        return SizeClaim(real, value, line, size, note)


def _inside(expr: sympy.Basic, atom: sympy.Basic, kind: type) -> bool:
    """Whether every occurrence of ``atom`` in ``expr`` is inside a ``kind``."""
    if expr == atom:
        return False
    if isinstance(expr, kind):
        return True
    return all(_inside(a, atom, kind) for a in expr.args if a.has(atom))


def _free_indices(expr: sympy.Basic) -> set[sympy.Symbol]:
    """Index symbols of ``expr`` not bound by a sum."""
    if isinstance(expr, ISum):
        return _free_indices(expr.args[0]) - {expr.args[1]}
    if isinstance(expr, sympy.Symbol):
        from .cell import DIMS

        return {expr} if expr.is_integer and expr != TIME and expr not in DIMS.values() else set()
    if isinstance(expr, Q):
        return set(expr.entries)
    out: set[sympy.Symbol] = set()
    for a in expr.args:
        out |= _free_indices(a)
    return out


#: the functions of the claims language beyond the spec's
_FUNCTIONS = {
    "prev": "prev(X): X at step t-1", "next": "next(X): X at step t+1", "at": "at(X, k): X at step k",
    "adj": "adj(h): dL/dh^t; adj(pre(f)): the adjoint of f's pre-activation", "pre": "pre(f): the argument of "
    "f's nonlinearity", "sum": "sum(expr, m): sum over index m", "delta": "delta(l, i): Kronecker's delta",
    "e": "e(i): the unit vector e_i", "outer": "outer(a, b): a b^T", "sum_t": "sum_t(expr): the sum over all steps",
    "deriv": "deriv(h, b): dh/db",
}
_ALLOWED = ("names, numbers, + - * / **, W @ v, W.T @ v, W @ (a, b), (A - A.T - c * I) @ v, W[k], h[l], W[l, m], "
            "v[a:b], (a, b), the "
            "functions " + ", ".join(OPS) + " and their _prime, " + ", ".join(_FUNCTIONS))


class _ClaimBuilder(_Builder):
    """The spec's expression builder, extended with quantities, time, derivatives and indices."""

    def __init__(self, reader: _ClaimsReader, constants: dict[str, sympy.Expr]):
        g = reader.graph
        decls = {p.name: _decl_as_param(p) for p in g.params}
        super().__init__(reader, decls, constants)
        self.g = g
        self.kinds = reader.cell_names()
        self.aliases = reader.scope_names
        self.index_names: set[str] = set()

    # -- entry point --------------------------------------------------------------------
    def parse(self, scope: str, key: str, text: str, line: int | None, side: str) -> sympy.Expr:
        self.side, self.scope = side, scope
        rewritten = self.rewrite(text)
        e = _Expr(scope, key, rewritten, line or 0, None)
        self.in_subscript = 0
        try:
            expr = self.expr(e, set())
        except ClaimsError as exc:  # a message quotes the text as written, not as rewritten
            if rewritten == text:
                raise
            raise ClaimsError(str(exc).replace(" ".join(rewritten.split()), " ".join(text.split()))) from None
        if side == "right" and isinstance(expr, (ParamSymbol, Transposed)) and not _is_scalar_param(self, expr):
            raise self.fail(None, f"a matrix alone is not a value; write {expr} @ v")
        return expr

    def rewrite(self, text: str) -> str:
        """dA/dB -> deriv(A, B) where A and B are names the claims may use; f'(a) -> f_prime(a)."""

        def known(name: str) -> bool:
            return self.aliases.get(name, name) in self.kinds

        def repl(m: re.Match) -> str:
            a, ai, b, bi = m.group(1), m.group(2) or "", m.group(3), m.group(4) or ""
            if not (known(a) and known(b)) or known("d" + a) or known("d" + b):
                return m.group(0)
            return f"deriv({a}{ai}, {b}{bi})"

        text = _DERIV.sub(repl, text)
        return _PRIME.sub(lambda m: f"{m.group(1)}_prime(" if m.group(1) in OPS else m.group(0), text)

    def fail(self, node, message, lineno=None, col=None):
        e = self.e
        line = e.line + (lineno - 1 if lineno else 0) if e.line else None
        where = "left side" if self.side == "left" else "right side"
        return self.reader.error(e.table, e.key, f"{where}: {message}", line=line)

    def build(self, node):
        method = getattr(self, f"_{type(node).__name__}", None)
        if method is None:
            raise self.fail(node, f"'{self.snippet(node)}' is not allowed in a claim (allowed: {_ALLOWED})")
        return super().build(node)

    # -- names ----------------------------------------------------------------------------
    def _Name(self, node: ast.Name):
        name = node.id
        if self.in_subscript:
            return self.index(name, node)
        if name in self.constants:
            return self.constants[name]
        real = self.aliases.get(name, name)
        if real in self.params:
            return self.params[real]
        if real in self.kinds:
            return self.quantity(real, node)
        from .cell import DIMS

        if self.reader.dims.get(name, name) in DIMS:  # a number: the 1/n_hidden of a mean's adjoint
            return DIMS[self.reader.dims.get(name, name)]
        if name in OPS or name in NONDIFFERENTIABLE or name in _FUNCTIONS:
            raise self.fail(node, f"'{name}' is a function; write {name}(...)")
        if real not in self.kinds:
            hint = suggest(name, set(self.kinds) | set(self.aliases))
            rest = name[1:]
            if name[0] in "d∂" and rest and self.aliases.get(rest, rest) not in self.kinds and "/" in self.e.text:
                raise self.fail(node, f"in the derivative {name}/...: cell '{self.reader.cell_name}' has no value "
                                f"'{rest}'{suggest(rest, set(self.kinds) | set(self.aliases))}; its values: "
                                f"{', '.join(n for n, k in self.kinds.items() if k != 'a parameter')}")
            raise self.fail(node, f"unknown symbol '{name}'{hint}: cell '{self.reader.cell_name}' has "
                            f"{', '.join(n for n in self.kinds if n not in ('L', 'L_t', 'T'))}")
        return self.quantity(real, node)

    def quantity(self, name: str, node) -> sympy.Expr:
        g = self.g
        if name == "T":
            return q("steps")
        if name == "L":
            return q("loss", time=0)
        if name == "L_t":
            return q("losst")
        for s in g.states:
            if name == s.prev:
                return q("val", s.name, time=TIME - 1)
        return q("val", name)

    def index(self, name: str, node) -> sympy.Symbol:
        if not re.fullmatch(r"[A-Za-z]\w{0,15}", name):
            raise self.fail(node, f"'{name}' cannot be an index")
        real = self.aliases.get(name, name)
        if real in self.kinds and real not in ("L", "L_t", "T"):
            raise self.fail(node, f"index '{name}' is a name of cell '{self.reader.cell_name}' ({self.kinds[real]}); "
                            "choose an index that is not (l, m, k, p, q, ...)")
        from .cell import DIMS

        if name in DIMS or name in self.reader.dims:
            raise self.fail(node, f"'{name}' is a dimension, not an index")
        self.index_names.add(name)
        return sympy.Symbol(name, integer=True)

    # -- subscripts: row blocks, entries, rows -------------------------------------------
    def _Subscript(self, node: ast.Subscript):
        index = node.slice
        if isinstance(index, ast.Slice):
            value = self.build(node.value)
            if index.step is not None:
                raise self.fail(node, f"'{self.snippet(node)}': a step in a slice is not allowed")
            lo = self.dim_expr(index.lower) if index.lower is not None else sympy.Integer(0)
            hi = self.dim_expr(index.upper) if index.upper is not None else sympy.Symbol("_end")
            return Rows(value, lo, hi)
        if (isinstance(node.value, ast.Name) and self.aliases.get(node.value.id, node.value.id) in self.params
                and isinstance(index, ast.Constant)):
            node = ast.Subscript(value=ast.Name(id=self.aliases.get(node.value.id, node.value.id), ctx=ast.Load()),
                                 slice=index, ctx=ast.Load(), lineno=node.lineno, col_offset=node.col_offset)
            return super()._Subscript(node)  # W[k]: a row block
        value = self.build(node.value)
        items = index.elts if isinstance(index, ast.Tuple) else [index]
        self.in_subscript += 1
        try:
            idx = [self.index_expr(i) for i in items]
        finally:
            self.in_subscript -= 1
        if not all(i.is_Symbol for i in idx):
            raise self.fail(node, f"'{self.snippet(node)}': entries are named by indices (h[l], W[l, m]); an offset "
                            "belongs in delta(l + n_hidden, i)")
        return Entry(value, *idx)

    def index_expr(self, node) -> sympy.Expr:
        if isinstance(node, ast.Name):
            return self.index(node.id, node)
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub)):
            left, right = self.index_expr(node.left), self.index_expr(node.right)
            return left + right if isinstance(node.op, ast.Add) else left - right
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return sympy.Integer(node.value)
        raise self.fail(node, f"'{self.snippet(node)}' is not an index (a name such as l, or l + n_hidden)")

    def dim_expr(self, node) -> sympy.Expr:
        text = self.snippet(node)
        for alias, dim in self.reader.dims.items():
            text = re.sub(rf"\b{re.escape(alias)}\b", dim, text)
        try:
            if text.strip() in ("0",):
                return sympy.Integer(0)
            return parse_size(text)
        except ValueError as exc:
            raise self.fail(node, f"in a slice: {exc}") from None

    def _Tuple(self, node: ast.Tuple):
        if self.in_subscript:
            raise self.fail(node, "unexpected tuple")
        return Cat(*[self.build(v) for v in node.elts])

    def _Attribute(self, node: ast.Attribute):
        if node.attr == "T":
            value = self.build(node.value)
            if isinstance(value, (ParamSymbol, Block)):
                return Transposed(value)
        raise self.fail(node, f"'{self.snippet(node)}': the only attribute in a claim is a matrix's transpose, W.T "
                        f"(allowed: {_ALLOWED})")

    def matmul(self, node: ast.BinOp):
        left = node.left
        if isinstance(left, ast.Name) and left.id == "I" and left.id not in self.params:
            return self.distributed(left, node)  # I @ v
        if isinstance(left, ast.Attribute) and left.attr == "T":
            weight = self._Attribute(left)
        elif isinstance(left, ast.Name):
            weight = self.build(left)
            if not isinstance(weight, ParamSymbol) or not self._is_matrix(weight.name):
                raise self.fail(left, f"the left of @ must be a parameter matrix, got '{self.snippet(left)}'")
        elif isinstance(left, ast.Subscript):
            weight = self._Subscript(left)
        elif isinstance(left, (ast.BinOp, ast.UnaryOp)) and not isinstance(getattr(left, "op", None), ast.MatMult):
            return self.distributed(left, node)
        else:
            raise self.fail(left, f"the left of @ must be a parameter matrix (W, W[k], W.T), got '{self.snippet(left)}'")
        right = node.right
        operands = [self.build(v) for v in right.elts] if isinstance(right, ast.Tuple) else [self.build(right)]
        return CMatVec(weight, sympy.Tuple(*operands))

    def distributed(self, left: ast.AST, node: ast.BinOp):
        """``(A - A.T - c * I) @ v`` as ``A @ v - A.T @ v - c * v``: the combination read as the
        equations read it (symrnn.spec: matrices, transposes, row blocks and I, times numbers,
        constants and scalar parameters), then one product per matrix."""
        weight = sympy.expand(self.combination(left, node))
        if weight == 0:
            raise self.fail(left, f"in '{self.snippet(node)}': the combination of matrices is 0")
        if isinstance(node.right, ast.Tuple):
            raise self.fail(node.right, "a combination of matrices multiplies one vector, not a concatenation")
        vector = self.build(node.right)
        out = sympy.Integer(0)
        for term in sympy.Add.make_args(weight):
            atoms = [f for f in sympy.Mul.make_args(term) if isinstance(f, (ParamSymbol, Block, Transpose, Identity))]
            if len(atoms) != 1:
                raise self.fail(left, f"'{self.snippet(left)}' is not a linear combination of matrices")
            (atom,) = atoms
            coefficient = term / atom
            if isinstance(atom, Identity):
                out += coefficient * vector
            else:
                weight_atom = Transposed(atom.args[0]) if isinstance(atom, Transpose) else atom
                out += coefficient * CMatVec(weight_atom, sympy.Tuple(vector))
        return out

    # -- calls ----------------------------------------------------------------------------
    def _Call(self, node: ast.Call):
        func = node.func
        if not isinstance(func, ast.Name):
            return super()._Call(node)
        name = func.id
        if node.keywords or any(isinstance(a, ast.Starred) for a in node.args):
            raise self.fail(node, f"{name}(...): no keywords or *arguments")
        args = node.args

        def arity(n: int) -> None:
            if len(args) != n:
                raise self.fail(node, f"{name}(...) takes {n} argument{'s' if n > 1 else ''}: {_FUNCTIONS.get(name, name)}")

        if name.endswith("_prime") and name[: -len("_prime")] in OPS:
            arity(1)
            return Prime(sympy.Symbol(name[: -len("_prime")]), self.build(args[0]))
        if name in ("prev", "next"):
            arity(1)
            value = self.build(args[0])
            return value.xreplace({TIME: TIME + (-1 if name == "prev" else 1)}) if value.has(TIME) else value
        if name == "at":
            arity(2)
            value = self.build(args[0])
            k = args[1]
            if isinstance(k, ast.UnaryOp) and isinstance(k.op, ast.USub) and isinstance(k.operand, ast.Constant):
                k = ast.Constant(value=-k.operand.value)
            if not (isinstance(k, ast.Constant) and type(k.value) is int):
                raise self.fail(node, "at(X, k): k is a step number, e.g. at(h, 0)")
            return _pin(value, sympy.Integer(k.value - self.reader.first_step))
        if name == "pre":
            arity(1)
            value = self.build(args[0])
            if not (isinstance(value, Q) and value.kind == "val"):
                raise self.fail(node, "pre(f): f is a value of the cell computed by a nonlinearity")
            self.check_pre(value.qname, node)
            return q("pre", value.qname, time=value.time)
        if name == "adj":
            arity(1)
            return self.adjoint(self.build(args[0]), node)
        if name == "deriv":
            arity(2)
            return self.deriv(args[0], args[1], node)
        if name == "sum" and len(args) == 1:  # sum(v): over the units of v, as in equations files
            return super()._Call(node)
        if name == "sum":
            arity(2)
            if not isinstance(args[1], ast.Name):
                raise self.fail(node, "sum(expr, m): m is the name of the index summed over")
            self.in_subscript += 1
            m = self.index(args[1].id, args[1])
            self.in_subscript -= 1
            return ISum(self.build(args[0]), m)
        if name == "delta":
            arity(2)
            self.in_subscript += 1
            try:
                a, b = self.index_expr(args[0]), self.index_expr(args[1])
            finally:
                self.in_subscript -= 1
            return Delta(a, b)
        if name == "e":
            arity(1)
            self.in_subscript += 1
            try:
                i = self.index_expr(args[0])
            finally:
                self.in_subscript -= 1
            if not i.is_Symbol:
                raise self.fail(node, "e(i): i is an index name")
            return Unit(i)
        if name == "outer":
            arity(2)
            return Outer(self.build(args[0]), self.build(args[1]))
        if name == "sum_t":
            arity(1)
            return TSum(self.build(args[0]))
        if name in OPS:
            arity(1)
            return OPS[name](self.build(args[0]))
        return super()._Call(node)

    def check_pre(self, name: str, node) -> None:
        n = next((n for n in self.g.nodes if n.name == name), None)
        if n is None or not hasattr(n, "op") or n.op is None:
            raise self.fail(node, f"pre({name}): {name} is not computed by a nonlinearity (sigmoid(...), tanh(...)), so "
                            "it has no pre-activation")

    def adjoint(self, value, node) -> sympy.Expr:
        core, idx = (value.args[0], value.args[1:]) if isinstance(value, Entry) else (value, ())
        if not isinstance(core, Q) or core.kind not in ("val", "pre"):
            raise self.fail(node, "adj(...) takes a value of the cell (adj(h), adj(h_prev)) or adj(pre(f))")
        if core.kind == "val" and core.qname == "target":
            raise self.fail(node, "the target has no adjoint")
        if core.kind == "val" and self.g.is_leaf(core.qname) is False and core.qname not in self.kinds:
            raise self.fail(node, f"'{core.qname}' has no adjoint")
        out = q("adj" if core.kind == "val" else "preadj", core.qname, time=core.time)
        return Entry(out, *idx) if idx else out

    def deriv(self, num_node, den_node, node) -> sympy.Expr:
        num = self.build(num_node)
        den = self.build(den_node)
        unit = ()
        if isinstance(num, Entry):
            num, unit = num.args[0], num.args[1:]
        entries: tuple = ()
        if isinstance(den, Entry):
            den, entries = den.args[0], den.args[1:]
        if not isinstance(num, Q):
            raise self.fail(node, f"d{self.snippet(num_node)}/...: differentiate a value of the cell or the loss (L, L_t)")
        if isinstance(den, Q) and den.kind in ("val", "pre"):  # dL/dh: an adjoint
            if entries and not unit:
                unit = entries
            if num.kind == "loss":
                out = self.adjoint(den, node)
            elif num.kind == "losst":
                if den.kind != "val" or den.qname not in self.g.outputs:
                    raise self.fail(node, f"dL_t/d{den.qname}: L^t is differentiated by an output of the step "
                                    f"({', '.join(self.g.outputs)}); dL/d{den.qname} is the adjoint")
                out = q("lossp", den.qname, time=den.time)
            else:
                raise self.fail(node, f"d{num.qname}/d{den.qname}: a derivative is taken by a parameter (dh/db) or of "
                                "the loss (dL/dh); within a step write the chain rule out")
            return Entry(out, *unit) if unit else out
        param = den.args[0] if isinstance(den, Block) else den
        if not isinstance(param, ParamSymbol):
            raise self.fail(node, f"d.../d{self.snippet(den_node)}: the denominator is a parameter, a value or the loss")
        if isinstance(den, Block):
            raise self.fail(node, f"d.../d{param.name}[k]: differentiate by the parameter ({param.name}[i] names one "
                            "entry)")
        decl = self.decls[param.name]
        rank = len(decl.shape)
        whole = num.kind in ("loss", "losst") and not entries  # dL/db_f: the whole gradient vector (or matrix)
        if len(entries) != rank and not whole:
            what = {0: "a scalar: write d.../d{p}", 1: "a vector: name its entry, d.../d{p}[i]",
                    2: "a matrix: name its entry, d.../d{p}[i, j]"}[rank].format(p=param.name)
            raise self.fail(node, f"{param.name} is {what}")
        if num.kind == "val":
            if num.qname == "target":
                raise self.fail(node, "the target does not depend on the parameters")
            out = q("sens", num.qname, param.name, num.time, entries)
        elif num.kind == "pre":
            raise self.fail(node, "dpre(f)/d...: write the sensitivity of the value, df/d...")
        elif num.kind == "losst":
            out = q("lsens", "_", param.name, num.time, entries)
        elif num.kind == "loss":
            out = q("grad", "_", param.name, 0, entries)
        else:
            raise self.fail(node, "cannot differentiate this")
        return Entry(out, *unit) if unit else out


def _pin(expr: sympy.Expr, k: sympy.Integer) -> sympy.Expr:
    """``expr`` with its running step replaced by step ``k`` (relative shifts kept)."""
    return expr.xreplace({TIME: k}) if expr.has(TIME) else expr


def _decl_as_param(p):
    from .cell import Param

    return Param(tuple(str(s) for s in p.shape), blocks=p.blocks)


def _is_scalar_param(builder: _ClaimBuilder, expr) -> bool:
    return isinstance(expr, ParamSymbol) and len(builder.decls[expr.name].shape) < 2


# -- printing the claims language ------------------------------------------------------------------
class ClaimPrinter(StrPrinter):
    """Claims expressions back as text of the claims language (in the file's names)."""

    def __init__(self, names: dict[str, str] | None = None, first_step: int = 0, states=()):
        super().__init__({"order": "none"})
        self.shown = {v: k for k, v in (names or {}).items()}
        self.first_step = first_step
        self.states = set(states)

    def name(self, n: str) -> str:
        return self.shown.get(n, n)

    def _print_ParamSymbol(self, e):
        return self.name(e.name)

    def _print_Symbol(self, e):
        return self.name(e.name)

    def timed(self, text: str, time, name: str = "", kind: str = "val") -> str:
        if time == TIME:
            return text
        if time == TIME - 1:
            if kind == "val" and name in self.states and self.name(name) == name and text.startswith(name):
                return f"{name}_prev{text[len(name):]}"
            return f"prev({text})"
        if time == TIME + 1:
            return f"next({text})"
        if time.has(TIME):
            shift = int(time - TIME)
            return f"{'prev' if shift < 0 else 'next'}(" * abs(shift) + text + ")" * abs(shift)
        return f"at({text}, {int(time) + self.first_step})"

    def _print_Q(self, e: Q):
        k, n = e.kind, self.name(e.qname)
        entries = f"[{', '.join(i.name for i in e.entries)}]" if e.entries else ""
        wrt = self.name(e.wrt) + entries
        text = {
            "val": n, "pre": f"pre({n})", "adj": f"adj({n})", "preadj": f"adj(pre({n}))", "lossp": f"dL_t/d{n}",
            "losst": "L_t", "sens": f"d{n}/d{wrt}", "lsens": f"dL_t/d{wrt}", "grad": f"dL/d{wrt}", "loss": "L",
            "steps": "T",
        }[k]
        if k in ("grad", "loss", "steps"):
            return text
        return self.timed(text, e.time, e.qname, k)

    def _print_Entry(self, e):
        inner = self._print(e.args[0])
        idx = ", ".join(self._print(i) for i in e.args[1:])
        base = e.args[0]
        if isinstance(base, Q) and base.kind in ("sens",):
            # ds[l]/dU[i, j]: the unit index goes on the numerator
            n = self.name(base.qname)
            entries = f"[{', '.join(i.name for i in base.entries)}]" if base.entries else ""
            return self.timed(f"d{n}[{idx}]/d{self.name(base.wrt)}{entries}", base.time, base.qname, "sens")
        if isinstance(base, Q) and base.kind == "val" and base.time != TIME:
            return self.timed(f"{self.name(base.qname)}[{idx}]", base.time, base.qname)
        if not isinstance(base, (Q, ParamSymbol, sympy.Symbol)):
            inner = f"({inner})"
        return f"{inner}[{idx}]"

    def _print_MatVec(self, e):
        w, ops = e.args
        vec = self._print(ops[0]) if len(ops) == 1 else "(" + ", ".join(self._print(o) for o in ops) + ")"
        if len(ops) == 1 and isinstance(ops[0], (sympy.Add, sympy.Mul)):
            vec = f"({vec})"
        return f"{self._print(w)} @ {vec}"

    def _print_Transposed(self, e):
        return f"{self._print(e.args[0])}.T"

    def _print_Block(self, e):
        return f"{self._print(e.args[0])}[{e.args[1]}]"

    def _print_Prime(self, e):
        return f"{e.args[0].name}_prime({self._print(e.args[1])})"

    def _print_ISum(self, e):
        return f"sum({self._print(e.args[0])}, {e.args[1].name})"

    def _print_Delta(self, e):
        return f"delta({self._print(e.args[0])}, {self._print(e.args[1])})"

    def _print_Unit(self, e):
        return f"e({e.args[0].name})"

    def _print_Outer(self, e):
        return f"outer({self._print(e.args[0])}, {self._print(e.args[1])})"

    def _print_Cat(self, e):
        return "(" + ", ".join(self._print(a) for a in e.args) + ")"

    def _print_Rows(self, e):
        v = self._print(e.args[0])
        if not isinstance(e.args[0], (Q, sympy.Symbol)):
            v = f"({v})"
        lo = "" if e.args[1] == 0 else sympy.sstr(e.args[1])
        hi = "" if e.args[2] == sympy.Symbol("_end") else sympy.sstr(e.args[2])
        return f"{v}[{lo}:{hi}]"

    def _print_TSum(self, e):
        return f"sum_t({self._print(e.args[0])})"

    def _print_Function(self, e):
        if isinstance(e, Op):
            return f"{type(e).__name__}({self._print(e.args[0])})"
        return super()._print_Function(e)


def claim_text(expr: sympy.Basic, names=None, first_step: int = 0, states=()) -> str:
    return ClaimPrinter(names, first_step, states).doprint(expr)
