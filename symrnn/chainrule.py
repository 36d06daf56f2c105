"""The chain rule on a cell's own equations, in the claims language.

:class:`Deriver` writes, for one step, the value of every quantity of the cell (its
equation), its sensitivity to a parameter entry (forward mode), its adjoint (reverse mode,
through the equations of the same and the next step) and the adjoint of a pre-activation,
as expressions of the claims language (:mod:`symrnn.claims`).  These are the derived formulas
``symrnn verify`` prints beside a wrong claim and the formulas of the textbook document
(:mod:`symrnn.textbook`); both are checked numerically against the derivation objects
(:mod:`symrnn.truth`) before they are trusted.
"""

from __future__ import annotations

import sympy

from .cell import Block, Identity, MatVec, ParamSymbol, Transpose
from .claims import TIME, CMatVec, Cat, Delta, Entry, ISum, Outer, Prime, Q, Rows, Transposed, TSum, Unit, q
from .errors import InternalError
from .ir import Pointwise
from .ops import OPS, Op, log
from .reductions import Reduce, sum_units

__all__ = ["Deriver"]


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
        matrices = {p.name for p in g.params if p.kind == "matrix"}

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
                return _distribute(e.args[0], sympy.Tuple(*[walk(o) for o in e.args[1]]), walk, matrices)
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
        value = self.value(name, time)
        if not isinstance(value, Op):
            return None
        return node.op.derivative(q("val", name, time=time), value.args[0])

    def through_power(self, e: sympy.Pow, owner: str | None, time) -> sympy.Expr:
        """a^b, written as the value it computes where it is the whole equation of ``owner``."""
        if owner is not None and self.value(owner, time) == e:
            return q("val", owner, time=time)
        return e

    def prime(self, op_name: str, arg: sympy.Expr, owner: str | None, time) -> sympy.Expr:
        if isinstance(arg, Q) and arg.kind == "val":  # sigma'(a^t), as the seeds write it
            return Prime(sympy.Symbol(op_name), arg)
        if owner is not None:
            via = self.through_values(owner, time)
            if via is not None:
                return via
        op = OPS[op_name]
        return op.derivative(op(arg), arg)

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
        if isinstance(e, sympy.Pow):  # d(a^b) = b a^(b-1) da + a^b log(a) db
            b, n = e.args
            out = n * b ** (n - 1) * self.tangent(b, param, entries, time)
            if not n.is_Number:
                out += self.through_power(e, owner, time) * log(b) * self.tangent(n, param, entries, time)
            return out
        if isinstance(e, Op):
            d = self.tangent(e.args[0], param, entries, time)
            return 0 if d == 0 else self.prime(type(e).__name__, e.args[0], owner, time) * d
        if isinstance(e, Reduce):
            d = self.tangent(e.args[0], param, entries, time)
            return 0 if d == 0 else reduction_tangent(e, d)
        if isinstance(e, MatVec):
            w, ops = e.args
            base = w.args[0] if isinstance(w, (Block, Transposed)) else w
            dops = [self.tangent(o, param, entries, time) for o in ops]
            terms = []
            if any(d != 0 for d in dops):
                filled = [d if d != 0 else 0 * o for d, o in zip(dops, ops)]
                terms.append(CMatVec(w, sympy.Tuple(*filled)))
            if base.name == param and isinstance(w, Transposed):  # d(W^T v)_l / dW_ij = delta_lj v_i
                i, j = entries
                terms.append(Unit(j) * Entry(ops[0], i))
            elif base.name == param:
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
        if isinstance(e, sympy.Pow):  # a^b: b a^(b-1) to a, a^b log(a) to b
            b, n = e.args
            out = self.backprop(b, seed * n * b ** (n - 1), target)
            if not n.is_Number:
                time = target.time if owner is None else self.eq_time(owner, e, target)
                out += self.backprop(n, seed * self.through_power(e, owner, time) * log(b), target)
            return out
        if isinstance(e, Op):
            time = target.time if owner is None else self.eq_time(owner, e, target)
            return self.backprop(e.args[0], seed * self.prime(type(e).__name__, e.args[0], owner, time), target)
        if isinstance(e, Reduce):
            return self.backprop(e.args[0], reduction_adjoint(e, seed), target)
        if isinstance(e, MatVec):
            w, ops = e.args
            back = CMatVec(_transposed(w), sympy.Tuple(seed))
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
        """The number of units of the vector expression ``e``: of a value it reads, or of a
        vector parameter (a reduction of parameters alone, ``mean(cos(b))``)."""
        g = self.g
        vectors = {leaf.param: leaf.size for leaf in g.leaves if leaf.kind == "param" and leaf.size is not None}
        for a in sympy.preorder_traversal(e):
            if isinstance(a, Q) and a.kind == "val":
                return g.size(a.qname)
            if isinstance(a, Block) and str(a.args[0]) in vectors:
                return vectors[str(a.args[0])]
            if isinstance(a, ParamSymbol) and a.name in vectors:
                return vectors[a.name]
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
                elif isinstance(expr, Reduce):  # b is one number: its operand gets w * dL/db
                    terms.append(self.backprop(expr.args[0], self.reduced_seed(expr, q("adj", b, time=time + shift)), target))
                else:
                    terms.append(self.backprop(expr, q("adj", b, time=time + shift), target, owner=b))
        total = sympy.Add(*terms)
        if self.is_reduction(name):  # dL/dmu for mu = mean(c): one number, the sum of its units' shares
            return sum_units(total) if total != 0 else total
        return total

    def is_reduction(self, name: str) -> bool:
        """Whether value ``name`` is a reduction over units (one number, broadcast back)."""
        return isinstance(self.eqs.get(name), Reduce)

    def reduced_seed(self, e: Reduce, adjoint: sympy.Expr) -> sympy.Expr:
        """What reaches the operand of the reduction ``e`` (an equation of its own) from its
        adjoint (one number): w * adjoint, w = d e / d operand_j (the mean's 1/n)."""
        w = _weight(e)
        if w is None:
            w = sympy.sympify(type(e).weight(e.args[0], e, self.size(e.args[0])))
        return w * adjoint

    def reads_prev(self, b: str) -> bool:
        return True

    def inline_adjoints(self, e: sympy.Expr, time) -> sympy.Expr:
        """Adjoints of intermediate values (gates) of the same step written out, so that a
        formula reads as the seeds write it (delta_f = f (1 - f) c_prev adj(c))."""
        inter = {n.name for n in self.g.nodes if n.role == "intermediate" and self.readers(n.name) == 1
                 and not self.is_reduction(n.name)}  # a reduction's adjoint: one number, of its own
        for _ in range(len(inter) + 1):
            table = {a: self.adj(a.qname, time) for a in e.atoms(Q)
                     if a.kind == "adj" and a.time == time and a.qname in inter}
            if not table:
                break
            e = e.xreplace(table)
        return e

    def readers(self, name: str) -> int:
        """How many equations of a step read value ``name`` (an adjoint is written out where
        one does, as the seeds write delta_f; a value many read, a layer norm's mean, keeps
        its own adjoint)."""
        value = q("val", name)
        return sum(1 for expr in self.eqs.values() if expr.has(value))

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
        if a.kind == "lsens":  # dL^t/dtheta = sum over the outputs of dL^t/dy . dy/dtheta
            return sympy.Add(*[self.loss_partial(o, time) * q("sens", o, a.wrt, time, a.entries)
                               for o in self.g.outputs])
        if a.kind == "grad":
            lossp = {q("lossp", o): self.loss_partial(o, TIME) for o in self.g.outputs} if self.g.loss else {}
            whole = _placed(gradient_parts(self, a.wrt), self.g.param(a.wrt), self, lossp)
            return Entry(whole, *a.entries) if a.entries else whole
        return None

    def loss_partial(self, out: str, time) -> sympy.Expr:
        """dL^t/d out: the loss's expression for a cell with a loss, else the output's cotangent."""
        if self.g.loss is not None:
            return self.lossp(out, time) or sympy.Integer(0)
        return q("lossp", out, time=time)


