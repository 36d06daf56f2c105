"""Recurrent-GEMM fusion (NumPy): a step's GEMM and its consumers as one fused step.

Used by backends/numpy_forward.py while it writes the loop; switched off (the
``fusion`` pass, symrnn.passes), every GEMM writes its own product and every node
its own value.
"""

from __future__ import annotations

import sympy

from ..ir import Pointwise
from ..plan import GemmGroup
from ..stmt import ALL, Assign, Call, Comment, Concat, Do, ETC, OpCall, Ref, Size, Text, Update, empty, span, t_SYM

__all__ = ["LoopFusion", "inplace_calls"]


class LoopFusion:
    """How one forward step avoids temporaries, for the per-step GEMMs of the loop.

    1. Parameter-only addends (biases) of a sum that holds an input-side product
       are added into that product's buffer once, for every step, before the loop.
    2. Where an input-side product and a recurrent product are summed (W_x x +
       W_h h_prev), slot by slot in the same layout, the step adds the whole
       input-side buffer to the recurrent GEMM's output in one operation.
    3. A slot whose consumer is an op with an in-place spelling (sigmoid, tanh:
       :attr:`symrnn.ops.Op.numpy_inplace`) is activated in place, a run of adjacent
       slots at once (the op that makes the fewest passes over the whole run; a slot
       of another op takes its own first, into a scratch put back afterwards), and
       the GEMM output lives in the stored buffer of those values (i_seq, f_seq, ...
       are views of it), so nothing is copied.
    4. When every slot of the recurrent GEMM pairs with the same slot of one
       input-side buffer (the LSTM's four gates), that buffer is the stored one:
       the GEMM writes one step's product to a (B, rows) scratch that is added
       into the input side, and no second (T, B, rows) buffer exists.
    5. A recurrent GEMM of several products, every one of them stored (a layer norm's
       four gates' R h_prev, each read by backward), writes into one (T, B, rows) buffer
       that they are views of, instead of into a scratch copied slot by slot.
    Nothing here changes what a value means: a product is folded into only when
    no other node and no backward formula reads it."""

    def __init__(self, emitter):
        self.e = emitter
        e, g, plan = emitter, emitter.g, emitter.plan
        self.n = emitter.n
        self.exprs: dict[str, sympy.Expr] = {n.name: n.expr for n in g.nodes if isinstance(n, Pointwise)}
        self.pre_lines: list = []
        self.alloc_lines: list = []
        self.view_lines: list = []
        self.views: set[str] = set()  # stored values that are views of a group's buffer
        self.computed: set[str] = set()  # pointwise nodes the fused GEMM step computes
        self.slot_refs: dict[str, Ref] = {}
        self.groups: dict[str, dict] = {}
        self.needed = set(e.d.stored_values) | set(plan.stored)
        self.pre_members = {mv.name: (grp, off) for st in plan.pre.stages for grp in st.groups
                            for mv, off in zip(grp.members, grp.offsets)}
        if "fusion" not in e.passes:
            return  # every GEMM writes its own product, every node its own value
        self.fold_biases()
        for stage in plan.loop.stages:  # 2. and 3., per recurrent GEMM
            for grp in stage.groups:
                self.plan_group(grp)

    def sole_use(self, name: str, node: Pointwise) -> bool:
        consumers = self.e.g.consumers(name)
        return len(consumers) == 1 and consumers[0].name == node.name and name not in self.needed

    def fold_biases(self) -> None:
        """1. Biases into the input-side products."""
        e, g, plan = self.e, self.e.g, self.e.plan
        folds: dict[str, dict[str, tuple]] = {}  # input-side group -> member -> (offset, consumer, biases)
        for node in (n for n in g.nodes if isinstance(n, Pointwise) and plan.region_of[n.name] == "loop"):
            for add in sympy.preorder_traversal(self.exprs[node.name]):
                if not add.is_Add:
                    continue
                products = [a for a in add.args if a.is_Symbol and a.name in self.pre_members and self.sole_use(a.name, node)]
                biases = [a for a in add.args if self.parameter_only(a)]
                if len(products) == 1 and biases:
                    product = products[0].name
                    grp, off = self.pre_members[product]
                    folds.setdefault(grp.name, {})[product] = (off, node.name, e.ew(sympy.Add(*biases), "all"))
                    self.exprs[node.name] = self.exprs[node.name].xreplace({add: add.func(*[a for a in add.args if a not in biases])})
                    break
        for grp in (grp for st in plan.pre.stages for grp in st.groups if grp.name in folds):
            fold = folds[grp.name]
            buf = Ref(self.pre_buffer(grp))
            if len(grp.members) == 1:
                ((off, node, biases),) = fold.values()
                self.pre_lines.append(Update(buf, "+", biases, f"the biases of {node}, for every step at once"))
            elif len(fold) == len(grp.members):  # one pass over the whole buffer
                parts = tuple(fold[mv.name][2] for mv in grp.members)
                nodes = ", ".join(fold[mv.name][1] for mv in grp.members)
                self.pre_lines.append(Update(buf, "+", Concat(parts), f"the biases of {nodes}, for every step at once"))
            else:
                for mv in grp.members:
                    if mv.name in fold:
                        off, node, biases = fold[mv.name]
                        self.pre_lines.append(Update(Ref(buf.name, (ETC, span(off, g.node(mv.name).size))), "+", biases,
                                                     f"the biases of {node}, for every step at once"))

    def pre_buffer(self, grp: GemmGroup) -> str:
        """The array over every step that an input-side GEMM writes."""
        return self.n("gseq", grp.name) if len(grp.members) > 1 else self.n("seq", grp.members[0].name)

    def pre_step(self, grp: GemmGroup) -> str:
        """The name of one step of it."""
        return self.n("group", grp.name) if len(grp.members) > 1 else self.n.value(grp.members[0].name)

    def parameter_only(self, expr: sympy.Expr) -> bool:
        g = self.e.g
        return bool(expr.free_symbols) and all(g.is_leaf(s.name) and g.leaf(s.name).kind == "param" for s in expr.free_symbols)

    def slot(self, grp: GemmGroup, mv, off) -> dict:
        """What the GEMM's slot of product ``mv`` feeds: its consumer, the input-side product
        added to it (a slot symbol standing for their sum), the op that activates it."""
        e, g = self.e, self.e.g
        info = {"member": mv, "offset": off, "content": mv.name, "pre": None, "act": None, "node": None}
        consumers = g.consumers(mv.name)
        if not (len(consumers) == 1 and isinstance(consumers[0], Pointwise) and mv.name not in e.plan.stored):
            return info
        node = consumers[0]
        expr = self.exprs[node.name]
        for add in sympy.preorder_traversal(expr):
            if add.is_Add and sympy.Symbol(mv.name) in add.args:
                partners = [a for a in add.args if a.is_Symbol and a.name in self.pre_members and self.sole_use(a.name, node)]
                partners = [a for a in partners if sympy.expand(self.pre_members[a.name][1] - off) == 0]
                if partners:
                    rest = [a for a in add.args if a not in (partners[0], sympy.Symbol(mv.name))]
                    whole = expr.args and expr.args[0] == add and len(expr.args) == 1
                    stem = f"pre_{node.name}" if whole else f"{mv.name}_sum"
                    symbol = sympy.Symbol(self.n.fresh(stem))
                    self.exprs[node.name] = expr.xreplace({add: sympy.Add(symbol, *rest)})
                    info.update(pre=self.pre_members[partners[0].name][0], node=node, content=symbol.name)
                break
        expr = self.exprs[node.name]
        if info["pre"] is not None and node.op is not None and node.op.numpy_inplace \
                and expr.args[0] == sympy.Symbol(info["content"]):
            info.update(act=node.op, content=node.name)
        return info

    def plan_group(self, grp: GemmGroup) -> None:
        slots = [self.slot(grp, mv, off) for mv, off in zip(grp.members, grp.offsets)]
        g, plan, n = self.e.g, self.e.plan, self.n
        if not any(s["pre"] for s in slots) and not (len(slots) > 1 and all(s["content"] in plan.stored for s in slots)):
            return  # nothing to fuse, and no stored buffer for the GEMM to write into
        single_state = len(slots) == 1 and slots[0]["act"] and slots[0]["content"] in g.state_names
        stored = [s["content"] in plan.stored for s in slots]
        pre = {s["pre"].name: s["pre"] for s in slots if s["pre"] is not None}
        # 4. every slot pairs with the same slot of one input-side buffer: that buffer,
        #    computed for every step anyway, becomes the stored one (the step's GEMM goes to
        #    a (B, rows) scratch and is added into it): one (T, B, rows) buffer fewer
        in_input = (not single_state and all(stored) and all(s["pre"] is not None for s in slots) and len(pre) == 1
                    and sympy.expand(next(iter(pre.values())).rows - grp.rows) == 0)
        scratch, buf = None, n("group", grp.name)  # the name of this step's GEMM output
        contents = ", ".join(s["content"] for s in slots)
        if single_state:
            dest = Ref(n("seq", slots[0]["content"]), (t_SYM + 1,))
        elif in_input:
            group = next(iter(pre.values()))
            source = self.pre_buffer(group)
            dest, scratch, buf = Ref(source, (t_SYM,)), n("group", grp.name), self.pre_step(group)
            self.alloc_lines.append(Assign(Ref(scratch), empty(Text("B"), Size(grp.rows)), "one step's recurrent product"))
            self.alloc_lines.append(Comment(f"after each step, {source}[t] holds {contents}"))
            self.views_of(slots, source)
        elif all(stored):
            dest = Ref(n("gseq", grp.name), (t_SYM,))
            self.alloc_lines.append(Assign(Ref(n("gseq", grp.name)), empty(Text("T"), Text("B"), Size(grp.rows)), contents))
            self.views_of(slots, n("gseq", grp.name))
        else:
            dest = Ref(n("gstep", grp.name))
            self.alloc_lines.append(Assign(dest, empty(Text("B"), Size(grp.rows))))
        self.groups[grp.name] = {"slots": slots, "dest": dest, "buf": buf, "single_state": single_state, "scratch": scratch}
        self.computed |= {s["content"] for s in slots if s["act"]}

    def views_of(self, slots: list, buffer: str) -> None:
        """The stored values of the slots as views of the buffer that holds them."""
        for s in slots:
            self.views.add(s["content"])
            self.view_lines.append(Assign(Ref(self.n("seq", s["content"])), Ref(buffer, (ETC, span(s["offset"], s["member"].size)))))

    def expr(self, node: Pointwise) -> sympy.Expr:
        return self.exprs[node.name]

    def gemm(self, grp: GemmGroup, out: list) -> None:
        """The fused step of one recurrent GEMM: product, input side, activations."""
        e = self.e
        info = self.groups[grp.name]
        slots, buf = info["slots"], Ref(info["buf"])
        labels = ", ".join(s["member"].name for s in slots)

        def product(dst: Ref) -> Do:
            return Do(Call("dot", (e.ref_of(grp.operand, "loop"), Ref(e.transposed(grp))), (("out", dst),)), dst, labels)

        if info["scratch"]:  # the step's slots live in the input-side buffer
            out.append(product(Ref(info["scratch"])))
            out.append(Assign(buf, info["dest"]))
            out.append(Update(buf, "+", Ref(info["scratch"]), "+ the recurrent side of every slot"))
        else:
            out.append(Assign(buf, info["dest"]))
            out.append(product(buf))
            self.add_input_side(grp, slots, buf, out)
        for run in _runs([s for s in slots if s["act"]], same=lambda a, b: True):
            self.activate(run, slots, buf, out)
        self.bind_slots(info, slots, buf, out)

    def activate(self, run: list, slots: list, buf: Ref, out: list) -> None:
        """A run of adjacent slots activated in place."""
        e = self.e
        lo, hi = run[0]["offset"], run[-1]["offset"] + run[-1]["member"].size
        view = buf if len(run) == len(slots) else Ref(buf.name, (ALL, span(lo, hi - lo)))
        whole_op = _whole_run_op(run)
        saved = []
        for s in run:  # a slot of another op: computed first, from its pre-activation, put back after
            if s["act"] is not whole_op:
                part = Ref(buf.name, (ALL, span(s["offset"], s["member"].size)))
                scratch = Ref(self.n.fresh(f"{s['content']}_{s['act'].__name__}"))
                self.alloc_lines.append(Assign(scratch, empty(Text("B"), Size(s["member"].size))))
                out.extend(inplace_calls(s["act"], part, scratch, e.label(s["node"])))
                saved.append((part, scratch))
        out.extend(inplace_calls(whole_op, view, view, ", ".join(e.label(s["node"]) for s in run)))
        out.extend(Assign(part, scratch) for part, scratch in saved)

    def bind_slots(self, info: dict, slots: list, buf: Ref, out: list) -> None:
        """Names for the slots the step reads, and copies for those stored elsewhere."""
        read = {sym.name for expr in self.exprs.values() for sym in expr.free_symbols}
        read |= {dep for node in self.e.g.nodes if not isinstance(node, Pointwise)  # the step's reductions and products
                 and self.e.plan.region_of[node.name] == "loop" for dep in node.deps}
        for s in slots:
            if s["content"] not in read and (s["content"] in self.views or info["single_state"]):
                continue  # nothing else in the step reads it; its buffer holds it
            name = Ref(self.ident(s["content"]))
            if info["single_state"]:
                out.append(Assign(name, buf))
            else:
                out.append(Assign(name, Ref(buf.name, (ALL, span(s["offset"], s["member"].size)))))
                self.slot_refs[s["content"]] = name
            if s["content"] in self.e.plan.stored and s["content"] not in self.views:
                out.append(Assign(Ref(self.n("seq", s["content"]), (t_SYM,)), name))

    def ident(self, content: str) -> str:
        """The name of what a slot holds: a value of the graph, or a slot's own (fresh) name."""
        return self.n.value(content) if self.e.g.is_leaf(content) or content in self.exprs or \
            any(node.name == content for node in self.e.g.nodes) else content

    def add_input_side(self, grp: GemmGroup, slots: list, buf: Ref, out: list) -> None:
        """``buf`` (the step's GEMM output) += the input side of its slots, run by run."""
        pre = {s["pre"].name for s in slots if s["pre"] is not None}
        for run in _runs([s for s in slots if s["pre"] is not None]):
            lo, hi = run[0]["offset"], run[-1]["offset"] + run[-1]["member"].size
            src = self.pre_buffer(run[0]["pre"])
            if len(run) == len(slots) and len(pre) == 1 and sympy.expand(run[0]["pre"].rows - grp.rows) == 0:
                out.append(Update(buf, "+", Ref(src, (t_SYM,)), "+ the input side (and biases) of every slot"))
            else:
                sl = span(lo, hi - lo)
                out.append(Update(Ref(buf.name, (ALL, sl)), "+", Ref(src, (t_SYM, ALL, sl))))


