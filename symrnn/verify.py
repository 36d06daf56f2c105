"""``symrnn verify``: check the claims of a hand derivation against the derived gradients.

For every claim of a claims file (:mod:`symrnn.claims`, ``docs/claims-format.md``):

1. **the truth.**  On a few seeded random instances (small sizes, a few steps, one
   sequence), every per-step quantity a claim can name is computed from the derivation
   objects: values from the step graph, adjoints from :meth:`Derivation.adjoint_terms`,
   sensitivities from the local partials and the matrix rules.  Before any claim is judged,
   these are checked against the generated NumPy module of the cell (its forward, its
   BPTT gradients and its RTRL gradients, themselves tested against finite differences):
   a disagreement is an internal error, never a verdict.
2. **the derived formula** of the claim's left side is written in the claims language
   (by the chain rule on the cell's equations) and itself checked against the truth.
3. **symbolic**: both sides are rewritten to one normal form (current values, derivatives and
   adjoints replaced by their definitions, σ' written through σ) and the difference
   expanded; 0 decides the claim correct, symbolically.
4. **numeric**: otherwise both sides are evaluated at every step of every instance; the
   claim is correct if they agree to rounding, else wrong, with a witness: the first step
   at which they differ, the entry, both values.  The terms that differ are found by
   matching the terms of both sides, expanded, by value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import sympy
from sympy.printing.str import StrPrinter

from .cell import DIMS, Block, MatVec, ParamSymbol
from .claims import (TIME, CMatVec, Cat, Claim, ClaimsFile, Delta, Entry, ISum, Outer, Prime, Q, Rows, TSum, Transposed, Unit,
                     q)
from .errors import InternalError
from .ir import MatVecNode, Pointwise
from .ops import OPS, Op

__all__ = ["Verdict", "Report", "verify", "verify_file", "claim_text", "format_report", "markdown_report", "markdown_page"]

#: the instance verify draws where the cell does not fix the sizes (all different, so that a
#: dimension slip shows)
SIZES = {"n_in": 2, "n_hidden": 3, "n_out": 4}
#: relative agreement that counts as equal (float64 evaluation of two formulas)
RTOL = 1e-9

_NP = {
    "sigmoid": lambda a: 1.0 / (1.0 + np.exp(-a)),
    "tanh": np.tanh,
    "relu": lambda a: np.maximum(a, 0.0),
    "softplus": lambda a: np.logaddexp(0.0, a),
    "exp": np.exp,
    "identity": lambda a: a,
    "step": lambda a: np.heaviside(a, 0.0),
}


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
        return _NP[type(expr).__name__](_num(expr.args[0], env))
    raise InternalError(f"verify cannot evaluate {sympy.sstr(expr)}")


def _prime(op: type[Op], a):
    """op'(a) on arrays, through op(a) as the derivation writes it."""
    y = sympy.Symbol("y")
    return _num(op.derivative(y), {"y": _NP[op.__name__](a)})


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
        decl = self.g.param(node.param)
        r0 = 0 if node.block is None else node.block * self.size(decl.block_rows)
        c0, c1 = self.size(node.cols[0]), self.size(node.cols[1])
        return self.params[node.param][r0:r0 + self.size(node.size), c0:c1], r0, c0, c1

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
                    grads[n.param][r0:r0 + W.shape[0], c0:c1] += np.outer(a[n.name], env[n.operand])
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
                    if n.param == param:
                        cols = shape[1]
                        direct = np.zeros((size, E))
                        v = env[n.operand]
                        for r in range(size):
                            direct[r, (r0 + r) * cols + c0:(r0 + r) * cols + c1] = v
                        acc = acc + direct
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