def _index_in(e: sympy.Expr, l: sympy.Symbol, fresh) -> sympy.Expr:
    """Entry(e, l) with the index pushed onto the vectors of ``e`` (the per-unit form): a matrix
    product becomes a sum over a fresh index, e_i becomes delta(l, i)."""
    if isinstance(e, (sympy.Add, sympy.Mul)):
        return e.func(*[_index_in(a, l, fresh) for a in e.args])
    if isinstance(e, sympy.Pow):
        exponent = e.args[1] if e.args[1].is_Number else _index_in(e.args[1], l, fresh)
        return _index_in(e.args[0], l, fresh) ** exponent
    if e.is_Number:
        return e
    if isinstance(e, Op):
        return type(e)(_index_in(e.args[0], l, fresh))
    if isinstance(e, Reduce):  # the same number at every unit
        return e
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


# -- gradients: the per-step parts of dL/d param -------------------------------------------
def gradient_parts(deriver: Deriver, param: str) -> list[tuple[int | None, sympy.Expr]]:
    """(row block, per-step term) of dL/d param = sum over t of the terms: ``Outer(seed,
    operand)`` for a matrix, the seed (times the partial) for a vector or scalar."""
    g = deriver.g
    out: list[tuple[int | None, sympy.Expr]] = []
    for b, _ in g.equations:
        expr = deriver.value(b, TIME)
        if isinstance(expr, Op) and not isinstance(expr.args[0], Q):
            _seeds(deriver, expr.args[0], q("preadj", b), param, out, None)  # inside the op: its own derivatives
        elif isinstance(expr, Reduce):  # a reduction of its own: its adjoint is one number
            _seeds(deriver, expr.args[0], deriver.reduced_seed(expr, q("adj", b)), param, out, None)
        else:
            _seeds(deriver, expr, q("adj", b), param, out, b)
    return out


