"""The truth ``symrnn verify`` judges claims by: every per-step quantity of a random instance.

On one seeded random instance (small sizes, a few steps, one sequence) the values, the BPTT
adjoints and the RTRL tangents of every value are computed from the derivation objects (the
step graph, :meth:`Derivation.partial`, the matrix rules), and checked against the generated
NumPy module of the cell (its forward, its BPTT and its RTRL gradients) before anything is
judged by them: :class:`Instance`.  :class:`Evaluator` evaluates a claims-language expression
on an instance, with named axes (the units of a vector, a matrix's columns, the indices of a
per-unit claim).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import sympy

from .cell import DIMS, Block, MatVec, ParamSymbol
from .claims import TIME, Cat, Delta, Entry, ISum, Outer, Prime, Q, Rows, TSum, Transposed, Unit, claim_text
from .errors import InternalError
from .ir import MatVecNode, Reduction
from .printing import numpy_function
from .ops import OPS, Op
from .reductions import Reduce

__all__ = ["Instance", "Evaluator", "ShapeMismatch", "SIZES"]

#: the instance verify draws where the cell does not fix the sizes (all different, so that a
#: dimension slip shows)
SIZES = {"n_in": 2, "n_hidden": 3, "n_out": 4}




class ShapeMismatch(Exception):
    """The sides of a claim (or the parts of one side) have sizes that do not fit."""


# -- the step graph, numerically ------------------------------------------------------------
def _num(expr: sympy.Expr, env: dict):
    """A step-graph expression (symbols, numbers, + * **, ops) evaluated on arrays."""
    if expr.is_Symbol:
        return env[expr.name]
    if expr.is_Number:
        return float(expr)
    if isinstance(expr, sympy.Add):
        out = 0.0
        for a in expr.args:
            out = out + _num(a, env)
        return out
    if isinstance(expr, sympy.Mul):
        out = 1.0
        for a in expr.args:
            out = out * _num(a, env)
        return out
    if isinstance(expr, sympy.Pow):
        return _num(expr.args[0], env) ** float(expr.args[1])
    if isinstance(expr, Op):
        return numpy_function(type(expr))(_num(expr.args[0], env))
    raise InternalError(f"verify cannot evaluate {sympy.sstr(expr)}")


def reduce_units(reduce: type[Reduce], a: np.ndarray) -> np.ndarray:
    """A reduction over units (symrnn.reductions) of the last axis of ``a``, by its NumPy spelling."""
    return numpy_function(reduce)(a)[..., 0]


def _prime(op: type[Op], a):
    """op'(a) on arrays, through op(a) as the derivation writes it."""
    y, x = sympy.Symbol("y"), sympy.Symbol("a")
    return _num(op.derivative(y, x), {"y": numpy_function(op)(a), "a": a})