def _align(x: _T, y: _T) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    axes = x.axes + tuple(a for a in y.axes if a not in x.axes)
    sx, sy = x.sizes(), y.sizes()
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
    """Evaluates a claims expression on an instance, step by step."""

    def __init__(self, inst: Instance, ranges: dict[str, int] | None = None):
        self.inst = inst
        self.ranges = dict(ranges or {})
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
        inst = self.inst
        if isinstance(e, Q):
            if t is None and e.kind not in ("grad", "loss", "steps") and e.time.has(TIME):
                raise ShapeMismatch(f"'{claim_text(e)}' has no step here")
            out = inst.quantity(e, t)
            for axis, n in zip(out.axes, out.a.shape):
                if axis not in ("_", "~"):
                    self.note_range(axis, n)
            return out
        if e.is_Number:
            return _T(np.array(float(e)), ())
        if isinstance(e, ParamSymbol):
            return self.param(e)
        if isinstance(e, Block):
            p, k = e.args[0], int(e.args[1])
            arr = inst.params[p.name]
            rows = arr.shape[0] // inst.g.param(p.name).blocks
            return _T(arr[k * rows:(k + 1) * rows], ("_", "~")[: arr.ndim])
        if isinstance(e, sympy.Add):
            out = self.ev(e.args[0], t)
            for a in e.args[1:]:
                out = _binary(out, self.ev(a, t), np.add)
            return out
        if isinstance(e, sympy.Mul):
            out = self.ev(e.args[0], t)
            for a in e.args[1:]:
                out = _binary(out, self.ev(a, t), np.multiply)
            return out
        if isinstance(e, sympy.Pow):
            base = self.ev(e.args[0], t)
            exp = e.args[1]
            if not exp.is_Number:
                raise ShapeMismatch("an exponent must be a number")
            with np.errstate(all="ignore"):
                return _T(np.power(base.a, float(exp)), base.axes)
        if isinstance(e, Op):
            x = self.ev(e.args[0], t)
            with np.errstate(over="ignore"):
                return _T(_NP[type(e).__name__](x.a), x.axes)
        if isinstance(e, Prime):
            x = self.ev(e.args[1], t)
            with np.errstate(over="ignore"):
                return _T(_prime(OPS[e.args[0].name], x.a), x.axes)
        if isinstance(e, Transposed):
            w = self.ev(e.args[0], t)
            if not {"_", "~"} <= set(w.axes):
                raise ShapeMismatch("only a matrix has a transpose")
            return _T(w.a, tuple({"_": "~", "~": "_"}.get(a, a) for a in w.axes))
        if isinstance(e, MatVec):
            w = self.ev(e.args[0], t)
            if not {"_", "~"} <= set(w.axes):
                raise ShapeMismatch("the left of @ is not a matrix")
            parts = [self.ev(o, t) for o in e.args[1]]
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
        if isinstance(e, Cat):
            return self.concat([self.ev(o, t) for o in e.args])
        if isinstance(e, Rows):
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
        if isinstance(e, Outer):
            a = self.ev(e.args[0], t)
            b = _rename(self.ev(e.args[1], t), "_", "~")
            if "_" not in a.axes or "~" not in b.axes:
                raise ShapeMismatch("outer(a, b) takes two vectors")
            return _binary(a, b, np.multiply)
        if isinstance(e, Entry):
            v = self.ev(e.args[0], t)
            idx = [i.name for i in e.args[1:]]
            want = ["_"] if len(idx) == 1 else ["_", "~"]
            if len(idx) > 2 or any(a not in v.axes for a in want):
                raise ShapeMismatch(f"{len(idx)} indices on something that is not a {'vector' if len(idx) == 1 else 'matrix'}")
            for old, new in zip(want, idx):
                self.note_range(new, v.sizes()[old])
                v = _rename(v, old, new)
            return v
        if isinstance(e, ISum):
            body = self.ev(e.args[0], t)
            m = e.args[1].name
            if m not in body.axes:
                return _T(body.a * self.index_range(m), body.axes)
            k = body.axes.index(m)
            return _T(body.a.sum(axis=k), body.axes[:k] + body.axes[k + 1:])
        if isinstance(e, Delta):
            if self.dry:
                return _T(np.array(1.0), ())
            syms = sorted(e.free_symbols, key=lambda s: s.name)
            grids = np.meshgrid(*[np.arange(self.index_range(s.name)) for s in syms], indexing="ij")
            env = {s: g for s, g in zip(syms, grids)}
            a = _index_value(e.args[0], env, inst.subs)
            b = _index_value(e.args[1], env, inst.subs)
            return _T((np.asarray(a) == np.asarray(b)).astype(np.float64), tuple(s.name for s in syms))
        if isinstance(e, Unit):
            i = e.args[0].name
            if self.dry:
                return _T(np.array(1.0), ())
            n = self.index_range(i)
            return _T(np.eye(n), ("_", i))
        if isinstance(e, TSum):
            if t is not None:
                raise ShapeMismatch("sum_t inside a step")
            out = _T(np.array(0.0), ())
            for k in range(inst.T):
                out = _binary(out, self.ev(e.args[0], k), np.add)
            return out
        raise ShapeMismatch(f"cannot evaluate {sympy.sstr(e)}")

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