def _seeds(deriver: Deriver, e, seed, param: str, out: list, owner) -> None:
    if not _uses(e, param):
        return
    if isinstance(e, ParamSymbol):
        out.append((None, seed))
        return
    if isinstance(e, Block):
        out.append((int(e.args[1]), seed))
        return
    if isinstance(e, sympy.Add):
        for a in e.args:
            _seeds(deriver, a, seed, param, out, None)
        return
    if isinstance(e, sympy.Mul):
        for k, a in enumerate(e.args):
            _seeds(deriver, a, seed * sympy.Mul(*e.args[:k], *e.args[k + 1:]), param, out, None)
        return
    if isinstance(e, sympy.Pow):
        b, n = e.args
        _seeds(deriver, b, seed * n * b ** (n - 1), param, out, None)
        if not n.is_Number:  # a ** b with an expression b
            _seeds(deriver, n, seed * deriver.through_power(e, owner, TIME) * log(b), param, out, None)
        return
    if isinstance(e, Op):
        _seeds(deriver, e.args[0], seed * deriver.prime(type(e).__name__, e.args[0], owner, TIME), param, out, None)
        return
    if isinstance(e, Reduce):
        _seeds(deriver, e.args[0], reduction_adjoint(e, seed), param, out, None)
        return
    if isinstance(e, MatVec):
        w, ops = e.args
        base = w.args[0] if isinstance(w, (Block, Transposed)) else w
        if base.name == param:
            vec = Cat(*ops) if len(ops) > 1 else ops[0]
            grad = Outer(vec, seed) if isinstance(w, Transposed) else Outer(seed, vec)  # d(W^T v)/dW: v delta^T
            out.append((int(w.args[1]) if isinstance(w, Block) else None, grad))
        back = MatVec(_transposed(w), sympy.Tuple(seed))
        start = sympy.Integer(0)
        for o in ops:
            n = deriver.size(o) if o.atoms(Q) else 0
            _seeds(deriver, o, back if len(ops) == 1 else Rows(back, start, start + n), param, out, None)
            start = start + n
        return