class Instance:
    """One seeded random instance and every per-step quantity of it, from the derivation."""

    def __init__(self, plan, module, seed: int, steps: int, zero_states: bool):
        from .gradcheck import random_problem

        self.plan, self.g, self.der = plan, plan.graph, plan.derivation
        g = self.g
        fixed = dict(g.dims)
        self.sizes = {k: (fixed[k] if fixed[k] is not None else v) for k, v in SIZES.items()}
        self.subs = {DIMS[k]: v for k, v in self.sizes.items()}
        self.T = steps
        problem = random_problem(module, T=steps, B=1, seed=seed, **self.sizes)
        self.params = {k: np.asarray(v, np.float64) for k, v in problem.params.items()}
        self.x = problem.x[:, 0, :]
        self.state0 = {s: (np.zeros_like(v[0]) if zero_states else v[0]) for s, v in problem.state0.items()}
        self.cot = {k: v[:, 0, :] for k, v in problem.grad_outputs.items()}
        self.target = problem.target[:, 0, :] if problem.target is not None and g.loss is not None else None
        self.seed = seed
        self.forward()
        self.backward()
        self.tangents: dict[str, list[dict]] = {}
        self.cross_check(module, problem)

    def size(self, expr) -> int:
        return int(sympy.sympify(expr).subs(self.subs))

    def leaf_value(self, leaf, t, prev):
        if leaf.kind == "input":
            return self.x[t]
        if leaf.kind == "prev_state":
            return prev[leaf.state]
        if leaf.kind == "target":
            return self.target[t]
        p = self.params[leaf.param]
        if leaf.size is None:
            return p
        r0 = 0 if leaf.block is None else leaf.block * self.size(leaf.size)
        return p[r0:r0 + self.size(leaf.size)]

    def matrix(self, node: MatVecNode):
        if self.g.is_derived(node.param):  # M = sum_k c_k P_k, each P_k whole or transposed
            M = sum(float(c) * (self.params[p].T if tr else self.params[p]) for c, p, tr in self.g.weight_terms(node))
            return M, 0, 0, M.shape[1]
        decl = self.g.param(node.param)
        r0 = 0 if node.block is None else node.block * self.size(decl.block_rows)
        c0, c1 = self.size(node.cols[0]), self.size(node.cols[1])
        if node.transpose:  # W[c0:c1].T: the product's columns are rows of W
            return self.params[node.param][c0:c1].T, r0, c0, c1
        return self.params[node.param][r0:r0 + self.size(node.size), c0:c1], r0, c0, c1

    def weight(self, node: Reduction, env: dict) -> np.ndarray:
        """d node / d operand_j at every unit j (symrnn.reductions), on this step's values."""
        w = sympy.sympify(node.weight()).subs(self.subs)
        return np.broadcast_to(_num(w, env), (self.size(node.size),))

    # -- forward ------------------------------------------------------------------
    def forward(self) -> None:
        g = self.g
        prev = dict(self.state0)
        self.values, self.pre = [], []
        for t in range(self.T):
            env = {leaf.name: self.leaf_value(leaf, t, prev) for leaf in g.leaves
                   if leaf.kind != "target" or self.target is not None}
            pre = {}
            for n in g.nodes:
                if isinstance(n, MatVecNode):
                    env[n.name] = self.matrix(n)[0] @ env[n.operand]
                elif isinstance(n, Reduction):  # one value, broadcast back over the operand's units
                    env[n.name] = np.full(self.size(n.size), reduce_units(n.reduce, env[n.operand]))
                else:
                    env[n.name] = np.broadcast_to(_num(n.expr, env), (self.size(n.size),)).astype(np.float64)
                    if n.op is not None:
                        pre[n.name] = np.broadcast_to(_num(n.expr.args[0], env), (self.size(n.size),))
            self.values.append(env)
            self.pre.append(pre)
            prev = {s.name: env[s.name] for s in g.states}

    # -- reverse ----------------------------------------------------------------------
    def backward(self) -> None:
        g, der = self.g, self.der
        loss = g.loss
        scale = 1.0 / self.T if loss is not None and loss.reduction == "mean" else 1.0
        self.lossp, self.losst = [], []
        for t in range(self.T):
            env = self.values[t]
            if loss is not None:
                parts = {o: np.broadcast_to(_num(p, env), env[o].shape) for o, p in der.loss_partials}
                self.losst.append(float(np.sum(_num(loss.expr, env))))
            else:
                parts = {o: self.cot[o][t] for o in g.outputs}
                self.losst.append(float(sum(np.dot(self.cot[o][t], env[o]) for o in g.outputs)))
            self.lossp.append({o: parts.get(o, np.zeros_like(env[o])) for o in g.outputs})
        self.loss = sum(self.losst) * scale
        self.scale = scale
        carry = {s.name: np.zeros(self.size(s.size)) for s in g.states}
        self.adj: list[dict] = [None] * self.T
        grads = {p.name: np.zeros(tuple(self.size(s) for s in p.shape)) for p in g.params}
        for t in reversed(range(self.T)):
            env = self.values[t]
            a: dict[str, np.ndarray] = {}

            def into(name: str):
                acc = np.zeros(self.size(g.size(name)))
                for c in g.consumers(name):
                    if isinstance(c, MatVecNode):
                        acc = acc + self.matrix(c)[0].T @ a[c.name]
                    elif isinstance(c, Reduction):  # d_a += w * sum_k d_r[k]
                        acc = acc + self.weight(c, env) * np.sum(a[c.name])
                    else:
                        acc = acc + _num(der.partial(c.name, name), env) * a[c.name]
                return acc

            for n in reversed(g.nodes):
                acc = into(n.name)
                if n.name in g.outputs:
                    acc = acc + scale * self.lossp[t][n.name]
                if n.name in g.state_names:
                    acc = acc + carry[n.name]
                a[n.name] = acc
            for leaf in g.leaves:
                if leaf.kind in ("input", "prev_state"):
                    a[leaf.name] = into(leaf.name)
            for n in g.nodes:
                if isinstance(n, MatVecNode):
                    W, r0, c0, c1 = self.matrix(n)
                    for c, p, transposed in g.weight_terms(n):
                        if transposed:
                            grads[p][c0:c1] += float(c) * np.outer(env[n.operand], a[n.name])
                        else:
                            grads[p][r0:r0 + W.shape[0], c0:c1] += float(c) * np.outer(a[n.name], env[n.operand])
                else:
                    for dep in n.deps:
                        if g.is_leaf(dep) and g.leaf(dep).kind == "param":
                            leaf = g.leaf(dep)
                            contrib = np.broadcast_to(_num(der.partial(n.name, dep), env) * a[n.name], a[n.name].shape)
                            if leaf.size is None:
                                grads[leaf.param] += contrib.sum()
                            else:
                                r0 = 0 if leaf.block is None else leaf.block * self.size(leaf.size)
                                grads[leaf.param][r0:r0 + contrib.shape[0]] += contrib
            self.adj[t] = a
            carry = {s.name: a[s.prev] for s in g.states}
        self.adj_initial = carry
        self.grads = grads

    # -- forward mode ------------------------------------------------------------------
    def tangent(self, param: str) -> list[dict]:
        """Per step: every value -> d value / d param, shape (size, entries)."""
        if param in self.tangents:
            return self.tangents[param]
        g, der = self.g, self.der
        decl = g.param(param)
        shape = tuple(self.size(s) for s in decl.shape)
        E = int(np.prod(shape)) if shape else 1
        carry = {s.name: np.zeros((self.size(s.size), E)) for s in g.states}
        out = []
        for t in range(self.T):
            env = self.values[t]
            d: dict[str, np.ndarray] = {}
            for leaf in g.leaves:
                if leaf.kind == "prev_state":
                    d[leaf.name] = carry[leaf.state]
                elif leaf.kind == "param" and leaf.param == param:
                    if leaf.size is None:
                        d[leaf.name] = np.ones((1, E))
                    else:
                        n = self.size(leaf.size)
                        r0 = 0 if leaf.block is None else leaf.block * n
                        sel = np.zeros((n, E))
                        sel[np.arange(n), r0 + np.arange(n)] = 1.0
                        d[leaf.name] = sel
                else:
                    d[leaf.name] = np.zeros((1 if leaf.size is None else self.size(leaf.size), E))
            for n in g.nodes:
                size = self.size(n.size)
                if isinstance(n, MatVecNode):
                    W, r0, c0, c1 = self.matrix(n)
                    acc = W @ d[n.operand]
                    for c, p, transposed in g.weight_terms(n):
                        if p != param:
                            continue
                        cols = shape[1]
                        direct = np.zeros((size, E))
                        v = env[n.operand]
                        for r in range(size):
                            if transposed:  # d(W[c0:c1].T v)_r / dW[c0 + c, r] = v_c
                                direct[r, (c0 + np.arange(c1 - c0)) * cols + r] = v
                            else:
                                direct[r, (r0 + r) * cols + c0:(r0 + r) * cols + c1] = v
                        acc = acc + float(c) * direct
                elif isinstance(n, Reduction):  # dr = sum_j w_j da_j, the same at every unit
                    row = (self.weight(n, env)[:, None] * d[n.operand]).sum(axis=0)
                    acc = np.broadcast_to(row, (size, E)).copy()
                else:
                    acc = np.zeros((size, E))
                    for dep, p in der.partials[n.name]:
                        coef = np.asarray(_num(p, env), np.float64)
                        acc = acc + (coef[:, None] if coef.ndim else coef) * d[dep]
                d[n.name] = acc
            out.append(d)
            carry = {s.name: d[s.name] for s in g.states}
        self.tangents[param] = out
        return out

    # -- the generated module agrees ----------------------------------------------------------
    def cross_check(self, module, problem) -> None:
        g = self.g
        x = self.x[:, None, :]
        state0 = {s: v[None, :] for s, v in self.state0.items()}
        outputs, cache = module.forward(self.params, x, state0)
        for o in g.outputs:
            mine = np.stack([self.values[t][o] for t in range(self.T)])
            _agree(mine, outputs[o][:, 0, :], f"the values of '{o}'")
        if g.loss is not None:
            loss, grads = module.loss_and_grads(self.params, x, self.target[:, None, :], state0)
            _agree(np.array(self.loss), np.array(loss), "the loss")
        else:
            grads = module.backward(self.params, cache, {k: v[:, None, :] for k, v in self.cot.items()})
        for p in g.params:
            _agree(self.grads[p.name], grads[p.name], f"the BPTT gradient of '{p.name}'")
            tan = self.tangent(p.name)
            via = sum(self.scale * self.lossp[t][o] @ tan[t][o] for t in range(self.T) for o in g.outputs)
            _agree(np.asarray(via).reshape(self.grads[p.name].shape), grads[p.name], f"the RTRL gradient of '{p.name}'")
        for s in g.states:
            _agree(self.adj_initial[s.name], grads[f"{s.name}0"][0], f"the adjoint of the initial '{s.name}'")

    # -- lookups by claims ---------------------------------------------------------------
    def value_size(self, name: str) -> int:
        return self.size(self.g.size(name))

    def quantity(self, atom: Q, t: int | None):
        """The true value of a claims quantity at step ``t`` (None: a whole-sequence one)."""
        kind, name = atom.kind, atom.qname
        g = self.g
        if kind == "steps":
            return _T(np.array(float(self.T)), ())
        if kind == "loss":
            return _T(np.array(self.loss), ())
        if kind == "grad":
            g_ = self.grads[atom.wrt]
            return _T(g_, tuple(i.name for i in atom.entries) if atom.entries else ("_", "~")[: g_.ndim])
        k = int(atom.time.subs(TIME, t)) if atom.time.has(TIME) else int(atom.time)
        inside = 0 <= k < self.T
        if kind in ("val", "pre"):
            n = self.value_size(name)
            if kind == "val" and k == -1 and name in g.state_names:
                return _T(self.state0[name], ("_",))
            if not inside:
                return _T(np.zeros(n), ("_",))
            source = self.values[k] if kind == "val" else self.pre[k]
            return _T(np.asarray(source[name], np.float64), ("_",))
        if kind in ("adj", "preadj"):
            n = self.value_size(name)
            if kind == "adj" and k == -1 and name in g.state_names:
                return _T(self.adj_initial[name], ("_",))
            if not inside:
                return _T(np.zeros(n), ("_",))
            a = self.adj[k][name]
            if kind == "adj" and isinstance(g.node(name), Reduction) if not g.is_leaf(name) else False:
                return _T(np.array(np.sum(a)), ())  # one number: dL/dmu is the sum of its units' shares
            if kind == "preadj":
                node = g.node(name)
                a = _prime(node.op, self.pre[k][name]) * a
            return _T(a, ("_",))
        if kind == "lossp":
            n = self.value_size(name)
            return _T(self.lossp[k][name] if inside else np.zeros(n), ("_",))
        if kind == "losst":
            return _T(np.array(self.losst[k] if inside else 0.0), ())
        decl = g.param(atom.wrt)
        shape = tuple(self.size(s) for s in decl.shape)
        axes = tuple(i.name for i in atom.entries) if atom.entries or kind == "sens" else ("_", "~")[: len(shape)]
        if kind == "sens":
            n = self.value_size(name)
            if not inside:
                return _T(np.zeros((n, *shape)), ("_", *axes))
            return _T(self.tangent(atom.wrt)[k][name].reshape((n, *shape)), ("_", *axes))
        if kind == "lsens":
            if not inside:
                return _T(np.zeros(shape), axes)
            tan = self.tangent(atom.wrt)[k]
            total = sum(self.lossp[k][o] @ tan[o] for o in g.outputs)
            return _T(np.asarray(total).reshape(shape), axes)
        raise InternalError(f"unknown quantity {kind}")