# -- the derived formula of a quantity, in the claims language ------------------------------------
class Deriver:
    """The left side of a claim, derived by the chain rule on the cell's equations (per step)."""

    def __init__(self, g, der=None):
        self.g, self.der = g, der
        self.eqs = {name: self.lift(expr) for name, expr in g.equations}

    def lift(self, expr: sympy.Expr) -> sympy.Expr:
        """A cell equation in claims atoms: names -> values at TIME (``h_prev`` at TIME - 1)."""
        g = self.g
        prevs = {s.prev: s.name for s in g.states}
        params = {p.name for p in g.params}

        def walk(e):
            if isinstance(e, ParamSymbol):
                return e
            if isinstance(e, sympy.Symbol):
                if e.name in params:
                    return ParamSymbol(e.name)
                if e.name in prevs:
                    return q("val", prevs[e.name], time=TIME - 1)
                return q("val", e.name)
            if isinstance(e, MatVec):
                return CMatVec(e.args[0], sympy.Tuple(*[walk(o) for o in e.args[1]]))
            if isinstance(e, Block) or not e.args:
                return e
            return e.func(*[walk(a) for a in e.args])

        return walk(expr)

    def at(self, expr: sympy.Expr, time: sympy.Expr) -> sympy.Expr:
        return expr.xreplace({TIME: time}) if expr.has(TIME) else expr

    def through_values(self, name: str, time) -> sympy.Expr | None:
        """op'(pre-activation of ``name``) written through the value: h (1 - h)."""
        node = next((n for n in self.g.nodes if n.name == name), None)
        if node is None or not isinstance(node, Pointwise) or node.op is None:
            return None
        y = q("val", name, time=time)
        return node.op.derivative(y)

    def prime(self, op_name: str, arg: sympy.Expr, owner: str | None, time) -> sympy.Expr:
        if isinstance(arg, Q) and arg.kind == "val":  # sigma'(a^t), as the seeds write it
            return Prime(sympy.Symbol(op_name), arg)
        if owner is not None:
            via = self.through_values(owner, time)
            if via is not None:
                return via
        op = OPS[op_name]
        return op.derivative(op(arg))

    # -- values -------------------------------------------------------------------------
    def value(self, name: str, time=TIME) -> sympy.Expr | None:
        expr = self.eqs.get(name)
        return None if expr is None else self.at(expr, time)

    # -- forward mode -------------------------------------------------------------------
    def sens(self, name: str, param: str, entries: tuple, time=TIME, depth: int = 0) -> sympy.Expr:
        """d name^time / d param[entries], current sensitivities substituted, earlier ones kept."""
        expr = self.value(name, time)
        if expr is None:  # a leaf: the input, or a state before the first step
            return sympy.Integer(0)
        return self.tangent(expr, param, entries, time, owner=name)

    def tangent(self, e: sympy.Expr, param: str, entries: tuple, time, owner=None) -> sympy.Expr:
        g = self.g
        if isinstance(e, Q):
            if e.kind != "val":
                raise InternalError("tangent of a non-value")
            if e.time == time and e.qname in self.eqs:
                return self.sens(e.qname, param, entries, time)
            if e.qname in g.state_names and e.time != time:
                return q("sens", e.qname, param, e.time, entries)
            return sympy.Integer(0)
        if isinstance(e, ParamSymbol):
            if e.name != param:
                return sympy.Integer(0)
            return sympy.Integer(1) if not entries else Unit(entries[0])
        if isinstance(e, Block):
            p, k = e.args[0], int(e.args[1])
            if p.name != param:
                return sympy.Integer(0)
            rows = g.param(param).block_rows
            return Rows(Unit(entries[0]), k * rows, (k + 1) * rows)
        if e.is_Number:
            return sympy.Integer(0)
        if isinstance(e, sympy.Add):
            return sympy.Add(*[self.tangent(a, param, entries, time) for a in e.args])
        if isinstance(e, sympy.Mul):
            terms = []
            for k, a in enumerate(e.args):
                d = self.tangent(a, param, entries, time)
                if d != 0:
                    terms.append(sympy.Mul(*e.args[:k], d, *e.args[k + 1:]))
            return sympy.Add(*terms)
        if isinstance(e, sympy.Pow):
            b, n = e.args
            return n * b ** (n - 1) * self.tangent(b, param, entries, time)
        if isinstance(e, Op):
            d = self.tangent(e.args[0], param, entries, time)
            return 0 if d == 0 else self.prime(type(e).__name__, e.args[0], owner, time) * d
        if isinstance(e, MatVec):
            w, ops = e.args
            base = w.args[0] if isinstance(w, Block) else w
            dops = [self.tangent(o, param, entries, time) for o in ops]
            terms = []
            if any(d != 0 for d in dops):
                filled = [d if d != 0 else 0 * o for d, o in zip(dops, ops)]
                terms.append(CMatVec(w, sympy.Tuple(*filled)))
            if base.name == param:
                i, j = entries
                unit = Unit(i)
                if isinstance(w, Block):
                    rows = g.param(param).block_rows
                    k = int(w.args[1])
                    unit = Rows(Unit(i), k * rows, (k + 1) * rows)
                terms.append(unit * Entry(Cat(*ops) if len(ops) > 1 else ops[0], j))
            return sympy.Add(*terms)
        raise InternalError(f"no tangent rule for {type(e).__name__}")

    # -- reverse mode ------------------------------------------------------------------
    def backprop(self, e: sympy.Expr, seed: sympy.Expr, target: Q, owner=None) -> sympy.Expr:
        """The part of the adjoint of value ``target`` that flows back through ``e``, whose
        adjoint is ``seed``."""
        if not e.has(target):
            return sympy.Integer(0)
        if e == target:
            return seed
        if isinstance(e, sympy.Add):
            return sympy.Add(*[self.backprop(a, seed, target) for a in e.args])
        if isinstance(e, sympy.Mul):
            return sympy.Add(*[self.backprop(a, seed * sympy.Mul(*e.args[:k], *e.args[k + 1:]), target)
                               for k, a in enumerate(e.args)])
        if isinstance(e, sympy.Pow):
            b, n = e.args
            return self.backprop(b, seed * n * b ** (n - 1), target)
        if isinstance(e, Op):
            time = target.time if owner is None else self.eq_time(owner, e, target)
            return self.backprop(e.args[0], seed * self.prime(type(e).__name__, e.args[0], owner, time), target)
        if isinstance(e, MatVec):
            w, ops = e.args
            back = CMatVec(Transposed(w), sympy.Tuple(seed))
            out, start = [], sympy.Integer(0)
            for o in ops:
                n = self.size(o)
                piece = back if len(ops) == 1 else Rows(back, start, start + n)
                out.append(self.backprop(o, piece, target))
                start = start + n
            return sympy.Add(*out)
        raise InternalError(f"no adjoint rule for {type(e).__name__}")

    def eq_time(self, owner: str, e: sympy.Expr, target: Q):
        """The step of the equation ``owner`` whose top nonlinearity is ``e``."""
        for shift in (0, 1):
            if self.value(owner, target.time + shift) == e:
                return target.time + shift
        return target.time

    def size(self, e: sympy.Expr) -> sympy.Expr:
        g = self.g
        for a in sympy.preorder_traversal(e):
            if isinstance(a, Q) and a.kind == "val":
                return g.size(a.qname) if a.qname in self.eqs or g.is_leaf(a.qname) else g.size(a.qname)
        raise InternalError("size of an expression without a value")

    def adj(self, name: str, time=TIME) -> sympy.Expr:
        """dL/d name^time: the loss directly, then every equation of step time and time + 1 that reads it."""
        g = self.g
        target = q("val", name, time=time)
        terms = []
        if name in g.outputs:
            scale = sympy.Integer(1) if g.loss is None or g.loss.reduction == "sum" else 1 / q("steps")
            terms.append(scale * q("lossp", name, time=time))
        order = [n for n, _ in g.equations]
        for shift in (0, 1):
            for b in order:
                if shift == 1 and b not in g.state_names and not self.reads_prev(b):
                    pass
                expr = self.value(b, time + shift)
                if expr is None or not expr.has(target):
                    continue
                if isinstance(expr, Op) and not isinstance(expr.args[0], Q):
                    terms.append(self.backprop(expr.args[0], q("preadj", b, time=time + shift), target))
                else:
                    terms.append(self.backprop(expr, q("adj", b, time=time + shift), target, owner=b))
        return sympy.Add(*terms)

    def reads_prev(self, b: str) -> bool:
        return True

    def inline_adjoints(self, e: sympy.Expr, time) -> sympy.Expr:
        """Adjoints of intermediate values (gates) of the same step written out, so that a
        formula reads as the seeds write it (delta_f = f (1 - f) c_prev adj(c))."""
        inter = {n.name for n in self.g.nodes if n.role == "intermediate"}
        for _ in range(len(inter) + 1):
            table = {a: self.adj(a.qname, time) for a in e.atoms(Q)
                     if a.kind == "adj" and a.time == time and a.qname in inter}
            if not table:
                break
            e = e.xreplace(table)
        return e

    def preadj(self, name: str, time=TIME) -> sympy.Expr:
        return self.through_values(name, time) * q("adj", name, time=time)

    def lossp(self, name: str, time=TIME, der=None) -> sympy.Expr | None:
        der = der or self.der
        if der is None or self.g.loss is None:
            return None
        for out, p in der.loss_partials:
            if out == name:
                return self.at(self.lift(p).xreplace({q("val", "target"): q("val", "target")}), time)
        return sympy.Integer(0) if self.g.loss is not None else None

    # -- one entry point ------------------------------------------------------------------
    def derived(self, lhs: sympy.Expr, der) -> sympy.Expr | None:
        unit = ()
        core = lhs
        if isinstance(lhs, Entry):
            core, unit = lhs.args[0], lhs.args[1:]
        out = self.derived_core(core, der)
        if out is None:
            return None
        if not unit:
            return out
        taken = {i.name for i in lhs.free_symbols if i.is_integer} | set(self.eqs) | {p.name for p in self.g.params}
        fresh = (sympy.Symbol(n, integer=True) for n in "mkpqrnabcuvw" if n not in taken)
        return _index_in(out, unit[0], fresh)

    def derived_core(self, a: Q, der) -> sympy.Expr | None:
        time = a.time
        if a.kind == "val":
            return self.value(a.qname, time)
        if a.kind == "pre":
            v = self.value(a.qname, time)
            return v.args[0] if isinstance(v, Op) else None
        if a.kind == "sens":
            if a.qname not in self.eqs:
                return sympy.Integer(0)
            return self.sens(a.qname, a.wrt, a.entries, time)
        if a.kind == "adj":
            return self.inline_adjoints(self.adj(a.qname, time), time)
        if a.kind == "preadj":
            return self.inline_adjoints(self.preadj(a.qname, time), time)
        if a.kind == "lossp":
            return self.lossp(a.qname, time, der)
        return None