def _weight(e: Reduce) -> sympy.Expr | None:
    """d e / d operand_j (symrnn.reductions) in claims atoms, None where it is a constant
    (the mean's 1/n, the sum's 1: the reduction is linear)."""
    a, r, n = sympy.Dummy("a"), sympy.Dummy("r"), sympy.Dummy("n")
    w = sympy.sympify(type(e).weight(a, r, n))
    if not w.has(a, r):
        return None
    if w.has(n):
        raise InternalError(f"the weight of {type(e).spec_name} depends on the number of units and the values")
    return w.xreplace({a: e.args[0], r: e})


def reduction_adjoint(e: Reduce, seed: sympy.Expr) -> sympy.Expr:
    """The adjoint that reaches the operand of reduction ``e`` (broadcast back over its units)
    from the adjoint ``seed`` of its value: w * sum_k seed_k, i.e. R(seed) for a linear R
    (mean(seed), sum(seed)), softmax * sum(seed) for logsumexp."""
    w = _weight(e)
    return type(e)(seed) if w is None else w * sum_units(seed)


def reduction_tangent(e: Reduce, d: sympy.Expr) -> sympy.Expr:
    """d R(a) = sum_j w_j da_j: R(da) for a linear R, sum(softmax * da) for logsumexp."""
    w = _weight(e)
    return type(e)(d) if w is None else sum_units(w * d)


def _transposed(w: sympy.Expr) -> sympy.Expr:
    """W^T, and (W^T)^T = W."""
    return w.args[0] if isinstance(w, Transposed) else Transposed(w)


def _distribute(weight: sympy.Expr, ops: sympy.Tuple, walk, matrices: set[str]) -> sympy.Expr:
    """``M @ v`` in claims atoms: a transpose as ``Transposed``, a combination of matrices
    ``(c_1 M_1 + ... + c I) @ v`` as the sum ``c_1 (M_1 @ v) + ... + c v`` (as lowered)."""
    if isinstance(weight, Transpose):
        return CMatVec(Transposed(weight.args[0]), ops)
    if not isinstance(weight, (sympy.Add, sympy.Mul, Identity)):
        return CMatVec(weight, ops)
    terms = []
    for term in sympy.Add.make_args(sympy.expand(weight)):
        factors = sympy.Mul.make_args(term)
        mat = next(f for f in factors if isinstance(f, (Identity, Transpose, Block))
                   or (isinstance(f, sympy.Symbol) and f.name in matrices))
        coeff = walk(sympy.Mul(*[f for f in factors if f is not mat]))
        terms.append(coeff * (ops[0] if isinstance(mat, Identity) else _distribute(mat, ops, walk, matrices)))
    return sympy.Add(*terms)


def _uses(e, param: str) -> bool:
    return any(isinstance(a, ParamSymbol) and a.name == param for a in sympy.preorder_traversal(e))


def _placed(parts, p, deriver, lossp) -> sympy.Expr:
    """dL/dp as one expression: its per-step parts, each row block stacked in its place
    (a block no equation uses is 0), summed over time."""
    parts = [(k, e.xreplace(lossp) if lossp else e) for k, e in parts]
    if all(k is None for k, _ in parts):
        return TSum(sympy.Add(*[e for _, e in parts]))
    stacked = []
    for k in range(p.blocks):
        mine = [e for kk, e in parts if kk == k]
        stacked.append(sympy.Add(*mine) if mine else None)
    template = next(e for e in stacked if e is not None)
    filled = [e if e is not None else 0 * template for e in stacked]
    return TSum(Cat(*filled))