def inplace_calls(op, a, out: Ref, label: str) -> list:
    """The op's in-place NumPy calls from ``a`` into ``out``, the first labelled (with the
    op's formula, when the calls spell it in several steps)."""
    formula = sympy.sstr(op.formula(sympy.Symbol("a"))).replace("/", " / ")
    note = f"  ({op.__name__}(a) = {formula})" if len(op.numpy_inplace) > 1 else ""
    return [OpCall(op, k, a if k == 0 else out, out, f"{label}{note}" if k == 0 else "") for k in range(len(op.numpy_inplace))]


def _whole_run_op(run: list):
    """The op applied in place over a whole run of slots: the one that makes the fewest
    passes over the data, its own over every slot plus each other op's (and a copy back)
    over its slots."""
    ops = list(dict.fromkeys(s["act"] for s in run))

    def passes(whole) -> int:
        return len(whole.numpy_inplace) * len(run) + sum(len(s["act"].numpy_inplace) + 1 for s in run if s["act"] is not whole)

    return min(ops, key=passes)


def _runs(slots: list, same=None) -> list[list]:
    """Consecutive slots (adjacent offsets; and the same input-side group unless ``same``)."""
    same = same or (lambda a, b: a["pre"] is b["pre"])
    runs: list[list] = []
    for s in slots:
        if runs and same(runs[-1][-1], s) and sympy.expand(runs[-1][-1]["offset"] + runs[-1][-1]["member"].size - s["offset"]) == 0:
            runs[-1].append(s)
        else:
            runs.append([s])
    return runs