def _index_in(e: sympy.Expr, l: sympy.Symbol, fresh) -> sympy.Expr:
    """Entry(e, l) with the index pushed onto the vectors of ``e`` (the per-unit form): a matrix
    product becomes a sum over a fresh index, e_i becomes delta(l, i)."""
    if isinstance(e, (sympy.Add, sympy.Mul)):
        return e.func(*[_index_in(a, l, fresh) for a in e.args])
    if isinstance(e, sympy.Pow):
        return _index_in(e.args[0], l, fresh) ** e.args[1]
    if e.is_Number:
        return e
    if isinstance(e, Op):
        return type(e)(_index_in(e.args[0], l, fresh))
    if isinstance(e, Prime):
        return Prime(e.args[0], _index_in(e.args[1], l, fresh))
    if isinstance(e, Unit):
        return Delta(l, e.args[0])
    if isinstance(e, Q) and e.kind in ("val", "pre", "adj", "preadj", "lossp", "sens"):
        return Entry(e, l)
    if isinstance(e, MatVec) and len(e.args[1]) == 1 and not isinstance(e.args[0], (Transposed, Block)):
        m = next(fresh)
        return ISum(Entry(e.args[0], l, m) * _index_in(e.args[1][0], m, fresh), m)
    if isinstance(e, Entry) and len(e.args) == 2 and isinstance(e.args[0], (Q, Cat)) :
        return Entry(e.args[0], e.args[1])  # a scalar already: v[j]
    return Entry(e, l)


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