def _agree(mine, theirs, what: str) -> None:
    mine, theirs = np.asarray(mine, np.float64), np.asarray(theirs, np.float64)
    scale = max(float(np.max(np.abs(theirs))) if theirs.size else 0.0, 1e-300)
    if mine.shape != theirs.shape or float(np.max(np.abs(mine - theirs), initial=0.0)) > 1e-9 * max(scale, 1.0):
        raise InternalError(f"verify's evaluation of {what} disagrees with the generated module")


# -- tensors with named axes -------------------------------------------------------------------
@dataclass(frozen=True)
class _T:
    """An array whose axes have names: '_' the unit of a vector, '~' a matrix's column, or an
    index of the claim (l, i, j)."""

    a: np.ndarray
    axes: tuple[str, ...]

    def sizes(self) -> dict[str, int]:
        return dict(zip(self.axes, self.a.shape))


#: the most entries one intermediate array of a claim may have (indices multiply sizes)
MAX_ENTRIES = 2_000_000


def _align(x: _T, y: _T) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    axes = x.axes + tuple(a for a in y.axes if a not in x.axes)
    sx, sy = x.sizes(), y.sizes()
    total = int(np.prod([{**sy, **sx}[a] for a in axes], dtype=np.float64)) if axes else 1
    if total > MAX_ENTRIES:
        raise ShapeMismatch(f"the claim's indices make an array of {total:,} entries (at most {MAX_ENTRIES:,}); "
                            "use fewer indices at once")
    for a in set(sx) & set(sy):
        if sx[a] != sy[a]:
            what = "a vector" if a == "_" else ("a matrix's columns" if a == "~" else f"index {a}")
            raise ShapeMismatch(f"sizes do not match: {what} of size {sx[a]} meets one of size {sy[a]}")

    def spread(z: _T):
        order = [a for a in axes if a in z.axes]
        arr = np.transpose(z.a, [z.axes.index(a) for a in order]) if z.axes else z.a
        shape = [z.sizes()[a] if a in z.axes else 1 for a in axes]
        return np.reshape(arr, shape)

    return spread(x), spread(y), axes


