"""Lowering: a :class:`~symrnn.cell.Cell` (user equations) -> a :class:`~symrnn.ir.StepGraph`.

The lowering resolves every name, checks every size, splits ``W @ (a, b)``
into one matrix-vector node per operand (column blocks of W), turns every
nonlinearity application into a node of its own and rejects, naming it, the
first subexpression it cannot translate.  Errors are :class:`CellError` (a
problem in the user's cell), never assertions.
"""

from __future__ import annotations

import ast
import keyword
import math
import re

import sympy

from .cell import DIMS, Block, Cell, Identity, MatVec, State, Transpose
from .errors import CellError, suggest
from .escape import check_text, shown
from .init import Init, as_init, check_init
from .ir import DerivedMatrix, Leaf, LossIR, MatVecNode, ParamDecl, Pointwise, Reduction, StateDecl, StepGraph
from .ops import OPS, Op, exp, log
from .reductions import Reduce

_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")  # matched with fullmatch: no trailing newline
#: the longest name accepted (a file name is built from the cell's)
MAX_NAME = 64
#: the largest integer a size may hold (sizes beyond it are a mistake, or an attack on memory)
MAX_SIZE = 2**24
#: the deepest nesting of an equation's SymPy expression (a real cell's is under 10)
MAX_DEPTH = 50

_SIZE_HELP = ("a size is n_in, n_hidden or n_out, a positive integer, or a sum of integer multiples of them, "
              "e.g. \"n_hidden + n_in\" or \"4*n_hidden\"")


def parse_size(text: str) -> sympy.Expr:
    """A size written in a string, read with :mod:`ast` against an allow-list (never
    evaluated): the dimensions, positive integer literals, ``+``, integer ``*``, parentheses.
    Raises ValueError saying what is wrong.

    >>> parse_size("4*n_hidden + n_in")
    4*n_hidden + n_in
    """
    if len(text) > 200:
        raise ValueError(f"size {shown(text, 40)} is too long; {_SIZE_HELP}")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except (SyntaxError, ValueError):
        raise ValueError(f"cannot read size {shown(text)}; {_SIZE_HELP}") from None

    def build(node: ast.AST) -> sympy.Expr:
        if isinstance(node, ast.Name) and node.id in DIMS:
            return DIMS[node.id]
        if isinstance(node, ast.Constant) and type(node.value) is int:
            if not 0 < node.value <= MAX_SIZE:
                raise ValueError(f"size {shown(text)}: {node.value} is not a positive integer up to {MAX_SIZE}")
            return sympy.Integer(node.value)
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
            left, right = build(node.left), build(node.right)
            if isinstance(node.op, ast.Mult) and not (left.is_Integer or right.is_Integer):
                raise ValueError(f"size {shown(text)} multiplies two dimensions; {_SIZE_HELP}")
            return left + right if isinstance(node.op, ast.Add) else left * right
        if isinstance(node, ast.Name):
            raise ValueError(f"size {shown(text)} uses unknown dimension '{node.id}'{suggest(node.id, DIMS)} "
                             "(sizes are written in n_in, n_hidden, n_out)")
        raise ValueError(f"size {shown(text)} is not allowed; {_SIZE_HELP}")

    return check_size(build(tree.body), text)


def check_size(expr: sympy.Expr, shown_as) -> sympy.Expr:
    """``expr`` if it is a positive integer combination of the dimensions (so it is a
    positive size for every choice of them), else ValueError."""
    terms = sympy.Add.make_args(sympy.expand(expr))
    ok = True
    for term in terms:
        coeff, rest = term.as_coeff_Mul()
        if not (coeff.is_Integer and coeff > 0 and (rest == 1 or rest in DIMS.values())):
            ok = False
    if not ok or sympy.expand(expr) == 0:
        raise ValueError(f"size {shown(str(shown_as))} is not allowed; {_SIZE_HELP}")
    if any(t.as_coeff_Mul()[0] > MAX_SIZE for t in terms):
        raise ValueError(f"size {shown(str(shown_as))} holds an integer over {MAX_SIZE}")
    return sympy.expand(expr)

#: functions that have no derivative somewhere (SymPy's class name or a spec file's
#: name -> what to write instead); a gradient through them would be wrong or undefined
NONDIFFERENTIABLE: dict[str, str] = {
    "Abs": "abs is not differentiable at 0; for a smooth absolute value write (a**2 + 1e-6)**0.5",
    "abs": "abs is not differentiable at 0; for a smooth absolute value write (a**2 + 1e-6)**0.5",
    "sign": "sign is not differentiable at 0 (and its derivative is 0 elsewhere, so no gradient flows); "
            "for a smooth sign write tanh(k * a) with a large k",
    "Heaviside": "a step is not differentiable at 0 and passes no gradient; for a smooth step write sigmoid(k * a)",
    "Max": "max is not differentiable where its arguments are equal; write relu(a - b) + b, or softplus for a smooth version",
    "max": "max is not differentiable where its arguments are equal; write relu(a - b) + b, or softplus for a smooth version",
    "Min": "min is not differentiable where its arguments are equal; write a - relu(a - b)",
    "min": "min is not differentiable where its arguments are equal; write a - relu(a - b)",
    "floor": "floor is not differentiable at integers and passes no gradient elsewhere",
    "ceiling": "ceil is not differentiable at integers and passes no gradient elsewhere",
    "ceil": "ceil is not differentiable at integers and passes no gradient elsewhere",
    "round": "round is not differentiable and passes no gradient",
}