# -- verdicts ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Witness:
    instance: int  # the seed
    step: int | None  # in the claims file's numbering; None: a whole-sequence quantity
    entry: str
    claimed: float
    derived: float

    @property
    def difference(self) -> float:
        return abs(self.claimed - self.derived)


@dataclass(frozen=True)
class Verdict:
    claim: Claim
    correct: bool
    method: str  # "symbolic" or "numeric"
    derived: str = ""  # the derived formula (claims language), "" if none is written
    reason: str = ""  # why a claim is wrong without a witness (sizes that do not fit)
    witness: Witness | None = None
    only_claim: tuple[str, ...] = ()  # terms of the claim the derivation does not have
    only_derived: tuple[str, ...] = ()  # terms of the derivation the claim does not have


@dataclass(frozen=True)
class SizeVerdict:
    claim: object
    correct: bool
    derived: str


@dataclass(frozen=True)
class Report:
    file: ClaimsFile
    verdicts: tuple[Verdict, ...]
    sizes: tuple[SizeVerdict, ...]
    instances: str

    @property
    def wrong(self) -> int:
        return sum(not v.correct for v in self.verdicts) + sum(not s.correct for s in self.sizes)


def verify_file(path) -> Report:
    from .claims import load_claims

    return verify(load_claims(path))


def verify(claims: ClaimsFile) -> Report:
    from .pipeline import build, load_module, module_name, render_numpy

    plan = build(claims.cell)
    module = load_module(render_numpy(plan), module_name(plan.graph.cell))
    instances = [Instance(plan, module, seed, claims.steps, claims.zero_states) for seed in claims.seeds]
    deriver = Deriver(plan.graph, plan.derivation)
    checker = _Checker(claims, plan, instances, deriver)
    verdicts = tuple(checker.check(c) for c in claims.claims)
    sizes = tuple(_size_verdict(s, plan.graph) for s in claims.sizes)
    inst = instances[0]
    described = (f"{len(instances)} random instance(s) (seeds {', '.join(map(str, claims.seeds))}) of {claims.steps} steps, "
                 + ", ".join(f"{k} = {v}" for k, v in inst.sizes.items())
                 + (", initial states 0" if claims.zero_states else ", random initial states"))
    return Report(claims, verdicts, sizes, described)


def _size_verdict(s, g) -> SizeVerdict:
    true = g.size(s.name)
    return SizeVerdict(s, sympy.expand(true - s.size) == 0, sympy.sstr(true))