def _binary(x: _T, y: _T, f) -> _T:
    a, b, axes = _align(x, y)
    out = f(a, b)
    return _T(np.broadcast_to(out, np.broadcast_shapes(a.shape, b.shape)).copy(), axes)


def _rename(x: _T, old: str, new: str) -> _T:
    if new in x.axes and new != old:
        raise ShapeMismatch(f"index {new} is used twice on one quantity")
    return _T(x.a, tuple(new if a == old else a for a in x.axes))


class Evaluator:
    """Evaluates a claims expression on an instance, step by step.

    ``uniform``: a value that is one number per row (a reduction's value, its adjoint) may stand
    where a vector is read, as the vector whose units all hold it: in ``outer(a, b)`` and as what
    ``mean`` reduces (the derivation's own formulas, as the documents print them, read it so).
    Off (claims, the default), either is refused in one line: a claim that means a number where it
    writes a vector is told so."""

    def __init__(self, inst: Instance, ranges: dict[str, int] | None = None, uniform: bool = False):
        self.inst = inst
        self.ranges = dict(ranges or {})
        self.uniform = uniform
        self.dry = False

    def index_range(self, name: str) -> int:
        if name not in self.ranges:
            if self.dry:
                return 1
            raise ShapeMismatch(f"the range of index {name} is not known (use it on a vector, h[{name}], or a matrix)")
        return self.ranges[name]

    def note_range(self, name: str, size: int) -> None:
        if name in self.ranges and self.ranges[name] != size:
            raise ShapeMismatch(f"index {name} runs over {self.ranges[name]} entries in one place and {size} in another")
        self.ranges[name] = size

    def param(self, p: ParamSymbol) -> _T:
        arr = self.inst.params[p.name]
        return _T(arr, ("_", "~")[: arr.ndim])

    def ev(self, e: sympy.Basic, t: int | None) -> _T:
        """The value of claims expression ``e`` at step ``t`` (None: over the sequence), with
        its axes, by the rule of its kind (``_EV``)."""
        if e.is_Number:
            return self._ev_number(e, t)
        for kind, rule in _EV:
            if isinstance(e, kind):
                return rule(self, e, t)
        raise ShapeMismatch(f"cannot evaluate {sympy.sstr(e)}")

    def _ev_q(self, e, t: int | None) -> _T:
        inst = self.inst
        if t is None and e.kind not in ("grad", "loss", "steps") and e.time.has(TIME):
            raise ShapeMismatch(f"'{claim_text(e)}' has no step here")
        out = inst.quantity(e, t)
        for axis, n in zip(out.axes, out.a.shape):
            if axis not in ("_", "~"):
                self.note_range(axis, n)
        return out

    def _ev_symbol(self, e, t: int | None) -> _T:
        """A dimension (n_hidden: the mean's 1/n in a derived formula)."""
        if e not in self.inst.subs:
            raise ShapeMismatch(f"cannot evaluate {sympy.sstr(e)}")
        return _T(np.array(float(self.inst.subs[e])), ())

    def _ev_number(self, e, t: int | None) -> _T:
        return _T(np.array(float(e)), ())

    def _ev_paramsymbol(self, e, t: int | None) -> _T:
        return self.param(e)

    def _ev_block(self, e, t: int | None) -> _T:
        inst = self.inst
        p, k = e.args[0], int(e.args[1])
        arr = inst.params[p.name]
        rows = arr.shape[0] // inst.g.param(p.name).blocks
        return _T(arr[k * rows:(k + 1) * rows], ("_", "~")[: arr.ndim])

    def _ev_add(self, e, t: int | None) -> _T:
        out = self.ev(e.args[0], t)
        for a in e.args[1:]:
            out = _binary(out, self.ev(a, t), np.add)
        return out

    def _ev_mul(self, e, t: int | None) -> _T:
        """A product; one with a factor that is 0 (a value beyond the last step) is 0, as
        verify's specialisation writes it, whatever the others (log of that value: -inf)."""
        factors = [self.ev(a, t) for a in e.args]
        out = factors[0]
        with np.errstate(all="ignore"):
            for f in factors[1:]:
                out = _binary(out, f, np.multiply)
        if any(not np.any(f.a) for f in factors):
            return _T(np.zeros_like(out.a), out.axes)
        return out

    def _ev_pow(self, e, t: int | None) -> _T:
        base = self.ev(e.args[0], t)
        exp = e.args[1]
        with np.errstate(all="ignore"):
            if not exp.is_Number:  # a ** b with an expression b (a > 0)
                return _binary(base, self.ev(exp, t), np.power)
            return _T(np.power(base.a, float(exp)), base.axes)

    def _ev_op(self, e, t: int | None) -> _T:
        x = self.ev(e.args[0], t)
        with np.errstate(over="ignore"):
            return _T(numpy_function(type(e))(x.a), x.axes)

    def _ev_reduce(self, e, t: int | None) -> _T:
        """mean(v), sum(v), logsumexp(v): over the units of v (its axis ``_``), one number
        per other axis (broadcast back wherever it meets a vector)."""
        x = self.ev(e.args[0], t)
        if "_" not in x.axes and self.uniform and type(e).spec_name == "mean":
            return x  # the mean of a uniform vector (the same number at every unit) is that number
        if "_" not in x.axes:
            raise ShapeMismatch(f"{type(e).spec_name}(...) reduces a vector over its units, not a number")
        k = x.axes.index("_")
        with np.errstate(over="ignore"):
            return _T(reduce_units(type(e), np.moveaxis(x.a, k, -1)), x.axes[:k] + x.axes[k + 1:])

    def _ev_prime(self, e, t: int | None) -> _T:
        x = self.ev(e.args[1], t)
        with np.errstate(over="ignore"):
            return _T(_prime(OPS[e.args[0].name], x.a), x.axes)

    def _ev_transposed(self, e, t: int | None) -> _T:
        w = self.ev(e.args[0], t)
        if not {"_", "~"} <= set(w.axes):
            raise ShapeMismatch("only a matrix has a transpose")
        return _T(w.a, tuple({"_": "~", "~": "_"}.get(a, a) for a in w.axes))

    def _ev_matvec(self, e, t: int | None) -> _T:
        w = self.ev(e.args[0], t)
        if not {"_", "~"} <= set(w.axes):
            raise ShapeMismatch("the left of @ is not a matrix")
        parts = [self.ev(o, t) for o in e.args[1]]
        if len(parts) == 1 and "_" not in parts[0].axes and (not parts[0].axes or self.uniform):
            # one number as the vector: a reduction's value (or its adjoint) broadcast over the columns
            one = parts[0]
            parts[0] = _T(np.broadcast_to(one.a[..., None], one.a.shape + (w.sizes()["~"],)), one.axes + ("_",))
        scalars = [k for k, p_ in enumerate(parts) if "_" not in p_.axes]
        if len(parts) > 1 and len(scalars) == 1 and not np.any(parts[scalars[0]].a):
            # W [v; 0]: the 0 is as long as the columns that are left
            known = sum(p_.sizes()["_"] for p_ in parts if "_" in p_.axes)
            cols = w.sizes()["~"] - known
            if cols <= 0:
                raise ShapeMismatch("the concatenation is longer than the matrix's columns")
            parts[scalars[0]] = _T(np.zeros(cols), ("_",))
        v = self.concat(parts)
        v = _rename(v, "_", "~")
        a, b, axes = _align(w, v)
        prod = a * b
        k = axes.index("~")
        return _T(prod.sum(axis=k), axes[:k] + axes[k + 1:])

    def _ev_cat(self, e, t: int | None) -> _T:
        return self.concat([self.ev(o, t) for o in e.args])

    def _ev_rows(self, e, t: int | None) -> _T:
        inst = self.inst
        v = self.ev(e.args[0], t)
        if "_" not in v.axes:
            raise ShapeMismatch("rows v[a:b] of something that is not a vector")
        n = v.sizes()["_"]
        lo = int(e.args[1].subs(inst.subs))
        hi = n if e.args[2] == sympy.Symbol("_end") else int(e.args[2].subs(inst.subs))
        if not 0 <= lo < hi <= n:
            raise ShapeMismatch(f"rows {lo}:{hi} of a vector of size {n}")
        k = v.axes.index("_")
        return _T(np.take(v.a, range(lo, hi), axis=k), v.axes)

    def _ev_outer(self, e, t: int | None) -> _T:
        """outer(a, b); with ``uniform``, either may be one number per row: the result then has no
        '_' (or '~') axis, every row (column) the same."""
        a = self.ev(e.args[0], t)
        b = _rename(self.ev(e.args[1], t), "_", "~")
        if "~" in a.axes or not self.uniform and ("_" not in a.axes or "~" not in b.axes):
            raise ShapeMismatch("outer(a, b) takes two vectors")
        return _binary(a, b, np.multiply)

    def _ev_entry(self, e, t: int | None) -> _T:
        v = self.ev(e.args[0], t)
        idx = [i.name for i in e.args[1:]]
        want = ["_"] if len(idx) == 1 else ["_", "~"]
        if len(idx) > 2 or any(a not in v.axes for a in want):
            raise ShapeMismatch(f"{len(idx)} indices on something that is not a {'vector' if len(idx) == 1 else 'matrix'}")
        for old, new in zip(want, idx):
            self.note_range(new, v.sizes()[old])
            v = _rename(v, old, new)
        return v

    def _ev_isum(self, e, t: int | None) -> _T:
        body = self.ev(e.args[0], t)
        m = e.args[1].name
        if m not in body.axes:
            return _T(body.a * self.index_range(m), body.axes)
        k = body.axes.index(m)
        return _T(body.a.sum(axis=k), body.axes[:k] + body.axes[k + 1:])

    def _ev_delta(self, e, t: int | None) -> _T:
        inst = self.inst
        if self.dry:
            return _T(np.array(1.0), ())
        syms = sorted(e.free_symbols, key=lambda s: s.name)
        grids = np.meshgrid(*[np.arange(self.index_range(s.name)) for s in syms], indexing="ij")
        env = {s: g for s, g in zip(syms, grids)}
        a = _index_value(e.args[0], env, inst.subs)
        b = _index_value(e.args[1], env, inst.subs)
        return _T((np.asarray(a) == np.asarray(b)).astype(np.float64), tuple(s.name for s in syms))

    def _ev_unit(self, e, t: int | None) -> _T:
        i = e.args[0].name
        if self.dry:
            return _T(np.array(1.0), ())
        n = self.index_range(i)
        return _T(np.eye(n), ("_", i))

    def _ev_tsum(self, e, t: int | None) -> _T:
        inst = self.inst
        if t is not None:
            raise ShapeMismatch("sum_t inside a step")
        out = _T(np.array(0.0), ())
        for k in range(inst.T):
            out = _binary(out, self.ev(e.args[0], k), np.add)
        return out

    def concat(self, parts: list[_T]) -> _T:
        if len(parts) == 1:
            if "_" not in parts[0].axes:
                raise ShapeMismatch("a matrix multiplies a vector, not a number")
            return parts[0]
        others = [tuple(a for a in p.axes if a != "_") for p in parts]
        if any("_" not in p.axes for p in parts):
            raise ShapeMismatch("a concatenation (a, b) joins vectors")
        axes = ("_",) + tuple(dict.fromkeys(a for o in others for a in o))
        arrays = []
        for p in parts:
            sizes = p.sizes()
            order = [p.axes.index(a) for a in axes if a in p.axes]
            arr = np.transpose(p.a, order)
            shape = [sizes["_"]] + [sizes.get(a, 1) for a in axes[1:]]
            arrays.append(arr.reshape(shape))
        full = [max(a.shape[k] for a in arrays) for k in range(1, len(axes))]
        return _T(np.concatenate([np.broadcast_to(a, (a.shape[0], *full)) for a in arrays]), axes)