#: functions symrnn does not have (a spec file's or SymPy's name) -> the spelling that works,
#: with ``{a}`` for the argument
INSTEAD: dict[str, str] = {
    "rsqrt": "write ({a})**-0.5",
    "square": "write ({a})**2",
    "reciprocal": "write 1 / ({a})",
    "log1p": "write log(1 + {a}); log1p(exp(z)) is written softplus(z)",
    "logistic": "write sigmoid({a})",
    "expit": "write sigmoid({a})",
    "sigm": "write sigmoid({a})",
    "pow": "write a**b, e.g. ({a})**2",
}


def _combination(weight: sympy.Expr) -> bool:
    """A weight before @ that is more than one matrix, its row block or its transpose."""
    return isinstance(weight, (sympy.Add, sympy.Mul, Identity))


def instead(name: str, argument: str) -> str:
    """'; write ...' for a function symrnn does not have, or ''."""
    return f"; {INSTEAD[name].format(a=argument)}" if name in INSTEAD else ""


class CellWarning(str):
    """A warning about a cell: its text, and ``where`` (the field it is about)."""

    where: str

    def __new__(cls, text: str, where: str):
        obj = super().__new__(cls, text)
        obj.where = where
        return obj


def lower(cell: Cell) -> StepGraph:
    """Lower a cell to its step graph (the first stage of the pipeline)."""
    lowering = _Lowering(cell)
    try:
        return lowering.run()
    except RecursionError:  # SymPy recursed too deep into an expression under MAX_DEPTH: still the user's cell
        raise lowering.error(lowering.where, "the expression is nested too deeply for SymPy to lower; split it "
                             "into several equations") from None


def depth(expr: sympy.Basic) -> int:
    """How deeply ``expr`` nests (a symbol: 1), counted without recursion; the count stops
    past MAX_DEPTH."""
    deepest, stack, seen = 0, [(expr, 1)], {}
    while stack and deepest <= MAX_DEPTH:
        node, d = stack.pop()
        if seen.get(id(node), 0) >= d:  # a shared subexpression, already walked from this deep
            continue
        seen[id(node)] = d
        deepest = max(deepest, d)
        stack.extend((arg, d + 1) for arg in node.args)
    return deepest