class _Checker:
    def __init__(self, claims: ClaimsFile, plan, instances: list[Instance], deriver: Deriver):
        self.claims, self.plan, self.instances, self.deriver = claims, plan, instances, deriver
        self.g = plan.graph
        self.printer = dict(names=_names_of(claims), first_step=claims.first_step, states=self.g.state_names)

    def text(self, e) -> str:
        return claim_text(e, **self.printer)

    def times(self, scope: str) -> list[int | None]:
        T = self.claims.steps
        return {"steps": list(range(T)), "first": [0], "last": [T - 1], "initial": [-1], "total": [None]}[scope]

    def specialize(self, e: sympy.Expr, now) -> sympy.Expr:
        """``e`` at the step ``now`` (a scope's fixed step, or TIME), with what is known to be 0
        replaced by 0: sensitivities before the first step, initial states where the file says
        so, every value and adjoint beyond the last step."""
        if now != TIME:
            e = e.xreplace({TIME: now}) if e.has(TIME) else e
        T, g = self.claims.steps, self.g
        zeros = {}
        for a in e.atoms(Q):
            if a.time.has(TIME) or a.kind in ("grad", "loss", "steps"):
                continue
            k = int(a.time)
            if k >= T or (k < 0 and a.kind in ("sens", "lsens", "lossp", "losst", "pre", "preadj")):
                zeros[a] = sympy.Integer(0)
            elif k < 0 and a.kind == "val" and (k < -1 or a.qname not in g.state_names or self.claims.zero_states):
                zeros[a] = sympy.Integer(0)
            elif k < 0 and a.kind == "adj" and (k < -1 or a.qname not in g.state_names):
                zeros[a] = sympy.Integer(0)
        return e.xreplace(zeros) if zeros else e

    def derived_expr(self, claim: Claim):
        try:
            d = self.deriver.derived(claim.lhs, self.plan.derivation)
        except InternalError:
            return None
        if claim.scope == "initial" and d is not None:  # before the first step: states are data
            core = claim.lhs.args[0] if isinstance(claim.lhs, Entry) else claim.lhs
            if core.kind in ("val", "sens"):
                return None
        return d

    def evaluate(self, expr, inst: Instance, times, ranges) -> list:
        ev = Evaluator(inst, ranges)
        return [ev.ev(expr, t) for t in times]

    def ranges(self, claim: Claim, inst: Instance) -> dict[str, int]:
        ev = Evaluator(inst)
        ev.dry = True
        t0 = self.times(claim.scope)[0]
        ev.ev(claim.lhs, t0)
        ev.ev(claim.rhs, t0)
        return ev.ranges

    def check(self, claim: Claim) -> Verdict:
        times = self.times(claim.scope)
        derived = self.derived_expr(claim)
        derived_text = self.text(derived) if derived is not None else ""
        try:
            ranges = self.ranges(claim, self.instances[0])
        except ShapeMismatch as exc:
            return Verdict(claim, False, "numeric", derived_text, reason=str(exc))
        # the derived formula agrees with the truth (a check of the deriver, not of the claim)
        if derived is not None:
            for inst in self.instances:
                try:
                    lhs = self.evaluate(claim.lhs, inst, times, ranges)
                    d = self.evaluate(derived, inst, times, ranges)
                    bad = _first_difference(lhs, d)
                except ShapeMismatch:
                    bad = True
                if bad:
                    derived, derived_text = None, ""
                    break
        now = {"first": sympy.Integer(0), "last": sympy.Integer(self.claims.steps - 1),
               "initial": sympy.Integer(-1)}.get(claim.scope, TIME)
        rhs_s = self.specialize(claim.rhs, now)
        if derived is not None:
            derived = self.specialize(derived, now)
            derived_text = self.text(derived)
        method = "symbolic" if derived is not None and _symbolic_equal(rhs_s, derived, self.deriver, now) else "numeric"
        witness, reason = None, ""
        for inst in self.instances:
            try:
                lhs = self.evaluate(claim.lhs, inst, times, ranges)
                rhs = [_summed(claim.lhs, l, r) for l, r in
                       zip(lhs, self.evaluate(claim.rhs, inst, times, ranges))]
                for l, r in zip(lhs, rhs):
                    _fits(l, r)
            except ShapeMismatch as exc:
                reason = str(exc)
                break
            found = _first_difference(lhs, rhs)
            if found:
                k, entry, cl, de = found
                t = times[k]
                witness = Witness(inst.seed, None if t is None else t + self.claims.first_step, entry, cl, de)
                break
        correct = witness is None and not reason
        if correct:
            return Verdict(claim, True, method, derived_text)
        if method == "symbolic":
            raise InternalError("a claim is symbolically equal to the derived formula but differs numerically")
        only_c, only_d = ((), ())
        if derived is not None:
            only_c, only_d = self.differing_terms(claim, derived, times, ranges)
        return Verdict(claim, False, "numeric", derived_text, reason, witness, only_c, only_d)

    def differing_terms(self, claim: Claim, derived, times, ranges) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """The terms of each side that match no term of the other, by value: sums are split into
        terms; where one term is left on each side and both are products, common factors
        (equal by value) are cancelled and what is left is compared again."""
        inst = self.instances[0]

        def values(e):
            try:
                return self.evaluate(e, inst, times, ranges)
            except ShapeMismatch:
                return None

        def same(a, b) -> bool:
            va, vb = values(a), values(b)
            if va is None or vb is None:
                return False
            try:
                return not _first_difference(va, vb)
            except ShapeMismatch:
                return False

        def unmatched(xs, ys):
            used, left = set(), []
            for x in xs:
                k = next((k for k, y in enumerate(ys) if k not in used and same(x, y)), None)
                if k is None:
                    left.append(x)
                else:
                    used.add(k)
            return left, [y for k, y in enumerate(ys) if k not in used]

        def diff(c, d, depth=0):
            cs, ds = list(sympy.Add.make_args(c)), list(sympy.Add.make_args(d))
            if len(cs) > 30 or len(ds) > 30:
                return [c], [d]
            lc, ld = unmatched(cs, ds)
            if depth < 4 and len(lc) == 1 and len(ld) == 1 and isinstance(lc[0], sympy.Mul) and isinstance(ld[0], sympy.Mul):
                fc, fd = unmatched(list(lc[0].args), list(ld[0].args))
                if len(fc) == 1 and len(fd) == 1 and (len(fc) < len(lc[0].args)):
                    return diff(fc[0], fd[0], depth + 1)
            if depth < 4 and (len(lc) > 1 or len(ld) > 1) and (lc or ld):
                ec, ed = sympy.expand(sympy.Add(*lc)), sympy.expand(sympy.Add(*ld))
                xc, xd = unmatched(list(sympy.Add.make_args(ec)), list(sympy.Add.make_args(ed)))
                if len(xc) + len(xd) < len(lc) + len(ld):
                    return xc, xd
            return lc, ld

        try:
            c = _normal(self.specialize(claim.rhs, TIME), self.deriver, deep=False)
            only_c, only_d = diff(c, _normal(derived, self.deriver, deep=False))
        except Exception:  # noqa: BLE001 - the terms are a convenience of the report
            return (), ()
        return tuple(self.text(e) for e in only_c), tuple(self.text(e) for e in only_d)