#: the rule of each kind of claims expression (Evaluator.ev), tried in this order
_EV = (
    (Q, Evaluator._ev_q),
    (ParamSymbol, Evaluator._ev_paramsymbol),
    (Block, Evaluator._ev_block),
    (sympy.Add, Evaluator._ev_add),
    (sympy.Mul, Evaluator._ev_mul),
    (sympy.Pow, Evaluator._ev_pow),
    (Op, Evaluator._ev_op),
    (Reduce, Evaluator._ev_reduce),
    (Prime, Evaluator._ev_prime),
    (Transposed, Evaluator._ev_transposed),
    (MatVec, Evaluator._ev_matvec),
    (Cat, Evaluator._ev_cat),
    (Rows, Evaluator._ev_rows),
    (Outer, Evaluator._ev_outer),
    (Entry, Evaluator._ev_entry),
    (ISum, Evaluator._ev_isum),
    (Delta, Evaluator._ev_delta),
    (Unit, Evaluator._ev_unit),
    (TSum, Evaluator._ev_tsum),
    (sympy.Symbol, Evaluator._ev_symbol),
)


def _index_value(expr: sympy.Expr, env: dict, subs: dict):
    expr = expr.subs(subs)
    if expr.is_Number:
        return int(expr)
    if expr.is_Symbol:
        return env[expr]
    if isinstance(expr, sympy.Add):
        return sum(_index_value(a, env, subs) for a in expr.args)
    if isinstance(expr, sympy.Mul):
        out = 1
        for a in expr.args:
            out = out * _index_value(a, env, subs)
        return out
    raise ShapeMismatch(f"{expr} is not an index")