class _Lowering:
    def __init__(self, cell: Cell):
        self.cell = cell
        self.fixed: dict[sympy.Symbol, sympy.Integer] = {}
        self.scope: dict[str, tuple[str, sympy.Expr | None]] = {}  # name -> (what, size)
        self.leaves: list[Leaf] = []
        self.nodes: list = []
        self.used_params: set[str] = set()
        self.taken: set[str] = set()
        names = [*cell.inputs, *cell.states, *cell.params, *cell.equations, *cell.readout]
        self.user_names: set[str] = {n for n in names if isinstance(n, str)} | {f"{s}_prev" for s in cell.states}
        self.sizes: dict[str, sympy.Expr | None] = {}  # every leaf and node
        self.where = "equations"  # the field being lowered
        self.context: sympy.Expr | None = None  # the size of the equation being lowered, if known

    # -- helpers -------------------------------------------------------------
    def error(self, where: str, message: str) -> CellError:
        return CellError(self.cell.name, where, message)

    def size(self, value, where: str) -> sympy.Expr:
        """A declared size: a string (read by :func:`parse_size`, never evaluated), a
        positive int, or a SymPy expression of the same form."""
        try:
            if isinstance(value, str):
                expr = parse_size(value)
            elif isinstance(value, bool) or not isinstance(value, (int, sympy.Expr)):
                raise ValueError(f"a size must be a string such as \"n_hidden\", an int or a SymPy expression, "
                                 f"got {type(value).__name__}")
            else:
                expr = check_size(sympy.Integer(value) if isinstance(value, int) else value, value)
        except ValueError as exc:
            raise self.error(where, str(exc)) from None
        return sympy.expand(expr.subs(self.fixed))

    def init(self, value, where: str) -> Init | None:
        """A declared initializer (text, read by :func:`symrnn.init.parse_init`, never
        evaluated, or an Init), checked for every size with the fixed dimensions."""
        if value is None:
            return None
        try:
            init = as_init(value)
            check_init(init, self.fixed)
        except ValueError as exc:
            raise self.error(where, str(exc)) from None
        return init

    def sympy_expr(self, value, where: str) -> sympy.Expr:
        """An equation of the Python API as a SymPy expression; a string is refused, never
        parsed (equations written as text go in a spec file, read by symrnn.spec)."""
        if isinstance(value, str):
            raise self.error(where, f"is a string ({shown(value, 40)}); build it from SymPy symbols and symrnn's "
                             "functions, or write the cell in an equations file (symrnn.load_spec)")
        try:
            expr = sympy.sympify(value, strict=True)
        except (sympy.SympifyError, TypeError):
            raise self.error(where, f"not a SymPy expression: {type(value).__name__}") from None
        if depth(expr) > MAX_DEPTH:
            raise self.error(where, f"the expression is nested more than {MAX_DEPTH} levels deep; split it into "
                             "several equations")
        return expr

    def same(self, a: sympy.Expr, b: sympy.Expr) -> bool:
        return sympy.simplify(a - b) == 0

    def claim(self, name: str, where: str) -> None:
        """A user's name: any identifier but a Python keyword or a dimension's name (the
        generated code names everything else around it, symrnn.naming)."""
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise self.error(where, f"{shown(name)} is not a valid name (letters, digits and _, starting with a letter)")
        if len(name) > MAX_NAME:
            raise self.error(where, f"'{name[:20]}...' is {len(name)} characters long; a name has at most {MAX_NAME}")
        if keyword.iskeyword(name):
            raise self.error(where, f"'{name}' is a Python keyword; choose another name (e.g. {name}_)")
        if name in DIMS:
            raise self.error(where, f"'{name}' is the name of a dimension (sizes are written in n_in, n_hidden, n_out); "
                             "choose another name")
        if name in self.taken:
            raise self.error(where, f"'{name}' is defined twice")
        self.taken.add(name)

    def fresh(self, base: str) -> str:
        """A name for a node or leaf the lowering makes (tanh_c, W_h_in0, b_rz_0): never a
        user's name, including those of equations not read yet."""
        base = re.sub(r"\W+", "_", base).strip("_")[:40] or "tmp"
        name, k = base, 2
        while name in self.taken or name in self.user_names:
            name, k = f"{base}_{k}", k + 1
        self.taken.add(name)
        return name

    def add_leaf(self, leaf: Leaf) -> None:
        self.leaves.append(leaf)
        self.sizes[leaf.name] = leaf.size
        if leaf.kind != "param":  # a parameter's name stays bound to its declaration
            self.scope[leaf.name] = (leaf.kind, leaf.size)

    def add_node(self, node) -> None:
        self.nodes.append(node)
        self.sizes[node.name] = node.size
        self.scope[node.name] = ("node", node.size)

    # -- the pass ---------------------------------------------------------------
    def run(self) -> StepGraph:
        """Declarations, then equations and readouts, then the graph (verified)."""
        self.check_text()
        input_leaf, states = self.declarations()
        readouts = self.updates_and_readouts(states)
        return self.graph(input_leaf, states, readouts)

    def declarations(self) -> tuple[Leaf, list[StateDecl]]:
        """Fixed dimensions, the input, the states and the parameters, checked."""
        cell = self.cell
        for k, v in cell.dims.items():
            if k not in DIMS:
                raise self.error(f"dims['{k}']", f"unknown dimension (use {', '.join(DIMS)})")
            if type(v) is not int or not 0 < v <= MAX_SIZE:
                raise self.error(f"dims['{k}']", f"{v!r}: a fixed dimension is a positive integer up to {MAX_SIZE}")
            self.fixed[DIMS[k]] = sympy.Integer(v)
        if len(cell.inputs) != 1:
            raise self.error("inputs", f"a cell has exactly one input vector, got {len(cell.inputs)}")
        (in_name, in_size), = cell.inputs.items()
        self.claim(in_name, "inputs")
        input_leaf = Leaf(in_name, "input", self.size(in_size, f"inputs['{in_name}']"))
        self.add_leaf(input_leaf)

        if not cell.states:
            raise self.error("states", "a cell needs at least one state")
        states = []
        for name, size in cell.states.items():
            self.claim(name, "states")
            prev = f"{name}_prev"
            self.claim(prev, f"states['{name}']")
            init = self.init(size.init, f"states['{name}']") if isinstance(size, State) else None
            size = size.size if isinstance(size, State) else size
            s = StateDecl(name, self.size(size, f"states['{name}']"), prev, init)
            states.append(s)
            self.add_leaf(Leaf(prev, "prev_state", s.size, state=name))

        self.params = {}
        self.derived: dict[tuple, DerivedMatrix] = {}  # the combinations of matrices formed once per call
        for name, p in cell.params.items():
            self.claim(name, "params")
            where = f"params['{name}']"
            if len(p.shape) > 2:
                raise self.error(where, "a parameter is a scalar, a vector or a matrix")
            if p.blocks < 1:
                raise self.error(where, "blocks must be a positive integer")
            decl = ParamDecl(name, tuple(self.size(s, where) for s in p.shape), p.blocks, self.init(p.init, where))
            if p.blocks > 1 and decl.kind == "scalar":
                raise self.error(where, "a scalar has no row blocks; row blocks are for a stacked vector or matrix, "
                                 "e.g. shape [\"4*n_hidden\"] with blocks = 4")
            self.params[name] = decl
            self.scope[name] = ("param", None)
        self.check_gradient_keys(in_name, states)
        self.check_sizes_readable(states)
        self.check_input_size(input_leaf, states)
        return input_leaf, states

    def updates_and_readouts(self, states: list[StateDecl]) -> list[str]:
        """The equations and readouts as nodes; returns the readouts' names."""
        cell = self.cell
        state_names = {s.name for s in states}
        for name, expr in cell.equations.items():
            where = f"equation '{name}'"
            if name in self.scope or name in self.taken - state_names:
                raise self.error(where, f"'{name}' is already an input, state at t-1 or parameter")
            if name not in state_names:
                self.claim(name, where)
            role = "state" if name in state_names else "intermediate"
            self.equation(name, expr, role)
        for s in states:
            if s.name not in self.scope:
                raise self.error(f"states['{s.name}']", f"state '{s.name}' has no update equation (add equations['{s.name}'])")
            if not self.same(self.scope[s.name][1], s.size):
                raise self.error(f"equation '{s.name}'", f"the update has size {self.scope[s.name][1]}, the state is declared with {s.size}")

        readouts = []
        for name, expr in cell.readout.items():
            self.claim(name, f"readout '{name}'")
            self.equation(name, expr, "readout")
            readouts.append(name)
        return readouts

    def graph(self, input_leaf: Leaf, states: list[StateDecl], readouts: list[str]) -> StepGraph:
        """The step graph, with the loss and the warnings, verified."""
        cell = self.cell
        self.check_used(states, readouts)
        loss = self.lower_loss(cell, readouts) if cell.loss is not None else None
        warnings = tuple(
            CellWarning(f"cell '{cell.name}': parameter '{p}' is declared and never used", f"params['{p}']")
            for p in self.params if p not in self.used_params
        ) + self.not_recurrent(states)
        graph = StepGraph(
            cell=cell.name,
            source=cell.source,
            description=cell.description,
            dims=tuple((k, cell.dims.get(k)) for k in DIMS),
            input=input_leaf,
            states=tuple(states),
            params=tuple(self.params.values()),
            derived=tuple(self.derived.values()),
            leaves=tuple(self.leaves),
            nodes=tuple(self.nodes),
            readouts=tuple(readouts),
            loss=loss,
            equations=tuple(cell.equations.items()) + tuple(cell.readout.items()),
            warnings=warnings,
        )
        graph.verify()
        return graph

    def check_gradient_keys(self, in_name: str, states: list[StateDecl]) -> None:
        """``backward`` returns one gradient per parameter, ``"x"`` for the input and
        ``"<state>0"`` per initial state: a parameter cannot have one of the others' keys."""
        keys = {"x": "the input" + (f" '{in_name}'" if in_name != "x" else "")}
        keys.update({f"{s.name}0": f"the initial value of state '{s.name}'" for s in states})
        for name in self.params:
            if name in keys:
                raise self.error(f"params['{name}']", f"the gradient of parameter '{name}' would have the key of the "
                                 f"gradient of {keys[name]} (grads['{name}']); rename the parameter")

    def check_text(self) -> None:
        """The cell's name (it names files and modules) and its free text."""
        cell = self.cell
        if not isinstance(cell.name, str) or not _NAME.fullmatch(cell.name) or len(cell.name) > MAX_NAME:
            raise CellError(shown(cell.name, 40)[1:-1], "name", "not a valid cell name: letters, digits and _, starting "
                            f"with a letter, at most {MAX_NAME} characters (it names the generated files)")
        for what in ("source", "description"):
            try:
                check_text(getattr(cell, what), what)
            except ValueError as exc:
                raise self.error(what, str(exc)) from None

    def check_sizes_readable(self, states: list[StateDecl]) -> None:
        """The generated module reads n_hidden off a parameter's shape: one must have it."""
        n_hidden = DIMS["n_hidden"]
        if n_hidden in self.fixed or not any(n_hidden in s.size.free_symbols for s in states):
            return
        for decl in self.params.values():
            for size in decl.shape:
                coeff = sympy.simplify(size / n_hidden)
                if coeff.is_Integer and coeff > 0:
                    return
        raise self.error("params", "no parameter has n_hidden (or k*n_hidden) in its shape, so the generated module "
                         "cannot tell n_hidden from the parameters; declare one (e.g. a bias b of size n_hidden) "
                         "or fix the size in dims")

    def check_input_size(self, input_leaf: Leaf, states: list[StateDecl]) -> None:
        """The generated module reads n_in off x's width: an input whose size is not n_in
        is fine (x = "n_hidden") only where n_in means nothing else."""
        n_in, size = DIMS["n_in"], input_leaf.size
        where = f"inputs['{input_leaf.name}']"
        fixed = self.fixed.get(n_in)
        if fixed is not None:
            if not self.same(size, fixed):
                raise self.error(where, f"the input has size {size}, but dims fixes n_in = {fixed}; a generated module "
                                 "takes n_in from the input's width, so the input's size must be n_in")
            return
        if self.same(size, n_in):
            return
        if n_in in size.free_symbols:
            raise self.error(where, f"the input has size {size}; a generated module takes n_in from the input's width, "
                             "so write the input's size as n_in, or in n_hidden and n_out alone")
        uses = [f"params['{p.name}']" for p in self.params.values() if any(n_in in d.free_symbols for d in p.shape)]
        uses += [f"states['{s.name}']" for s in states if n_in in s.size.free_symbols]
        if uses:
            raise self.error(where, f"the input has size {size}, but n_in appears in {uses[0]}; a generated module "
                             "takes n_in from the input's width, so write the input's size as n_in, or do not use n_in")

    def check_used(self, states: list[StateDecl], readouts: list[str]) -> None:
        """Every intermediate must feed a state update or a readout."""
        needed = {s.name for s in states} | set(readouts)
        for node in reversed(self.nodes):
            if node.name in needed:
                needed |= set(node.deps)
        for node in self.nodes:
            if node.role == "intermediate" and node.name not in needed:
                raise self.error(f"equation '{node.name}'", f"'{node.name}' is computed but no state update or readout "
                                 "uses it; use it or remove it")

    def not_recurrent(self, states: list[StateDecl]) -> tuple[CellWarning, ...]:
        """A warning for each state whose update reads no state at t-1 (through any path)."""
        reads: dict[str, set[str]] = {leaf.name: ({leaf.name} if leaf.kind == "prev_state" else set()) for leaf in self.leaves}
        for node in self.nodes:
            reads[node.name] = set().union(*(reads.get(d, set()) for d in node.deps))
        prevs = ", ".join(s.prev for s in states)
        return tuple(
            CellWarning(f"cell '{self.cell.name}', equation '{s.name}': the update of state '{s.name}' reads no state "
                        f"at t-1 ({prevs}), so it is not recurrent", f"equation '{s.name}'")
            for s in states if not reads[s.name]
        )

    def lower_loss(self, cell: Cell, readouts: list[str]) -> LossIR:
        loss = cell.loss
        if loss.reduction not in ("sum", "mean"):
            raise self.error("loss", f"reduction must be 'sum' or 'mean', got {loss.reduction!r}")
        if loss.target_of not in readouts:
            raise self.error("loss", f"target_of names readout '{loss.target_of}', which the cell does not have")
        if "target" in self.taken:
            raise self.error("loss", "'target' is the target in the loss; rename the value called 'target'")
        self.scope["target"] = ("target", self.scope[loss.target_of][1])
        self.leaves.append(Leaf("target", "target", self.scope[loss.target_of][1]))
        self.where = "loss"
        expr = self.resolve_plain(self.sympy_expr(loss.expr, "loss"), "loss")
        return LossIR(expr, loss.reduction, "target", loss.target_of)

    def resolve_plain(self, expr: sympy.Expr, where: str) -> sympy.Expr:
        """Check the names of an expression that is not lowered into nodes (the loss)."""
        for sub in sympy.preorder_traversal(expr):
            if isinstance(sub, (MatVec, Block)):
                raise self.error(where, "a matrix product is not allowed here")
            if isinstance(sub, sympy.Symbol):
                self.lookup(sub.name, where)
            elif type(sub).__name__ in NONDIFFERENTIABLE:
                raise self.error(where, f"{NONDIFFERENTIABLE[type(sub).__name__]} (a gradient is needed here)")
            elif isinstance(sub, sympy.Function) and not isinstance(sub, Op):
                raise self.function_error(sub, where)
        return expr

    def lookup(self, name: str, where: str) -> tuple[str, sympy.Expr | None]:
        if name in self.scope:
            return self.scope[name]
        if name in self.cell.states:
            raise self.error(where, f"state '{name}' is used before its update equation; write {name}_prev for its value at t-1")
        if name in self.cell.equations:
            cycle = self.cycle(name)
            current = where.partition("'")[2].rstrip("'")
            if current in cycle[:-1]:  # start the chain at the equation being read
                k = cycle.index(current)
                cycle = cycle[k:-1] + cycle[:k] + [current]
            if cycle:
                raise self.error(where, "circular definition: " + " -> ".join(cycle) + " (each equation uses the next)")
            raise self.error(where, f"'{name}' is used before its equation; give equation '{name}' first")
        raise self.error(where, f"unknown symbol '{name}'{suggest(name, self.scope)}")

    def cycle(self, start: str) -> list[str]:
        """A chain start -> ... -> start of equations that use each other, or []."""
        eqs = self.cell.equations
        uses = {k: sorted(s.name for s in self.sympy_expr(v, f"equation '{k}'").free_symbols if s.name in eqs)
                for k, v in eqs.items()}
        path: list[str] = []

        def visit(name: str, seen: set) -> bool:
            path.append(name)
            for dep in uses.get(name, []):
                if dep == start or (dep not in seen and visit(dep, seen | {dep})):
                    if dep == start:
                        path.append(start)
                    return True
            path.pop()
            return False

        return path if visit(start, {start}) else []

    # -- equations ----------------------------------------------------------------
    def equation(self, name: str, expr, role: str) -> None:
        where = self.where = f"equation '{name}'"
        expr = self.sympy_expr(expr, where)
        if isinstance(expr, sympy.Pow) and not expr.args[1].is_Number:  # a ** b: the node exp(b log a)
            expr = exp(expr.args[1] * self.log_of(expr.args[0], expr, where))
        if isinstance(expr, MatVec) and len(expr.args[1]) == 1 and not _combination(expr.args[0]):
            self.matvec(expr, where, name=name, role=role)
            return
        self.context = self.context_size(expr)  # the size of a scalar parameter's nonlinearity (sigmoid(a))
        if isinstance(expr, Reduce) and role == "intermediate":  # mu = mean(a): the node is mu
            self.reduction(expr, name, where, name=name)
            return
        if isinstance(expr, Op):
            body = type(expr)(self.rational(expr.args[0], name, where))
        else:
            body = self.rational(expr, name, where)
        node = Pointwise(name, self.pointwise_size(body, where), body, role, name)
        self.add_node(node)

    def rational(self, expr: sympy.Expr, eq: str, where: str) -> sympy.Expr:
        """Lower an expression to one over value symbols, creating nodes as needed."""
        if isinstance(expr, MatVec) and _combination(expr.args[0]):
            return self.combination(expr, eq, where)
        if isinstance(expr, MatVec):
            return sympy.Add(*[sympy.Symbol(n.name) for n in self.matvec(expr, where, equation=eq)])
        if isinstance(expr, Transpose):
            raise self.error(where, f"{sympy.sstr(expr)} can only multiply a vector ({sympy.sstr(expr)} @ v)")
        if isinstance(expr, Identity):
            raise self.error(where, "I is the identity matrix: it is only allowed in a combination of matrices before @, "
                             "as (W - gamma * I) @ h")
        if isinstance(expr, Block):
            return sympy.Symbol(self.param_leaf(expr.args[0].name, int(expr.args[1]), where))
        if isinstance(expr, Reduce):
            return sympy.Symbol(self.reduction(expr, eq, where))
        if isinstance(expr, Op):
            arg = self.rational(expr.args[0], eq, where)
            base = f"{type(expr).__name__}_{arg.name if arg.is_Symbol else eq}"
            node = Pointwise(self.fresh(base), self.pointwise_size(arg, where, broadcast=True), type(expr)(arg),
                             "auxiliary", eq)
            self.add_node(node)
            return sympy.Symbol(node.name)
        if isinstance(expr, sympy.Symbol):
            kind, _ = self.lookup(expr.name, where)
            if kind == "param":
                return sympy.Symbol(self.param_leaf(expr.name, None, where))
            if kind == "target":
                raise self.error(where, "'target' is only available in the loss")
            return sympy.Symbol(expr.name)
        if expr in (sympy.zoo, sympy.nan) or expr.has(sympy.zoo):
            raise self.error(where, "the expression divides by zero (or is undefined): it has the value "
                             f"{sympy.sstr(expr)}")
        if expr.is_Number:
            if not expr.is_real:
                raise self.error(where, f"complex constant {expr}")
            if expr.is_infinite or abs(float(expr)) > 1.7e308:
                raise self.error(where, f"the number {sympy.sstr(expr)[:30]} is beyond the range of a float64 (about 1e308)")
            return expr
        if isinstance(expr, sympy.Pow):
            if not expr.args[1].is_Number:  # a ** b = exp(b log a), for a > 0
                return self.rational(exp(expr.args[1] * self.log_of(expr.args[0], expr, where)), eq, where)
            return sympy.Pow(self.rational(expr.args[0], eq, where), expr.args[1])
        if isinstance(expr, (sympy.Add, sympy.Mul)):
            return expr.func(*[self.rational(a, eq, where) for a in expr.args])
        fname = type(expr).__name__
        if fname in NONDIFFERENTIABLE:
            raise self.error(where, f"{NONDIFFERENTIABLE[fname]} (a gradient is needed here)")
        if isinstance(expr, sympy.Function):
            raise self.function_error(expr, where)
        raise self.error(where, f"cannot translate {sympy.sstr(expr)!r} ({type(expr).__name__})")

    def log_of(self, base: sympy.Expr, power: sympy.Expr, where: str) -> sympy.Expr:
        """log(base) for ``base ** b`` with an expression ``b`` (computed as exp(b log base)):
        a number's is a number, a positive one's only."""
        if not base.is_Number:
            return log(base)
        if not base.is_real or base <= 0:
            raise self.error(where, f"in {sympy.sstr(power)}: a power with an expression as exponent needs a positive "
                             "base (it is exp(b log a))")
        return sympy.Float(math.log(float(base)))

    def context_size(self, expr: sympy.Expr) -> sympy.Expr | None:
        """The size of the first vector an equation reads (a matrix product's rows), or None."""
        for sub in sympy.preorder_traversal(expr):
            if isinstance(sub, MatVec):
                weight = sub.args[0]
                if isinstance(weight, (sympy.Symbol, Block, Transpose)):
                    name = weight.args[0].name if isinstance(weight, (Block, Transpose)) else weight.name
                    decl = self.params.get(name)
                    if decl is not None and decl.kind == "matrix":
                        return decl.shape[1] if isinstance(weight, Transpose) else decl.block_rows
            elif isinstance(sub, sympy.Symbol):
                decl = self.params.get(sub.name)
                if decl is not None and decl.kind == "vector":
                    return decl.block_rows
                if decl is None and self.scope.get(sub.name, ("", None))[1] is not None:
                    return self.scope[sub.name][1]
        return None

    def combination(self, expr: MatVec, eq: str, where: str) -> sympy.Expr:
        """``(c_1 M_1 + c_2 M_2 + ...) @ v``, each M_k a matrix, a transpose or I and each c_k a
        number or a scalar: the sum of c_k (M_k @ v), one product per matrix."""
        weight, operands = expr.args
        if len(operands) != 1:
            raise self.error(where, f"in {sympy.sstr(expr)}: a combination of matrices multiplies one vector, "
                             "not a concatenation")
        coeffs: dict[sympy.Expr, list] = {}
        for term in sympy.Add.make_args(sympy.expand(weight)):
            mats = [f for f in sympy.Mul.make_args(term) if self.is_matrix(f)]
            if len(mats) != 1:
                raise self.error(where, f"in {sympy.sstr(expr)}: the term {sympy.sstr(term)} is not a scalar times one "
                                 "matrix; each term of a combination before @ is a number or a scalar parameter times "
                                 "a matrix, its transpose (W.T) or the identity I")
            coeffs.setdefault(mats[0], []).append(term / mats[0])
        operand = sympy.Symbol(self.operand_name(operands[0], 0, "I", eq, where))
        derived = self.derived_product(coeffs, operand.name, eq, where)
        if derived is not None:
            return derived
        out, shapes = [], []
        for mat, parts in coeffs.items():
            coeff = sympy.Add(*parts)
            if coeff == 0:
                continue
            lowered = self.rational(coeff, eq, where)
            vector = next((s.name for s in lowered.free_symbols if self.sizes[s.name] is not None), None)
            if vector is not None:
                raise self.error(where, f"in {sympy.sstr(expr)}: '{vector}' is a vector and cannot scale a matrix; "
                                 f"write {vector} * (M @ v) for a product scaled unit by unit")
            if isinstance(mat, Identity):
                out.append(lowered * operand)
                continue
            node, = self.matvec(MatVec(mat, sympy.Tuple(operand)), where, equation=eq)
            shapes.append((sympy.sstr(mat), node.size))
            out.append(lowered * sympy.Symbol(node.name))
        size = self.sizes[operand.name]
        for mat, rows in shapes:
            if (Identity() in coeffs or len(shapes) > 1) and not self.same(rows, size if Identity() in coeffs else shapes[0][1]):
                raise self.error(where, f"in {sympy.sstr(expr)}: {mat} has {rows} rows, but the other matrices of the "
                                 f"combination have {size if Identity() in coeffs else shapes[0][1]}; the matrices "
                                 "(and I) of a combination have one shape")
        if not out:
            raise self.error(where, f"in {sympy.sstr(expr)}: the combination of matrices is 0")
        return sympy.Add(*out)

    def derived_product(self, coeffs: dict, operand: str, eq: str, where: str) -> sympy.Expr | None:
        """``(c_1 M_1 + c_2 M_2 + ... + c I) @ v`` as one product, ``D v + c v`` with the matrix
        ``D = sum_k c_k M_k`` formed once per call (ir.DerivedMatrix), where that is what it is:
        two or more whole matrix parameters or transposes of one shape, with numbers as
        coefficients.  None otherwise (row blocks, scalar-parameter coefficients, a single
        matrix, or shapes that do not agree: one product per matrix, whose checks name the
        mistake)."""
        terms, shapes = [], set()
        for mat, parts in coeffs.items():
            coeff = sympy.Add(*parts)
            if isinstance(mat, Identity) or coeff == 0:
                continue
            transpose = isinstance(mat, Transpose)
            base = mat.args[0] if transpose else mat
            decl = self.params.get(base.name) if isinstance(base, sympy.Symbol) else None
            if decl is None or decl.kind != "matrix" or decl.blocks != 1 or not coeff.is_Number:
                return None
            shapes.add(tuple(reversed(decl.shape)) if transpose else tuple(decl.shape))
            terms.append((coeff, base.name, transpose))
        if len(terms) < 2 or len(shapes) != 1:
            return None
        (rows, cols), = shapes
        if not self.same(cols, self.sizes[operand]):
            return None
        terms.sort(key=lambda t: (t[1], t[2]))
        key = tuple(terms)
        if key not in self.derived:
            name = self.fresh(f"M_{eq}")
            self.derived[key] = DerivedMatrix(name, (rows, cols), key)
            self.used_params.update(t[1] for t in terms)
        identity = coeffs.get(Identity())
        scale = self.rational(sympy.Add(*identity), eq, where) if identity else None
        if scale is not None and any(self.sizes[s.name] is not None for s in scale.free_symbols):
            return None  # a vector times I: refused by the product per matrix
        matrix = self.derived[key]
        node = MatVecNode(self.fresh(f"{matrix.name}_{operand}"), rows, matrix.name, None, (sympy.Integer(0), cols),
                          operand, "auxiliary", eq)
        self.add_node(node)
        return sympy.Symbol(node.name) + (scale * sympy.Symbol(operand) if scale is not None else 0)

    def is_matrix(self, factor: sympy.Expr) -> bool:
        """A matrix factor of a combination: a matrix parameter, a row block, a transpose, I."""
        if isinstance(factor, (Identity, Block, Transpose)):
            return True
        return isinstance(factor, sympy.Symbol) and factor.name in self.params and self.params[factor.name].kind == "matrix"

    def operand_name(self, operand: sympy.Expr, i: int, weight: str, eq: str, where: str) -> str:
        """The value a product multiplies: ``operand`` lowered, as a node of its own if it is
        more than one vector's name."""
        lowered = self.rational(operand, eq or "mv", where)
        if lowered.is_Symbol and self.scope[lowered.name][1] is not None:
            return lowered.name
        aux = Pointwise(self.fresh(f"{weight}_in{i}"), self.pointwise_size(lowered, where), lowered, "auxiliary", eq)
        self.add_node(aux)
        return aux.name
    def reduction(self, expr: Reduce, eq: str, where: str, name: str | None = None) -> str:
        """A reduction over units as a node of its own (named ``name``, or mean_a); its operand
        is a node: an expression, a leaf (the input, a state at t-1, a parameter) get an
        auxiliary node of their own.  Returns the node's name."""
        kind = type(expr)
        arg = self.rational(expr.args[0], eq, where)
        size = self.pointwise_size(arg, where)
        if arg.is_Symbol and arg.name in self.scope and self.scope[arg.name][0] == "node":
            operand = arg.name
        else:
            operand = self.fresh(f"{kind.spec_name}_in_{arg.name if arg.is_Symbol else eq}")
            self.add_node(Pointwise(operand, size, arg, "auxiliary", eq))
        node_name = name or self.fresh(f"{kind.spec_name}_{operand}")
        self.add_node(Reduction(node_name, size, kind, operand, "intermediate" if name else "auxiliary", eq))
        return node_name

    def function_error(self, expr: sympy.Function, where: str) -> CellError:
        """A function that is not one of symrnn's ops, with the spelling that works."""
        fname = type(expr).__name__
        arg = sympy.sstr(expr.args[0]) if expr.args else "a"
        if fname in OPS:  # SymPy's function of the same name
            return self.error(where, f"{fname}({arg}) is SymPy's {fname}, not symrnn's: write symrnn.{fname}({arg}) "
                              f"(from symrnn import {fname})")
        hint = instead(fname, arg) or suggest(fname, OPS)
        return self.error(where, f"function '{fname}' is not allowed (allowed: {', '.join(OPS)}){hint}")

    def param_leaf(self, name: str, block: int | None, where: str) -> str:
        """The leaf of a parameter (or one row block of it) used elementwise."""
        decl = self.params.get(name)
        if decl is None:
            self.lookup(name, where)
            raise self.error(where, f"'{name}' is not a parameter")
        if decl.kind == "matrix":
            raise self.error(where, f"matrix '{name}' can only multiply a vector ({name} @ v)")
        if decl.blocks > 1 and block is None:
            raise self.error(where, f"'{name}' has {decl.blocks} row blocks; use one of them, {name}[k]")
        if block is not None and not 0 <= block < decl.blocks:
            raise self.error(where, f"{name}[{block}]: '{name}' has row blocks 0..{decl.blocks - 1}")
        self.used_params.add(name)
        for leaf in self.leaves:
            if leaf.kind == "param" and leaf.param == name and leaf.block == block:
                return leaf.name
        leaf_name = name if block is None else self.fresh(f"{name}_{block}")
        size = None if decl.kind == "scalar" else decl.block_rows
        self.add_leaf(Leaf(leaf_name, "param", size, param=name, block=block))
        return leaf_name

    def matvec(self, expr: MatVec, where: str, name: str | None = None, role: str = "auxiliary",
               equation: str = "") -> list[MatVecNode]:
        equation = name or equation  # the cell equation these nodes are part of
        weight, operands = expr.args
        block, transpose = None, isinstance(weight, Transpose)
        if transpose:
            weight = weight.args[0]
            if isinstance(weight, Block):
                raise self.error(where, f"in {sympy.sstr(expr)}: a row block has no transpose here; declare the "
                                 "blocks as parameters of their own to use their transposes")
        if isinstance(weight, Block):
            weight, block = weight.args[0], int(weight.args[1])
        if not isinstance(weight, sympy.Symbol):
            raise self.error(where, f"in {sympy.sstr(expr)}: the left of @ must be a parameter matrix")
        decl = self.params.get(weight.name)
        if decl is None:
            self.lookup(weight.name, where)
            raise self.error(where, f"'{weight.name}' @ ...: '{weight.name}' is not a parameter")
        if decl.kind != "matrix":
            how = "scales every unit" if decl.kind == "scalar" else "multiplies a vector elementwise (a diagonal matrix)"
            raise self.error(where, f"'{weight.name}' @ ...: '{weight.name}' is a {decl.kind}, not a matrix; a {decl.kind} "
                             f"{how}: write {weight.name} * v (or declare '{weight.name}' as a matrix, "
                             "e.g. [\"n_hidden\", \"n_in\"])")
        if decl.blocks > 1 and block is None:
            raise self.error(where, f"'{weight.name}' has {decl.blocks} row blocks; write {weight.name}[k] @ ...")
        if block is not None and not 0 <= block < decl.blocks:
            raise self.error(where, f"{weight.name}[{block}]: '{weight.name}' has row blocks 0..{decl.blocks - 1}")
        self.used_params.add(weight.name)
        names = [self.operand_name(operand, i, weight.name, equation, where) for i, operand in enumerate(operands)]
        sizes = [self.scope[n][1] for n in names]
        total = sympy.Add(*sizes)
        rows, cols = (decl.shape[1], decl.shape[0]) if transpose else (decl.block_rows, decl.shape[1])
        shown_weight = weight.name + (".T" if transpose else "")
        if not self.same(total, cols):
            got = " + ".join(f"{n} ({s})" for n, s in zip(names, sizes))
            raise self.error(where, f"{shown_weight} @ ...: {shown_weight} has {cols} columns but the vector has {got} = {total} entries")
        nodes, start = [], sympy.Integer(0)
        single = len(names) == 1 and name is not None
        for operand, size in zip(names, sizes):
            base = weight.name + (f"_{block}" if block is not None else "") + ("_T" if transpose else "") + f"_{operand}"
            node_name = name if single else self.fresh(base)
            node = MatVecNode(node_name, rows, weight.name, block, (start, start + size), operand,
                              role if single else "auxiliary", equation, transpose)
            self.add_node(node)
            nodes.append(node)
            start = start + size
        return nodes

    def pointwise_size(self, expr: sympy.Expr, where: str, broadcast: bool = False) -> sympy.Expr:
        """The size of an elementwise expression; ``broadcast``: a nonlinearity of scalars
        alone (sigmoid(a), a a scalar parameter) takes the size of the equation it is in."""
        sizes = {}
        for s in sorted(expr.free_symbols, key=lambda s: s.name):
            size = self.sizes[s.name]
            if size is not None:
                sizes[s.name] = size
        if not sizes and broadcast and expr.free_symbols and self.context is not None:
            return self.context
        if not sizes:
            vector = next((leaf.name for leaf in self.leaves if leaf.kind == "prev_state"), "x")
            scalar = min((s.name for s in expr.free_symbols), default=None)
            fix = (f"a scalar parameter scales a vector (write {scalar} * {vector}), or declare '{scalar}' as a vector, "
                   "e.g. [\"n_hidden\"]") if scalar else f"a number scales a vector, e.g. {sympy.sstr(expr)} * {vector}"
            raise self.error(where, f"{sympy.sstr(expr)} has no vector in it, so its size is unknown; {fix}")
        first_name, first = next(iter(sizes.items()))
        for n, s in sizes.items():
            if not self.same(s, first):
                raise self.error(where, f"elementwise operation on vectors of different sizes: '{first_name}' has {first}, "
                                        f"'{n}' has {s}{self.reduction_hint(first_name, n)}")
        return first

    def reduction_hint(self, *names: str) -> str:
        """Where one of ``names`` is a reduction's value (or computed from reductions alone):
        why it has a size, and the rewrite that usually works."""
        for name in names:
            found = self.reduction_of(name)
            if found is not None:
                operand = self.node_named(found.operand)
                shown = sympy.sstr(operand.expr) if operand.role == "auxiliary" else operand.name
                auxiliary = self.node_named(name).role == "auxiliary"
                source = "" if found.name == name else "computed from " if auxiliary else f"{name} is computed from "
                return (f" ({source}{found.reduce.spec_name}({shown}), "
                        "a reduction: it is one value repeated over the units of what it reduces, and keeps that size; "
                        "beside a product W @ v, scale the product's operand instead: W @ (v * r) is (W @ v) * r)")
        return ""

    def node_named(self, name: str):
        """The node called ``name`` (None: a leaf)."""
        return next((n for n in self.nodes if n.name == name), None)

    def reduction_of(self, name: str) -> Reduction | None:
        """The reduction ``name`` is, or the first of those it is computed from where it is
        computed from reductions (and scalars) alone; else None."""
        node = self.node_named(name)
        if isinstance(node, Reduction):
            return node
        if not isinstance(node, Pointwise):
            return None
        vectors = [d for d in node.deps if self.sizes.get(d) is not None]
        found = [self.reduction_of(d) for d in vectors]
        return found[0] if found and all(found) else None