def _names_of(claims: ClaimsFile) -> dict[str, str]:
    return dict(claims.aliases)


def _summed(lhs: sympy.Expr, l: _T, r: _T) -> _T:
    """The right side of a claim about the loss (L, L_t, dL_t/d or dL/d a scalar parameter),
    summed over units where it is a vector: the loss is a sum over units."""
    if isinstance(lhs, Q) and lhs.kind in ("loss", "losst", "lsens", "grad") and "_" in r.axes and "_" not in l.axes:
        k = r.axes.index("_")
        return _T(r.a.sum(axis=k), r.axes[:k] + r.axes[k + 1:])
    return r


def _fits(l: _T, r: _T) -> None:
    extra = [a for a in r.axes if a not in l.axes]
    if extra:
        what = "a vector" if extra[0] == "_" else ("a matrix" if extra[0] == "~" else f"index {extra[0]}")
        raise ShapeMismatch(f"the right side is {what} where the left side is not")
    _align(l, r)


def _first_difference(lhs: list, rhs: list, broadcast: bool = False):
    """(k, entry, claimed, derived) of the first position k where two lists of tensors differ."""
    pairs = []
    scale = 0.0
    for l, r in zip(lhs, rhs):
        a, b, axes = _align(l, r)
        a, b = np.broadcast_arrays(a, b)
        pairs.append((a, b, axes))
        finite = np.concatenate([np.abs(a[np.isfinite(a)]).ravel(), np.abs(b[np.isfinite(b)]).ravel(), [0.0]])
        scale = max(scale, float(finite.max()))
    tol = RTOL * max(scale, 1.0)
    for k, (a, b, axes) in enumerate(pairs):
        with np.errstate(invalid="ignore"):
            diff = np.abs(a - b)
        bad = ~(diff <= tol)
        if bad.any():
            where = np.unravel_index(int(np.argmax(np.where(np.isnan(diff), np.inf, diff))), diff.shape) if diff.ndim else ()
            entry = ", ".join(f"{('unit' if ax == '_' else 'column' if ax == '~' else ax)} {i}" for ax, i in zip(axes, where))
            return k, entry, float(b[where] if b.ndim else b), float(a[where] if a.ndim else a)
    return None


# -- the symbolic decision -----------------------------------------------------------------------
def _normal(e: sympy.Expr, deriver: Deriver, deep: bool = True, now=TIME) -> sympy.Expr:
    """``e`` with σ'(a) written through σ and (deep) the current step's values, sensitivities and
    adjoints replaced by their derived definitions, until only earlier/later ones remain."""

    def prime(x):
        if isinstance(x, Prime):
            op = OPS[x.args[0].name]
            return op.derivative(op(x.args[1]))
        return x

    e = e.replace(lambda x: isinstance(x, Prime), prime)
    if not deep:
        return e
    for _ in range(60):
        atoms = [a for a in e.atoms(Q) if a.time.has(TIME) == now.has(TIME) and (a.time == now or a.kind == "lossp")
                 and a.kind in ("val", "sens", "adj", "preadj", "pre", "lossp")]
        table = {}
        for a in atoms:
            d = deriver.derived_core(a, None)
            if d is not None and d != a:
                table[a] = d
        if not table:
            return e
        e = e.xreplace(table)
    return e


def _symbolic_equal(claim: sympy.Expr, derived: sympy.Expr, deriver: Deriver, now=TIME) -> bool:
    try:
        diff = _normal(claim, deriver, now=now) - _normal(derived, deriver, now=now)
        return sympy.expand(diff) == 0
    except Exception:  # noqa: BLE001 - undecided symbolically: the numbers decide
        return False


# -- reports --------------------------------------------------------------------------------------
def _line(v: Verdict, path: str) -> str:
    c = v.claim
    where = f"{path}:{c.line}" if c.line else path
    return f"[{c.scope}] {c.key} = {c.text}   ({where})"


def _num_text(x: float) -> str:
    return f"{x:.6g}"


def format_report(report: Report) -> str:
    f = report.file
    cell = f.cell.name
    total = len(report.verdicts) + len(report.sizes)
    lines = [f"{f.path}: cell '{cell}'" + (f" ({f.source})" if f.source else "")
             + f": {total} claim(s), {total - report.wrong} correct, {report.wrong} wrong",
             f"  checked on {report.instances}"]
    for v in report.verdicts:
        c = v.claim
        status = "ok   " if v.correct else "WRONG"
        how = v.method if v.correct else ""
        lines.append(f"  {status} {_line(v, f.path)}" + (f"   [{how}]" if how else ""))
        if v.correct:
            continue
        if v.derived:
            lines.append(f"        derived: {c.key} = {v.derived}")
        if v.only_claim or v.only_derived:
            if v.only_claim:
                lines.append(f"        in the claim, not derived: {'; '.join(v.only_claim)}")
            if v.only_derived:
                lines.append(f"        derived, not in the claim: {'; '.join(v.only_derived)}")
        if v.reason:
            lines.append(f"        {v.reason}")
        if v.witness:
            w = v.witness
            at = f"step t = {w.step}" if w.step is not None else "the whole sequence"
            lines.append(f"        witness: {at} (seed {w.instance}{', ' + w.entry if w.entry else ''}): claimed "
                         f"{_num_text(w.claimed)}, derived {_num_text(w.derived)} (difference {_num_text(w.difference)})")
        if c.note:
            lines.append(f"        note: {c.note}")
    for s in report.sizes:
        status = "ok   " if s.correct else "WRONG"
        lines.append(f"  {status} [sizes] {s.claim.name} = {s.claim.text}"
                     + ("" if s.correct else f"   derived: {s.derived}"))
    return "\n".join(lines)


def markdown_report(report: Report) -> str:
    """The report as a Markdown section (every text from the file through md_text)."""
    from .escape import md_text

    f = report.file

    def code(text: str) -> str:
        return md_text(text)

    out = [f"### {md_text(f.source or f.cell.name)}: cell `{f.cell.name}`", "",
           f"Claims file `{md_text(f.path)}`; checked on {md_text(report.instances)}.", "",
           "| | claim | derived | decided |", "| --- | --- | --- | --- |"]
    for v in report.verdicts:
        c = v.claim
        mark = "correct" if v.correct else "**wrong**"
        detail = v.method
        if not v.correct:
            bits = []
            if v.only_claim:
                bits.append("claim has " + "; ".join(code(t) for t in v.only_claim))
            if v.only_derived:
                bits.append("derivation has " + "; ".join(code(t) for t in v.only_derived))
            if v.reason:
                bits.append(code(v.reason))
            if v.witness:
                w = v.witness
                at = f"t = {w.step}" if w.step is not None else "the sequence"
                bits.append(f"witness {at}: {_num_text(w.claimed)} claimed, {_num_text(w.derived)} derived")
            detail = "; ".join(bits)
        derived = code(v.derived) if v.derived and not v.correct else ("(as claimed)" if v.correct else "")
        note = f" ({code(c.note)})" if c.note else ""
        out.append(f"| {mark} | \\[{c.scope}\\] {code(c.key)} = {code(c.text)}{note} | {derived} | {detail} |")
    for s in report.sizes:
        mark = "correct" if s.correct else "**wrong**"
        out.append(f"| {mark} | size of {code(s.claim.name)} = {code(s.claim.text)} | {code(s.derived)} | symbolic |")
    out.append("")
    return "\n".join(out)


def markdown_page(reports: list[Report], command: str) -> str:
    """Several reports as one Markdown page (``docs/seeds.md`` is this page for the claims
    files of the seeds), with a table of the claims found wrong first."""
    from .escape import html_comment, md_text

    out = [f"<!-- Generated by symrnn. Do not edit. Regenerate with: {html_comment(command)} -->",
           "# Hand derivations, checked", "",
           "Each section is one claims file (`docs/claims-format.md`): a hand derivation transcribed claim by "
           "claim, each claim checked by `symrnn verify` against the derivation symrnn makes (symbolically where "
           "the two normal forms agree, else numerically on random instances, with the first step at which they "
           "differ). A wrong claim is shown with the derived formula beside it.", "",
           "## Where the hand derivations are wrong", "",
           "| source | claim (as written) | derived | first difference |", "| --- | --- | --- | --- |"]
    for r in reports:
        src = md_text(r.file.source or r.file.cell.name)
        for v in r.verdicts:
            if v.correct:
                continue
            at = (f"step t = {v.witness.step}" if v.witness and v.witness.step is not None else
                  ("the sequence" if v.witness else md_text(v.reason)))
            note = f" ({md_text(v.claim.note)})" if v.claim.note else ""
            out.append(f"| {src} | {md_text(v.claim.key)} = {md_text(v.claim.text)}{note} | "
                       f"{md_text(v.derived) or '(see the report)'} | {at} |")
        for sv in r.sizes:
            if not sv.correct:
                note = f" ({md_text(sv.claim.note)})" if sv.claim.note else ""
                out.append(f"| {src} | size of {md_text(sv.claim.name)} = {md_text(sv.claim.text)}{note} | "
                           f"{md_text(sv.derived)} | (a size) |")
    out += ["", "## The claims, one file at a time", ""]
    for r in reports:
        out.append(markdown_report(r))
    return "\n".join(out).rstrip("\n") + "\n"
