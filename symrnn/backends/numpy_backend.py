"""NumPy backend: a kernel plan -> the statements of a NumPy module.

Python computes every statement here; ``templates/numpy_module.py.j2`` lays
them out.  Naming, from the math: a value at one step is its own name (``f``),
its array over all steps ``f_seq`` (states: ``h_seq`` holds h^{-1} .. h^{T-1},
the initial state first); the adjoint of ``f`` is ``d_f``; the gradient of
parameter ``W`` is ``d_W``; the RTRL tangent of ``f`` is ``J_f``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import sympy

from ..errors import InternalError
from ..ir import MatVecNode, Pointwise
from ..plan import GemmGroup, KernelPlan, Region, Stage
from ..printing import numpy_code

__all__ = ["emit"]


def dim(expr: sympy.Expr) -> str:
    """A size as Python code in n_in, n_hidden, n_out."""
    return numpy_code(sympy.sympify(expr, strict=True))


def steps_matmul(a: str, a_cols: str, b: str, rows: str) -> str:
    """``a @ b`` for ``a`` of shape (T, B, a_cols): one GEMM over all T * B rows.

    (NumPy runs a 3-D ``a @ b`` as T separate small products, several times slower.)"""
    return f"({a}.reshape(-1, {a_cols}) @ {b}).reshape(T, B, {rows})"


def _assigned(template: str) -> str | None:
    """The adjoint a statement template ``d_name = {}`` assigns, if it is one."""
    match = re.match(r"^(d_\w+) = \{\}", template)
    return match.group(1) if match else None


def _words(code: str) -> list[str]:
    return re.findall(r"\b[A-Za-z_]\w*\b", code.split("#")[0])


def _one_term(expr: sympy.Expr) -> bool:
    """One adjoint times a coefficient: substituting it into several users adds no work."""
    adjoints = [s for s in expr.free_symbols if s.name.startswith("d_")]
    return len(adjoints) == 1 and not expr.is_Add


def _slice(start: sympy.Expr, size: sympy.Expr) -> str:
    lo, hi = dim(start), dim(sympy.expand(start + size))
    return f"{'' if lo == '0' else lo}:{hi}"


@dataclass
class NumpyModule:
    """Plain data for the template."""

    setup: list[str] = field(default_factory=list)  # bind parameters and their row blocks
    forward_setup: list[str] = field(default_factory=list)  # ... those forward reads
    backward_setup: list[str] = field(default_factory=list)
    rtrl_bind: list[str] = field(default_factory=list)
    stacks: list[str] = field(default_factory=list)  # stacked weights (forward computes, cache keeps)
    forward_pre: list[str] = field(default_factory=list)
    forward_alloc: list[str] = field(default_factory=list)
    forward_loop: list[str] = field(default_factory=list)
    forward_post: list[str] = field(default_factory=list)
    cache_names: list[str] = field(default_factory=list)
    outputs: list[tuple[str, str]] = field(default_factory=list)
    backward_seed: list[str] = field(default_factory=list)
    backward_post: list[str] = field(default_factory=list)
    backward_coefs: list[str] = field(default_factory=list)  # per block of steps, before the loop over it
    backward_loop: list[str] = field(default_factory=list)
    backward_after: list[str] = field(default_factory=list)
    backward_pre: list[str] = field(default_factory=list)
    backward_weights: list[str] = field(default_factory=list)
    grads: list[tuple[str, str]] = field(default_factory=list)
    rtrl_setup: list[str] = field(default_factory=list)
    rtrl_loop: list[str] = field(default_factory=list)
    rtrl_grads: list[tuple[str, str]] = field(default_factory=list)
    loss_value: str = ""
    loss_grad: str = ""
    loss_scale: str = ""


class _LoopFusion:
    """How one forward step avoids temporaries, for the per-step GEMMs of the loop.

    1. Parameter-only addends (biases) of a sum that holds an input-side product
       are added into that product's buffer once, for every step, before the loop.
    2. Where an input-side product and a recurrent product are summed (W_x x +
       W_h h_prev), slot by slot in the same layout, the step adds the whole
       input-side buffer to the recurrent GEMM's output in one operation.
    3. A slot whose consumer is sigmoid(slot) or tanh(slot) is activated in
       place: every such slot of the GEMM output shares one tanh call
       (sigmoid(a) = tanh(a/2)/2 + 1/2, exact), and the GEMM output lives in the
       stored buffer of those values (i_seq, f_seq, ... are views of it), so
       nothing is copied.
    4. When every slot of the recurrent GEMM pairs with the same slot of one
       input-side buffer (the LSTM's four gates), that buffer is the stored one:
       the GEMM writes one step's product to a (B, rows) scratch that is added
       into the input side, and no second (T, B, rows) buffer exists.
    Nothing here changes what a value means: a product is folded into only when
    no other node and no backward formula reads it."""

    def __init__(self, emitter: "_Emitter"):
        self.e = emitter
        e, g, plan = emitter, emitter.g, emitter.plan
        self.exprs: dict[str, sympy.Expr] = {n.name: n.expr for n in g.nodes if isinstance(n, Pointwise)}
        self.pre_lines: list[str] = []
        self.alloc_lines: list[str] = []
        self.view_lines: list[str] = []
        self.views: set[str] = set()  # stored values that are views of a group's buffer
        self.computed: set[str] = set()  # pointwise nodes the fused GEMM step computes
        self.slot_names: dict[str, str] = {}
        self.groups: dict[str, dict] = {}
        needed = set(e.d.stored_values) | set(plan.stored)
        loop_pointwise = [n for n in g.nodes if isinstance(n, Pointwise) and plan.region_of[n.name] == "loop"]
        pre_members = {mv.name: (grp, off) for st in plan.pre.stages for grp in st.groups for mv, off in zip(grp.members, grp.offsets)}

        def sole_use(name: str, node: Pointwise) -> bool:
            consumers = g.consumers(name)
            return len(consumers) == 1 and consumers[0].name == node.name and name not in needed

        # 1. biases into the input-side products
        folds: dict[str, dict[str, tuple]] = {}  # input-side group -> member -> (offset, consumer, bias code)
        for node in loop_pointwise:
            for add in sympy.preorder_traversal(self.exprs[node.name]):
                if not add.is_Add:
                    continue
                products = [a for a in add.args if a.is_Symbol and a.name in pre_members and sole_use(a.name, node)]
                biases = [a for a in add.args if self.parameter_only(a)]
                if len(products) == 1 and biases:
                    product = products[0].name
                    grp, off = pre_members[product]
                    folds.setdefault(grp.name, {})[product] = (off, node.name, numpy_code(sympy.Add(*biases), e.names("all")))
                    self.exprs[node.name] = self.exprs[node.name].xreplace({add: add.func(*[a for a in add.args if a not in biases])})
                    break
        for grp in (grp for st in plan.pre.stages for grp in st.groups if grp.name in folds):
            fold = folds[grp.name]
            if len(grp.members) == 1:
                ((off, node, code),) = fold.values()
                self.pre_lines.append(f"{grp.members[0].name}_seq += {code}  # the biases of {node}, for every step at once")
            elif len(fold) == len(grp.members):  # one pass over the whole buffer
                parts = ", ".join(fold[mv.name][2] for mv in grp.members)
                nodes = ", ".join(fold[mv.name][1] for mv in grp.members)
                self.pre_lines.append(f"{grp.name}_seq += np.concatenate([{parts}])  # the biases of {nodes}, for every step at once")
            else:
                for mv in grp.members:
                    if mv.name in fold:
                        off, node, code = fold[mv.name]
                        self.pre_lines.append(f"{grp.name}_seq[..., {_slice(off, g.node(mv.name).size)}] += {code}  # the biases of {node}, for every step at once")
        # 2. and 3., per recurrent GEMM
        for stage in plan.loop.stages:
            for grp in stage.groups:
                self.plan_group(grp, pre_members, sole_use)

    def parameter_only(self, expr: sympy.Expr) -> bool:
        g = self.e.g
        return bool(expr.free_symbols) and all(g.is_leaf(s.name) and g.leaf(s.name).kind == "param" for s in expr.free_symbols)

    def plan_group(self, grp: GemmGroup, pre_members: dict, sole_use) -> None:
        e, g, plan = self.e, self.e.g, self.e.plan
        slots = []  # per member: dict(consumer, slot symbol, input-side group, activation)
        for mv, off in zip(grp.members, grp.offsets):
            consumers = g.consumers(mv.name)
            info = {"member": mv, "offset": off, "content": mv.name, "pre": None, "act": None, "node": None}
            if len(consumers) == 1 and isinstance(consumers[0], Pointwise) and mv.name not in e.plan.stored:
                node = consumers[0]
                expr = self.exprs[node.name]
                for add in sympy.preorder_traversal(expr):
                    if add.is_Add and sympy.Symbol(mv.name) in add.args:
                        partners = [a for a in add.args if a.is_Symbol and a.name in pre_members and sole_use(a.name, node)]
                        partners = [a for a in partners if sympy.expand(pre_members[a.name][1] - off) == 0]
                        if partners:
                            rest = [a for a in add.args if a not in (partners[0], sympy.Symbol(mv.name))]
                            whole = expr.args and expr.args[0] == add and len(expr.args) == 1
                            stem = f"pre_{node.name}" if whole else f"{mv.name}_sum"
                            slot = sympy.Symbol(e.fresh(stem))
                            self.exprs[node.name] = expr.xreplace({add: sympy.Add(slot, *rest)})
                            info.update(pre=pre_members[partners[0].name][0], node=node, content=slot.name)
                        break
                expr = self.exprs[node.name]
                act = type(expr).__name__
                if info["pre"] is not None and act in ("sigmoid", "tanh") and expr.args[0] == sympy.Symbol(info["content"]):
                    info.update(act=act, content=node.name)
            slots.append(info)
        if not any(s["pre"] for s in slots):
            return
        single_state = len(slots) == 1 and slots[0]["act"] and slots[0]["content"] in g.state_names
        stored = [s["content"] in plan.stored for s in slots]
        pre = {s["pre"].name: s["pre"] for s in slots if s["pre"] is not None}
        # 4. every slot pairs with the same slot of one input-side buffer: that buffer,
        #    computed for every step anyway, becomes the stored one (the step's GEMM goes to
        #    a (B, rows) scratch and is added into it): one (T, B, rows) buffer fewer
        in_input = (not single_state and all(stored) and all(s["pre"] is not None for s in slots) and len(pre) == 1
                    and sympy.expand(next(iter(pre.values())).rows - grp.rows) == 0)
        scratch = None
        if single_state:
            dest = f"{slots[0]['content']}_seq[t + 1]"
        elif in_input:
            group = next(iter(pre.values()))
            source = group.name if len(group.members) > 1 else group.members[0].name  # its buffer's name
            dest, scratch = f"{source}_seq[t]", grp.name
            self.alloc_lines.append(f"{scratch} = np.empty((B, {dim(grp.rows)}), dtype)  # one step's recurrent product")
            self.alloc_lines.append(f"# after each step, {source}_seq[t] holds {', '.join(s['content'] for s in slots)}")
            for s in slots:
                self.views.add(s["content"])
                self.view_lines.append(f"{s['content']}_seq = {source}_seq[..., {_slice(s['offset'], s['member'].size)}]")
        elif all(stored):
            dest = f"{grp.name}_seq[t]"
            self.alloc_lines.append(f"{grp.name}_seq = np.empty((T, B, {dim(grp.rows)}), dtype)  # {', '.join(s['content'] for s in slots)}")
            for s in slots:
                self.views.add(s["content"])
                self.view_lines.append(f"{s['content']}_seq = {grp.name}_seq[..., {_slice(s['offset'], s['member'].size)}]")
        else:
            dest = f"{grp.name}_step"
            self.alloc_lines.append(f"{dest} = np.empty((B, {dim(grp.rows)}), dtype)")
        self.groups[grp.name] = {"slots": slots, "dest": dest, "single_state": single_state, "scratch": scratch}
        for s in slots:
            if s["act"]:
                self.computed.add(s["content"])

    def expr(self, node: Pointwise) -> sympy.Expr:
        return self.exprs[node.name]

    def gemm(self, grp: GemmGroup, out: list[str]) -> None:
        """The fused step of one recurrent GEMM: product, input side, activations."""
        e = self.e
        info = self.groups[grp.name]
        slots = info["slots"]
        labels = ", ".join(s["member"].name for s in slots)
        product = f"np.dot({e.ref(grp.operand, 'loop')}, {e.transposed(grp)}, out={{}})  # {labels}"
        if info["scratch"]:  # the step's slots live in the input-side buffer
            buf = info["dest"].removesuffix("_seq[t]")
            out.append(product.format(info["scratch"]))
            out.append(f"{buf} = {info['dest']}")
            out.append(f"{buf} += {info['scratch']}  # + the recurrent side of every slot")
        else:
            buf = grp.name
            out.append(f"{buf} = {info['dest']}")
            out.append(product.format(buf))
            self.add_input_side(grp, slots, buf, out)
        whole = f"{buf}[:, {{}}]"
        for run in _runs([s for s in slots if s["act"]], same=lambda a, b: True):
            lo, hi = run[0]["offset"], run[-1]["offset"] + run[-1]["member"].size
            view = buf if len(run) == len(slots) else whole.format(_slice(lo, hi - lo))
            kinds = {s["act"] for s in run}
            names = ", ".join(e.label(s["node"]) for s in run)
            if kinds == {"tanh"}:
                out.append(f"np.tanh({view}, out={view})  # {names}")
                continue
            if kinds == {"sigmoid"}:
                scale, shift = "0.5", "0.5"
            else:  # one tanh for both kinds: sigmoid(a) = 0.5 * tanh(0.5 * a) + 0.5
                scale = self.vector(grp, run, {"sigmoid": 0.5, "tanh": 1.0}, "scale")
                shift = self.vector(grp, run, {"sigmoid": 0.5, "tanh": 0.0}, "shift")
            out.append(f"{view} *= {scale}  # {names}  (sigmoid(a) = 0.5 * tanh(0.5 * a) + 0.5)")
            out.append(f"np.tanh({view}, out={view})")
            out.append(f"{view} *= {scale}")
            out.append(f"{view} += {shift}")
        read = {sym.name for expr in self.exprs.values() for sym in expr.free_symbols}
        for s in slots:
            if s["content"] not in read and (s["content"] in self.views or info["single_state"]):
                continue  # nothing else in the step reads it; its buffer holds it
            if info["single_state"]:
                out.append(f"{s['content']} = {buf}")
            else:
                out.append(f"{s['content']} = {buf}[:, {_slice(s['offset'], s['member'].size)}]")
                self.slot_names[s["content"]] = s["content"]
            if s["content"] in e.plan.stored and s["content"] not in self.views:
                out.append(f"{s['content']}_seq[t] = {s['content']}")

    @staticmethod
    def add_input_side(grp: GemmGroup, slots: list, buf: str, out: list[str]) -> None:
        """``buf`` (the step's GEMM output) += the input side of its slots, run by run."""
        pre = {s["pre"].name for s in slots if s["pre"] is not None}
        for run in _runs([s for s in slots if s["pre"] is not None]):
            lo, hi = run[0]["offset"], run[-1]["offset"] + run[-1]["member"].size
            src = run[0]["pre"].name if len(run[0]["pre"].members) > 1 else run[0]["pre"].members[0].name
            if len(run) == len(slots) and len(pre) == 1 and sympy.expand(run[0]["pre"].rows - grp.rows) == 0:
                out.append(f"{buf} += {src}_seq[t]  # + the input side (and biases) of every slot")
            else:
                sl = _slice(lo, hi - lo)
                out.append(f"{buf}[:, {sl}] += {src}_seq[t, :, {sl}]")

    def vector(self, grp: GemmGroup, run: list, values: dict, what: str) -> str:
        name = self.e.fresh(f"{grp.name}_{what}")
        parts = ", ".join(f"np.full({dim(s['member'].size)}, {values[s['act']]}, dtype)" for s in run)
        self.alloc_lines.append(f"{name} = np.concatenate([{parts}])")
        return name


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


def emit(plan: KernelPlan) -> NumpyModule:
    """The statements of the generated module for ``plan``."""
    return _Emitter(plan).run()


def emit_loss(plan: KernelPlan) -> NumpyModule:
    """Only the loss statements (``loss_value``, ``loss_grad``, ``loss_scale``): what the
    CuPy module shares with the NumPy one, without emitting the whole NumPy module."""
    emitter = _Emitter(plan)
    emitter.loss()
    return emitter.m


class _Emitter:
    def __init__(self, plan: KernelPlan):
        self.plan, self.g, self.d = plan, plan.graph, plan.derivation
        self.m = NumpyModule()
        self.weights: dict[str, str] = {}  # group name -> weight code
        self.alias: dict[str, str] = {}  # adjoint name -> the name holding the same value
        self.acc: dict[str, list[str]] = {}  # value -> names of the arrays its adjoint sums
        self.group_buffers: dict[str, tuple[str, tuple]] = {}  # loop adjoint buffer -> (owner group, adjoints of its slots)
        self.destination: dict[str, str] = {}  # loop adjoint -> its slot in an adjoint buffer
        self.in_place: set[str] = set()  # loop adjoints computed directly into their slot
        self.region_name = ""
        self.temporaries = sympy.numbered_symbols("d_tmp")  # names of shared subexpressions
        self.stage: Stage | None = None
        self.shared_members: dict[str, str] = {}  # input-side product -> recurrent product, same adjoint
        self.shared_groups: dict[str, str] = {}
        self.partial_groups: dict[str, GemmGroup] = {}  # input-side groups some of whose members share a loop slot
        self.member_source: dict[str, tuple] = {}  # input-side product -> (loop group, offset) holding its adjoint
        self.routed: dict[sympy.Expr, str] = {}  # a step's whole contribution to an input-side buffer -> the buffer
        self.loop_buffer: dict[str, str] = {}  # loop group name -> its adjoint buffer
        self.slots: dict[str, tuple[str, str | None]] = {}  # loop adjoint -> (buffer over all steps, its columns there)
        self.deferred_sums: list = []  # (parameter leaf, adjoint name): sums over stored buffers
        self.coefs: dict[sympy.Expr, str] = {}  # coefficient of the adjoint recursion -> its buffer
        self.coef_refs: dict[str, str] = {}  # coefficient buffer -> its value at step t
        self.block_coefs: list[tuple[str, sympy.Expr]] = []  # (buffer, coefficient) computed per block of steps
        self.fresh_names: set[str] = set()
        self.transposes: dict[str, str] = {}  # weight code -> its contiguous transpose

    # -- names in each context ----------------------------------------------------
    def ref(self, name: str, ctx: str) -> str:
        """Code for value ``name`` in context ``ctx`` ('loop': one step t; 'all': every step;
        'block': the steps t0 .. t1 - 1)."""
        g = self.g
        if g.is_leaf(name):
            leaf = g.leaf(name)
            if leaf.kind == "input":
                return {"loop": "x[t]", "block": "x[t0:t1]"}.get(ctx, "x")
            if leaf.kind == "prev_state":
                return {"loop": name, "block": f"{leaf.state}_seq[t0:t1]"}.get(ctx, f"{leaf.state}_seq[:-1]")
            return name  # parameters (and their row blocks) are bound once
        region = self.plan.region_of[name]
        if name in g.state_names:
            return {"loop": name, "block": f"{name}_seq[t0 + 1:t1 + 1]"}.get(ctx, f"{name}_seq[1:]")
        if ctx == "loop" and region == "loop":
            return name
        return {"loop": f"{name}_seq[t]", "block": f"{name}_seq[t0:t1]"}.get(ctx, f"{name}_seq")

    def names(self, ctx: str) -> dict[str, str]:
        table = {leaf.name: self.ref(leaf.name, ctx) for leaf in self.g.leaves if leaf.kind != "target"}
        table.update({n.name: self.ref(n.name, ctx) for n in self.g.nodes})
        if ctx == "loop":
            table.update(self.coef_refs)
        return table

    def code(self, expr: sympy.Expr, ctx: str, extra: dict[str, str] | None = None) -> str:
        return numpy_code(expr, {**self.names(ctx), **(extra or {})})

    # -- the module ---------------------------------------------------------------
    def run(self) -> NumpyModule:
        self.setup()
        self.forward()
        self.backward()
        self.rtrl()
        self.loss()
        m = self.m
        self.lean_buffers()
        m.forward_setup = self.used_setup(m.stacks, m.forward_pre, m.forward_alloc, m.forward_loop, m.forward_post)
        m.backward_setup = self.used_setup(m.backward_seed, m.backward_post, m.backward_coefs, m.backward_loop,
                                           m.backward_after, m.backward_pre, m.backward_weights)
        m.rtrl_bind = self.used_setup(m.rtrl_setup, m.rtrl_loop, [code for _, code in m.rtrl_grads])
        return m

    def lean_buffers(self) -> None:
        """Backward allocates no more than it writes: a seed nothing adds into is read
        from the caller's array (or a broadcast zero); when the first write to d_x is a
        GEMM over every step, that GEMM writes into it (no zero fill, no temporary); so
        does a weight's gradient GEMM when it is the only write to that gradient."""
        m = self.m
        later = [*m.backward_post, *m.backward_coefs, *m.backward_loop, *m.backward_after, *m.backward_pre, *m.backward_weights]
        code = "\n".join(line.split("#")[0] for line in later)
        for i, line in enumerate(m.backward_weights):
            match = re.match(r"^(d_\w+) \+= (.+\.T) @ (.+)$", line)
            if not match or len(re.findall(rf"(\b{match.group(1)}\b(\[[^\]]*\])? \+?=)|(out={match.group(1)}\b)", code)) != 1:
                continue
            grad = match.group(1)
            m.backward_weights[i] = f"np.matmul({match.group(2)}, {match.group(3)}, out={grad})"
            m.backward_seed[m.backward_seed.index(f"{grad} = np.zeros_like({grad[2:]})")] = f"{grad} = np.empty_like({grad[2:]})"
        for i, line in enumerate(m.backward_seed):
            match = re.match(r"^(d_\w+_seq) = _seed\((.*)\)$", line)
            if match and not re.search(rf"\b{match.group(1)}(\[[^\]]*\])? \+?=", code):
                m.backward_seed[i] = f"{match.group(1)} = _seed({match.group(2)}, writable=False)"
        for body in (m.backward_post, m.backward_coefs, m.backward_loop, m.backward_after, m.backward_pre):
            for i, line in enumerate(body):
                if "d_x_seq" not in line.split("#")[0]:
                    continue
                match = re.match(r"^d_x_seq \+= \((.*) @ (.*)\)\.reshape\(T, B, n_in\)$", line.split("  #")[0])
                if match:
                    body[i] = f"np.matmul({match.group(1)}, {match.group(2)}, out=d_x_seq.reshape(-1, n_in))"
                    m.backward_seed[m.backward_seed.index("d_x_seq = np.zeros_like(x)")] = "d_x_seq = np.empty((T, B, n_in), dtype)"
                return

    def used_setup(self, *bodies: list[str]) -> list[str]:
        """The setup lines a function needs: every parameter, and the row blocks its code reads."""
        code = "\n".join(line.split("#")[0] for body in bodies for line in body)
        return [line for line in self.m.setup
                if "= p[" in line or re.search(rf"\b{line.split(' = ')[0]}\b", code)]

    def setup(self) -> None:
        m, g = self.m, self.g
        for p in g.params:
            m.setup.append(f'{p.name} = p["{p.name}"]')
        for leaf in g.leaves:
            if leaf.kind == "param" and leaf.block is not None:
                m.setup.append(f"{leaf.name} = {leaf.param}[{_slice(leaf.block * leaf.size, leaf.size)}]")
        for region in self.plan.regions:
            for stage in region.stages:
                for group in stage.groups:
                    self.weights[group.name] = self.stack(group)

    def member_weight(self, mv: MatVecNode) -> str:
        p = self.g.param(mv.param)
        rows = "" if mv.block is None else _slice(mv.block * mv.size, mv.size)
        full_cols = sympy.simplify(mv.cols[0]) == 0 and sympy.simplify(mv.cols[1] - p.shape[1]) == 0
        cols = "" if full_cols else _slice(mv.cols[0], mv.cols[1] - mv.cols[0])
        if not rows and not cols:
            return mv.param
        return f"{mv.param}[{rows or ':'}{', ' + cols if cols else ''}]"

    def transposed(self, group: GemmGroup) -> str:
        """W^T of a per-step product as a contiguous array, made once per call (per-step
        products are ``np.dot``: for 2-D operands the same GEMM as ``np.matmul``, with about
        1 us less dispatch per call, a few percent of a step at small sizes): OpenBLAS
        multiplies one step's (B, H) by it faster than by the transposed view (up to
        1.4x in float32 at B=32, H=256).  The copy costs ~7 ms for a 512 x 2048 float32
        weight, so products done once (all steps in one GEMM) keep the view."""
        w = self.weights[group.name]
        if w not in self.transposes:
            stem = (w if w.isidentifier() else f"W_{group.name}") + "_T"
            self.transposes[w] = self.fresh(stem)
            self.m.stacks.append(f"{self.transposes[w]} = np.ascontiguousarray({w}.T)")
        return self.transposes[w]

    def stack(self, group: GemmGroup) -> str:
        if group.whole_param:
            return group.whole_param
        if len(group.members) == 1:
            return self.member_weight(group.members[0])
        name = f"W_stack_{group.operand}"
        parts = ", ".join(self.member_weight(mv) for mv in group.members)
        self.m.stacks.append(f"{name} = np.concatenate([{parts}], axis=0)  # stacked: one GEMM for {len(group.members)} products")
        return name

    # -- forward ------------------------------------------------------------------
    def gemm_forward(self, group: GemmGroup, ctx: str, out: list[str]) -> None:
        operand = self.ref(group.operand, ctx)
        w = self.weights[group.name]
        suffix = "" if ctx == "loop" else "_seq"
        labels = ", ".join(mv.name for mv in group.members)
        if ctx == "loop":
            product = f"np.dot({operand}, {self.transposed(group)})"
        else:
            product = steps_matmul(operand, dim(self.g.size(group.operand)), f"{w}.T", dim(group.rows))  # once: a view
        if len(group.members) == 1:
            out.append(f"{group.members[0].name}{suffix} = {product}  # {labels}")
        else:
            out.append(f"{group.name}{suffix} = {product}  # {labels}")
            for mv, off in zip(group.members, group.offsets):
                out.append(f"{mv.name}{suffix} = {group.name}{suffix}[..., {_slice(off, mv.size)}]")
        if ctx == "loop":
            out.extend(f"{mv.name}_seq[t] = {mv.name}" for mv in group.members if mv.name in self.plan.stored)

    def forward(self) -> None:
        m, g, plan = self.m, self.g, self.plan
        # values that do not change over time (computed from parameters only, e.g.
        # sigmoid(b)): broadcast to (T, B, size) like every other value of a region
        constant = {leaf.name for leaf in g.leaves if leaf.kind == "param"}
        for n in g.nodes:
            if isinstance(n, Pointwise) and all(d in constant for d in n.deps):
                constant.add(n.name)
        fused = _LoopFusion(self)
        for ctx, region, out in (("all", plan.pre, m.forward_pre), ("loop", plan.loop, m.forward_loop), ("all", plan.post, m.forward_post)):
            for stage in region.stages:
                for group in stage.groups:
                    if ctx == "loop" and group.name in fused.groups:
                        fused.gemm(group, out)
                    else:
                        self.gemm_forward(group, ctx, out)
                if region is plan.pre:
                    out.extend(fused.pre_lines if stage is region.stages[-1] else [])
                for node in stage.pointwise:
                    if ctx == "all" and node.name in constant:
                        out.append(f"{node.name}_seq = np.broadcast_to({self.code(node.expr, ctx)}, (T, B, {dim(node.size)}))  # {self.label(node)}")
                    elif ctx == "all":
                        out.append(f"{node.name}_seq = {self.code(node.expr, ctx)}  # {self.label(node)}")
                    elif node.name not in fused.computed:
                        self.pointwise_forward(node, fused.expr(node), fused, out)
        for s in g.states:
            m.forward_alloc.append(f"{s.name}_seq = np.empty((T + 1, B, {dim(s.size)}), dtype)")
            m.forward_alloc.append(f'{s.name}_seq[0] = state0["{s.name}"]')
        m.forward_alloc.extend(fused.alloc_lines)
        for name in plan.stored:
            if name not in fused.views:
                m.forward_alloc.append(f"{name}_seq = np.empty((T, B, {dim(g.node(name).size)}), dtype)")
        m.forward_alloc.extend(fused.view_lines)
        if plan.loop.stages:
            m.forward_loop[:0] = [f"{s.prev} = {s.name}_seq[t]" for s in g.states]
        m.outputs = [(s.name, f"{s.name}_seq[1:]") for s in g.states] + [(r, f"{r}_seq") for r in g.readouts]
        # what backward reads
        keep = {s.name + "_seq" for s in g.states} | {n + "_seq" for n in plan.stored}
        for name in self.d.stored_values:
            if not g.is_leaf(name) and plan.region_of[name] != "loop":
                keep.add(name + "_seq")
        keep |= {w for w in self.weights.values() if w.startswith("W_stack_")}
        m.cache_names = sorted(keep)
        # views of input-side products that folding left unread
        code = "\n".join([*m.forward_loop, *m.forward_post, *fused.pre_lines, *(c for _, c in m.outputs), *m.cache_names])
        views = {i: match.group(1) for i, line in enumerate(m.forward_pre)
                 if (match := re.match(r"^(\w+_seq) = \w+_seq\[\.\.\., [^\]]*\]$", line))}
        code += "\n".join(line for i, line in enumerate(m.forward_pre) if i not in views)
        m.forward_pre = [line for i, line in enumerate(m.forward_pre) if i not in views or re.search(rf"\b{views[i]}\b", code)]

    def pointwise_forward(self, node: Pointwise, expr: sympy.Expr, fused: "_LoopFusion", out: list[str]) -> None:
        """One step of a pointwise node, written straight into its stored buffer where it has one."""
        g, plan = self.g, self.plan
        names = {**self.names("loop"), **fused.slot_names}
        code = numpy_code(expr, names)
        label = f"  # {self.label(node)}"
        if node.name in g.state_names:
            dest = f"{node.name}_seq[t + 1]"
        elif node.name in plan.stored:
            dest = f"{node.name}_seq[t]"
        else:
            out.append(f"{node.name} = {code}{label}")
            return
        ufunc = {sympy.Add: "np.add", sympy.Mul: "np.multiply"}.get(type(expr))
        if ufunc and len(expr.args) >= 2:
            first, rest = expr.args[0], expr.func(*expr.args[1:])
            out.append(f"{node.name} = {dest}")
            out.append(f"{ufunc}({numpy_code(first, names)}, {numpy_code(rest, names)}, out={node.name}){label}")
        elif type(expr).__name__ == "tanh":
            out.append(f"{node.name} = {dest}")
            out.append(f"np.tanh({numpy_code(expr.args[0], names)}, out={node.name}){label}")
        else:
            out.append(f"{node.name} = {code}{label}")
            out.append(f"{dest} = {node.name}")

    def label(self, node) -> str:
        """The label of the equation a node implements (as in ``symrnn latex``)."""
        return f"eq:{self.g.cell}:{node.name if node.role != 'auxiliary' else node.equation or node.name}"

    # -- backward -----------------------------------------------------------------
    def shared_adjoints(self) -> dict[str, str]:
        """Input-side products whose adjoint provably equals a recurrent product's.

        W_x x and W_h h_prev added into the same pre-activations have the same
        consumers with the same partial derivatives, hence the same adjoint: the
        input side then reads the recurrent GEMM's adjoint buffer instead of
        keeping a copy.  Returns pre-region group name -> loop group name."""
        shared = {}
        loop_groups = [grp for st in self.plan.loop.stages for grp in st.groups]
        for stage in self.plan.pre.stages:
            for pre in stage.groups:
                for rec in loop_groups:
                    if len(pre.members) == len(rec.members) and all(
                        self.same_adjoint(a, b) for a, b in zip(pre.members, rec.members)
                    ):
                        shared[pre.name] = rec.name
                        self.shared_members.update({a.name: b.name for a, b in zip(pre.members, rec.members)})
                        break
                else:
                    if pre.operand != self.g.input.name:
                        continue
                    # member by member (GRU: r and z share, n keeps its own)
                    for a in pre.members:
                        for rec in loop_groups:
                            for b, off in zip(rec.members, rec.offsets):
                                if a.name not in self.member_source and self.same_adjoint(a, b):
                                    self.member_source[a.name] = (rec, off)
                                    self.shared_members[a.name] = b.name
                    if any(a.name in self.member_source for a in pre.members):
                        self.partial_groups[pre.name] = pre
        return shared

    def same_adjoint(self, a: MatVecNode, b: MatVecNode) -> bool:
        consumers_a = {c.name for c in self.g.consumers(a.name)}
        if consumers_a != {c.name for c in self.g.consumers(b.name)} or sympy.simplify(a.size - b.size) != 0:
            return False
        loop = set(self.plan.loop.nodes)
        return consumers_a <= loop and all(
            isinstance(self.g.node(c), Pointwise) and self.d.partial(c, a.name) == self.d.partial(c, b.name)
            for c in consumers_a
        )

    def backward(self) -> None:
        m, g, plan = self.m, self.g, self.plan
        self.shared_groups = self.shared_adjoints()
        for s in g.states:
            m.backward_seed.append(f'd_{s.name}_seq = _seed(grad_outputs, "{s.name}", (T, B, {dim(s.size)}), dtype)')
        for r in g.readouts:
            m.backward_seed.append(f'd_{r}_seq = _seed(grad_outputs, "{r}", (T, B, {dim(g.node(r).size)}), dtype)')
            self.acc[r] = [f"d_{r}_seq"]
        # adjoint buffers for values that receive contributions from a later region
        order = {"pre": 0, "loop": 1, "post": 2}
        for n in g.nodes:
            if n.name in g.state_names or n.name in g.readouts:
                continue
            mine = order[plan.region_of[n.name]]
            later = any(order[plan.region_of[c.name]] > mine for c in g.consumers(n.name))
            if later and n.name not in self.shared_members:
                m.backward_seed.append(f"d_{n.name}_seq = np.zeros((T, B, {dim(n.size)}), dtype)")
        m.backward_seed.append("d_x_seq = np.zeros_like(x)")
        for p in g.params:
            m.backward_seed.append(f"d_{p.name} = np.zeros_like({p.name})")

        self.region_backward(plan.post, "all", m.backward_post)
        for s in g.states:
            self.acc.setdefault(s.name, []).extend([f"d_{s.name}_seq[t]", f"d_{s.name}_next"])
        for name in plan.loop.nodes:
            if name not in g.state_names and any(plan.region_of[c.name] == "post" for c in g.consumers(name)):
                self.acc.setdefault(name, []).append(f"d_{name}_seq[t]")
        self.region_backward(plan.loop, "loop", m.backward_loop)
        self.parameter_sums()
        for name in plan.pre.nodes:
            if name in self.shared_members:
                self.acc[name] = [f"d_{self.shared_members[name]}"]  # never printed: see gemm_backward
            elif any(plan.region_of[c.name] != "pre" for c in g.consumers(name)):
                self.acc.setdefault(name, []).append(f"d_{name}_seq")
        self.region_backward(plan.pre, "all", m.backward_pre)
        self.share_coefficients()
        # initial states and the input
        m.grads = [(p.name, f"d_{p.name}") for p in g.params] + [("x", "d_x_seq")]
        m.grads += [(f"{s.name}0", f"d_{s.name}_next") for s in g.states]

    def parameter_sums(self) -> None:
        """Gradients of elementwise parameters whose adjoint a buffer stores: one sum per
        buffer over the steps and the batch, shared by every parameter that reads it
        (PyTorch's two biases get the same sum)."""
        totals: dict[str, str] = {}
        for leaf, name in self.deferred_sums:
            name = self.alias.get(name, name)
            p = self.g.param(leaf.param)
            rows = "" if leaf.block is None else f"[{_slice(leaf.block * leaf.size, leaf.size)}]"
            if name not in self.slots:
                raise InternalError(f"adjoint '{name}' of cell '{self.g.cell}' is not stored over the steps")
            buf, cols = self.slots[name]
            if p.kind == "scalar":
                self.m.backward_after.append(f"d_{p.name}{rows} += np.sum({buf}{f'[..., {cols}]' if cols else ''})")
                continue
            if buf not in totals:
                totals[buf] = self.fresh(f"{buf.removesuffix('_seq')}_sum")
                self.m.backward_after.append(f"{totals[buf]} = np.sum({buf}, axis=(0, 1))  # over the steps and the batch")
            self.m.backward_after.append(f"d_{p.name}{rows} += {totals[buf]}{f'[{cols}]' if cols else ''}")

    def fresh(self, stem: str) -> str:
        """``stem``, or ``stem_1``, ...: a name no value of the cell, its adjoint, buffer or
        coefficient has."""
        names = {leaf.name for leaf in self.g.leaves} | {n.name for n in self.g.nodes}
        taken = {f"{pre}{n}{post}" for n in names for pre in ("", "d_") for post in ("", "_seq")}
        taken |= set(self.coefs.values()) | set(self.fresh_names)
        name, k = stem, 1
        while name in taken:
            name, k = f"{stem}_{k}", k + 1
        self.fresh_names.add(name)
        return name

    def region_backward(self, region: Region, ctx: str, out: list[str]) -> None:
        g = self.g
        self.region_name = region.name
        for k in reversed(range(len(region.stages))):
            self.stage_backward(region, region.stages[k], k, ctx, out)
        if ctx == "loop":
            bind = [f"{name} = {self.bind_code(name)}" for name in self.loop_bindings(out)]
            prev = []
            for s in g.states:
                terms = self.acc.get(s.prev, [])
                prev.append(f"d_{s.name}_next = {' + '.join(terms) if terms else 'np.zeros_like(d_' + s.name + '_next)'}")
            out[:] = bind + out + prev

    def loop_bindings(self, lines: list[str]) -> list[str]:
        """Forward values the loop body reads, in graph order."""
        code = "\n".join(line.split("#")[0] for line in lines)  # comments cite labels, not values
        used = set(_words(code))
        names = []
        for s in self.g.states:
            if s.prev in used:
                names.append(s.prev)
        for n in self.g.nodes:
            if n.name in used and self.plan.region_of[n.name] == "loop":
                names.append(n.name)
        return names

    def bind_code(self, name: str) -> str:
        g = self.g
        if g.is_leaf(name):
            return f"{g.leaf(name).state}_seq[t]"
        if name in g.state_names:
            return f"{name}_seq[t + 1]"
        if name in self.plan.stored:
            return f"{name}_seq[t]"
        raise InternalError(f"backward of cell '{g.cell}' reads '{name}', which forward does not store")

    def stage_backward(self, region: Region, stage: Stage, k: int, ctx: str, out: list[str]) -> None:
        g, d = self.g, self.d
        self.stage = stage
        final_pw = {n.name for n in stage.pointwise}
        final = [n for n in g.nodes if n.name in final_pw or n.name in {mv.name for mv in stage.matvecs}]
        seen: dict[sympy.Expr, str] = {}  # adjoint expression -> the name that holds it
        nonzero: set[str] = set()
        stmts: list[tuple[str, sympy.Expr | None]] = []  # (line with {} for the expression, expression)
        for node in reversed(final):
            if node.name in self.shared_members and ctx == "all":
                nonzero.add(node.name)  # held by the recurrent GEMM's adjoint buffer
                continue
            terms = [sympy.Symbol(src) for src in self.acc.get(node.name, [])]
            for c, coeff in d.adjoint_terms(node.name):
                if c in final_pw and c in nonzero:
                    terms.append(coeff * sympy.Symbol(f"d_{c}"))
            expr = sympy.Add(*terms)
            if expr == 0:
                continue
            nonzero.add(node.name)
            stmts.append(self.assign(f"d_{node.name}", expr, ctx, seen, label=f"eq:{g.cell}:adj:{node.name}"))
        # contributions to values outside this stage
        targets = sorted({dep for n in stage.pointwise for dep in n.deps} - {n.name for n in final},
                         key=lambda name: (g.is_leaf(name), self.order(name)))  # values first, then parameters
        for dep in targets:
            expr = sympy.Add(*[d.partial(c.name, dep) * sympy.Symbol(f"d_{c.name}") for c in stage.pointwise if c.name in nonzero])
            if expr != 0:
                self.route(dep, expr, k, ctx, stmts, seen)
        if ctx == "loop":
            stmts = self.linearize(stmts, stage)
            for group in stage.groups:
                self.loop_adjoint_buffer(group, nonzero)
        self.print_with_cse(stmts, ctx, out)
        for group in stage.groups:
            self.gemm_backward(region, group, ctx, out, nonzero)

    def linearize(self, stmts: list, stage: Stage) -> list:
        """Leave in the loop only what depends on the incoming adjoints.

        Every adjoint statement is linear in adjoints, with coefficients that
        are functions of stored forward values only.  First, an adjoint used
        once (or defined as one adjoint times a coefficient) is substituted
        into its user, so chains such as d_tanh_c = d_h o, d_c += d_tanh_c (1 -
        tanh_c^2) collapse into one product.  Then each statement is split into
        sum_j d_j * k_j; a coefficient k_j that is more than a number or one
        stored value becomes a buffer computed for a block of steps at once,
        before the loop runs over that block (``backward_coefs``)."""
        keep = {f"d_{mv.name}" for mv in stage.matvecs}  # written to the GEMM's adjoint buffer
        keep |= {name for names in self.acc.values() for name in names}
        keep |= set(self.alias) | set(self.alias.values())
        uses: dict[str, int] = {}
        for template, expr in stmts:
            names = [s.name for s in expr.free_symbols] if expr is not None else _words(template.split("=", 1)[1])
            for name in names:
                uses[name] = uses.get(name, 0) + 1
        inlined: dict[sympy.Symbol, sympy.Expr] = {}
        kept = []
        for template, expr in stmts:
            if expr is not None:
                expr = expr.xreplace(inlined)
            name = _assigned(template)
            if name and expr is not None and name not in keep and (uses.get(name, 0) <= 1 or _one_term(expr)):
                inlined[sympy.Symbol(name)] = expr
                continue
            kept.append((template, expr))
        return [(template, self.split_coefficients(template, expr) if expr is not None else None) for template, expr in kept]

    def split_coefficients(self, template: str, expr: sympy.Expr) -> sympy.Expr:
        """``expr`` = sum_j d_j * k_j with each non-trivial k_j replaced by its buffer."""
        adjoints = sorted((s for s in expr.free_symbols if s.name.startswith("d_")), key=lambda s: s.name)
        terms = [(a, sympy.factor_terms(sympy.diff(expr, a))) for a in adjoints]
        if any(k.has(*adjoints) for _, k in terms) or sympy.expand(expr - sum(a * k for a, k in terms)) != 0:
            raise InternalError(f"adjoint statement '{template}' of cell '{self.g.cell}' is not linear in the adjoints: {expr}")
        target = _assigned(template) or "d_"
        return sympy.Add(*[a * self.coefficient(k, a.name, target) for a, k in terms])

    def coefficient(self, k: sympy.Expr, source: str, target: str) -> sympy.Expr:
        """A symbol for coefficient ``k`` (a buffer over a block of steps), or ``k`` itself when trivial."""
        if k.is_Number or k.is_Symbol or (-k).is_Symbol:
            return k
        if k not in self.coefs:
            src, tgt = source[2:], target[2:]
            name = self.fresh(f"d{src}_d{tgt}" if src.isidentifier() and tgt.isidentifier() else "d_coef")
            self.coefs[k] = name
            varies = any(not self.g.is_leaf(s.name) or self.g.leaf(s.name).kind != "param" for s in k.free_symbols)
            if varies:
                self.coef_refs[name] = f"{name}[t - t0]"
                self.block_coefs.append((name, k))  # printed by share_coefficients
            else:  # parameters only: once
                self.coef_refs[name] = name
                self.m.backward_seed.append(f"{name} = {self.code(k, 'all')}")
        return sympy.Symbol(self.coefs[k])

    def share_coefficients(self) -> None:
        """Print the per-block coefficients, their common subexpressions computed once
        (sympy.cse): GRU's r (1 - n^2)(1 - z) appears in three of its four coefficients."""
        replacements, reduced = sympy.cse([k for _, k in self.block_coefs], symbols=sympy.numbered_symbols("coef_tmp"), order="none")
        rename = {sym: sympy.Symbol(self.fresh("common")) for sym, _ in replacements}
        own = {s.name: s.name for s in rename.values()}  # printed as themselves, not as stored values
        lines = [(rename[sym].name, expr) for sym, expr in replacements] + [(name, k) for (name, _), k in zip(self.block_coefs, reduced)]
        self.m.backward_coefs.extend(f"{name} = {self.code(expr.xreplace(rename), 'block', own)}" for name, expr in lines)

    def print_with_cse(self, stmts: list, ctx: str, out: list[str]) -> None:
        """Print a stage's statements, common subexpressions shared (sympy.cse).

        Each temporary is placed just before the first statement that reads it,
        so it may use the adjoints computed by the statements above."""
        exprs = [e for _, e in stmts if e is not None]
        replacements, reduced = sympy.cse(exprs, symbols=self.temporaries, order="none")
        definition = dict(replacements)
        position = {sym: i for i, (sym, _) in enumerate(replacements)}
        emitted: set[sympy.Symbol] = set()

        def place(expr: sympy.Expr) -> None:
            for sym in sorted(expr.free_symbols & definition.keys(), key=position.get):
                if sym not in emitted:
                    place(definition[sym])
                    emitted.add(sym)
                    out.append(f"{sym.name} = {self.code(definition[sym], ctx)}")

        reduced = iter(reduced)
        for template, expr in stmts:
            if expr is None:
                out.append(template)
                continue
            expr = next(reduced)
            place(expr)
            name = _assigned(template)
            lhs = template.split(" = {}", 1)[0] if " = {}" in template else ""
            target = lhs if lhs.endswith("]") else None  # a buffer slot (d_W_x_seq[t])
            if name in self.destination:  # an adjoint whose slot in a GEMM's adjoint buffer is known
                target = name
            if ctx == "loop" and target and expr.is_Mul and len(expr.args) == 2:
                # one product, straight into the buffer's slot: no temporary, no copy
                a, b = (self.code(arg, ctx) for arg in expr.args)
                if target == name:
                    self.in_place.add(name)
                    out.append(f"{name} = {self.destination[name]}")
                out.append(f"np.multiply({a}, {b}, out={target}){template.split('{}', 1)[1]}")
                continue
            out.append(template.format(self.code(expr, ctx)))

    def order(self, name: str) -> tuple[int, str]:
        for i, leaf in enumerate(self.g.leaves):
            if leaf.name == name:
                return (i, name)
        return (len(self.g.leaves) + [n.name for n in self.g.nodes].index(name), name)

    def assign(self, name: str, expr: sympy.Expr, ctx: str, seen: dict, label: str = "") -> tuple[str, sympy.Expr | None]:
        """``name = expr``, or an alias when the same expression was computed already."""
        expr = sympy.factor_terms(expr)
        comment = f"  # {label}" if label else ""
        if expr in seen:
            self.alias[name] = seen[expr]
            return (f"{name} = {seen[expr]}{comment}", None)
        seen[expr] = name
        return (f"{name} = {{}}{comment}", expr)

    def route(self, dep: str, expr: sympy.Expr, k: int, ctx: str, out: list[str], seen: dict) -> None:
        """Add a stage's contribution ``expr`` to the adjoint of ``dep`` (outside the stage)."""
        g = self.g
        expr = sympy.factor_terms(expr)
        if expr in seen:  # the very value an adjoint already holds
            expr = sympy.Symbol(seen[expr])
        leaf = g.leaf(dep) if g.is_leaf(dep) else None
        if dep in self.shared_members:
            return  # the recurrent product's adjoint buffer holds this value already
        stored = {f"d_{mv.name}" for mv in self.stage.matvecs}  # written to a buffer over all steps
        if leaf is not None and leaf.kind == "param" and ctx == "loop" and expr.is_Symbol and self.alias.get(expr.name, expr.name) in stored:
            self.deferred_sums.append((leaf, expr.name))  # summed over every step after the loop
            return
        if leaf is not None and leaf.kind == "param" and ctx == "loop" and expr in self.routed and self.only_here(dep):
            self.slots.setdefault(self.routed[expr], (self.routed[expr], None))
            self.deferred_sums.append((leaf, self.routed[expr]))  # the same values as that buffer's
            return
        if leaf is not None and leaf.kind == "param":
            p = g.param(leaf.param)
            rows = "" if leaf.block is None else f"[{_slice(leaf.block * leaf.size, leaf.size)}]"
            axes = "" if p.kind == "scalar" else (", axis=0" if ctx == "loop" else ", axis=(0, 1)")
            out.append((f"d_{p.name}{rows} += np.sum({{}}{axes})", expr))
        elif leaf is not None and leaf.kind == "input":
            out.append((f"d_x_seq{'[t]' if ctx == 'loop' else ''} += {{}}", expr))
        elif leaf is not None and leaf.kind == "prev_state":
            name = f"d_{dep}_{k}"
            out.append(self.assign(name, expr, ctx, seen))
            self.acc.setdefault(dep, []).append(name)
        else:
            if self.plan.region_of[dep] == self.region_name:
                name = f"d_{dep}_from{k}"
                out.append(self.assign(name, expr, ctx, seen))
                self.acc.setdefault(dep, []).append(name)
            else:
                if ctx == "loop" and self.only_here(dep):  # this step's whole contribution
                    out.append((f"d_{dep}_seq[t] = {{}}", expr))
                    self.routed.setdefault(expr, f"d_{dep}_seq")
                else:
                    out.append((f"d_{dep}_seq{'[t]' if ctx == 'loop' else ''} += {{}}", expr))

    def loop_adjoint_buffer(self, group: GemmGroup, nonzero: set[str]) -> tuple[str, bool]:
        """The buffer holding a loop GEMM's output adjoint for every step (for the weight
        gradient after the loop), and whether it is this group's own.  A member adjoint
        that is one product is written into its slot in place (``self.in_place``)."""
        if group.name in self.loop_buffer:
            buf = self.loop_buffer[group.name]
            return buf, self.group_buffers[buf][0] == group.name
        adj = [self.alias.get(f"d_{mv.name}", f"d_{mv.name}") if mv.name in nonzero else None for mv in group.members]
        signature = tuple(adj)
        for buf, (_, held) in self.group_buffers.items():
            if held == signature:
                self.loop_buffer[group.name] = buf
                return buf, False
        buf = f"d_{group.name}_seq"
        self.loop_buffer[group.name] = buf
        self.group_buffers[buf] = (group.name, signature)
        self.m.backward_seed.append(f"{buf} = np.empty((T, B, {dim(group.rows)}), dtype)")
        for a, mv, off in zip(adj, group.members, group.offsets):
            if a:
                self.slots.setdefault(a, (buf, _slice(off, mv.size) if len(group.members) > 1 else None))
                self.destination.setdefault(a, self.slot(group, mv, off, buf))
        return buf, True

    @staticmethod
    def slot(group: GemmGroup, mv: MatVecNode, offset: sympy.Expr, buf: str) -> str:
        return f"{buf}[t]" if len(group.members) == 1 else f"{buf}[t, :, {_slice(offset, mv.size)}]"

    def only_here(self, name: str) -> bool:
        """Every consumer of ``name`` is a pointwise node of the current stage."""
        here = {n.name for n in self.stage.pointwise}
        return all(c.name in here for c in self.g.consumers(name))

    def gemm_backward(self, region: Region, group: GemmGroup, ctx: str, out: list[str], nonzero: set[str]) -> None:
        g = self.g
        w = self.weights[group.name]
        adj = [f"d_{mv.name}" if mv.name in nonzero else None for mv in group.members]
        adj = [self.alias.get(a, a) if a else None for a in adj]
        if all(a is None for a in adj):
            return
        buf = f"d_{group.name}_seq"
        if ctx == "loop":
            buf, new = self.loop_adjoint_buffer(group, nonzero)
            if new:
                for a, mv, off in zip(adj, group.members, group.offsets):
                    if a not in self.in_place:
                        out.append(f"{self.slot(group, mv, off, buf)} = {a or 0.0}")
            step = f"{buf}[t]"
        elif group.name in self.shared_groups:
            buf = self.loop_buffer[self.shared_groups[group.name]]
            step = buf
        elif group.name in self.partial_groups:
            self.partial_gemms(group, adj)
            return
        else:
            if len(group.members) == 1:
                out.append(f"{buf} = {adj[0]}")
            else:
                parts = ", ".join(a or f"np.zeros_like({self.ref(mv.name, ctx)})" for a, mv in zip(adj, group.members))
                out.append(f"{buf} = np.concatenate([{parts}], axis=-1)")
            step = buf
        # adjoint of the operand: W^T delta
        operand = group.operand
        back = steps_matmul(buf, dim(group.rows), w, dim(g.size(operand)))  # W^T delta, every step
        in_loop = ctx == "loop" and (g.is_leaf(operand) and g.leaf(operand).kind == "prev_state" or self.plan.region_of.get(operand) == "loop")
        if ctx == "loop" and not in_loop:
            target = "d_x_seq" if operand == g.input.name else f"d_{operand}_seq"
            self.m.backward_after.append(f"{target} += {back}  # W^T delta for every step at once")
        elif ctx == "loop":
            name = f"d_{operand}_from_{group.name}"
            out.append(f"{name} = np.dot({step}, {w})")
            self.acc.setdefault(operand, []).append(name)
        else:
            if operand == g.input.name:
                out.append(f"d_x_seq += {back}")
            elif operand in g.state_names or self.plan.region_of[operand] != self.region_name:
                out.append(f"d_{operand}_seq += {back}")
            else:
                name = f"d_{operand}_from_{group.name}"
                out.append(f"{name} = {back}")
                self.acc.setdefault(operand, []).append(name)
        # gradient of the weights: one GEMM over every step, after the loop
        rows, cols = dim(group.rows), dim(g.size(operand))
        src = self.ref(operand, "all")
        dW = f"{buf}.reshape(-1, {rows}).T @ {src}.reshape(-1, {cols})"
        lines = self.m.backward_weights
        if group.whole_param:
            lines.append(f"d_{group.whole_param} += {dW}")
        else:
            lines.append(f"dW_stack = {dW}")
            for mv, off in zip(group.members, group.offsets):
                target = self.member_weight(mv).replace(mv.param, f"d_{mv.param}", 1)
                lines.append(f"{target} += dW_stack[{_slice(off, mv.size)}]")

    def partial_gemms(self, group: GemmGroup, adj: list[str | None]) -> None:
        """Input-side GEMMs of a group whose members partly share the loop buffer's slots:
        one product per run of members (shared runs read the loop buffer, no copies)."""
        g = self.g
        runs: list[list] = []  # [source, first offset in source, first row, size]
        for a, mv, off in zip(adj, group.members, group.offsets):
            if mv.name in self.member_source:
                rec, rec_off = self.member_source[mv.name]
                loop_buf = self.loop_buffer[rec.name]
                if len(rec.members) == 1:
                    rec_off = None  # the whole buffer
                if (runs and runs[-1][0] == loop_buf and rec_off is not None and runs[-1][1] is not None
                        and sympy.expand(runs[-1][1] + runs[-1][3] - rec_off) == 0):
                    runs[-1][3] += mv.size
                    continue
                runs.append([loop_buf, rec_off, off, mv.size])
            elif a:
                runs.append([a, None, off, mv.size])
        w, cols = self.weights[group.name], dim(g.size(group.operand))
        for source, src_off, row, size in runs:
            view = source if src_off is None else f"{source}[..., {_slice(src_off, size)}]"
            rows = _slice(row, size)
            self.m.backward_pre.append(f"d_x_seq += {steps_matmul(view, dim(size), f'{w}[{rows}]', cols)}")
            dW = f"{view}.reshape(-1, {dim(size)}).T @ x.reshape(-1, {cols})"
            if group.whole_param:
                self.m.backward_weights.append(f"d_{group.whole_param}[{rows}] += {dW}")
                continue
            for mv, off in zip(group.members, group.offsets):  # stacked from several parameters: member by member
                inside = sympy.expand(off - row)
                if inside.is_negative or sympy.expand(row + size - off - mv.size).is_negative:
                    continue
                part = source if src_off is None else f"{source}[..., {_slice(src_off + inside, mv.size)}]"
                dW = f"{part}.reshape(-1, {dim(mv.size)}).T @ x.reshape(-1, {cols})"
                self.m.backward_weights.append(f"{self.member_weight(mv).replace(mv.param, f'd_{mv.param}', 1)} += {dW}")

    # -- forward mode (RTRL) ------------------------------------------------------
    def rtrl(self) -> None:
        """Tangents of every value w.r.t. every parameter, initial state and input entry.

        Directions are stacked on a leading axis of length K: the parameters in
        declaration order, then each initial state, then x (T * n_in entries).
        ``J_q`` has shape (K, B, size of q)."""
        m, g, d = self.m, self.g, self.d
        prev = "0"
        for p in g.params:
            m.rtrl_setup.append(f"o_{p.name} = {prev}")
            prev = f"o_{p.name} + {p.name}.size"
        for s in g.states:
            m.rtrl_setup.append(f"o_{s.name}0 = {prev}")
            prev = f"o_{s.name}0 + {dim(s.size)}"
        m.rtrl_setup.append(f"o_x = {prev}")
        m.rtrl_setup.append("K = o_x + T * n_in")
        for s in g.states:
            m.rtrl_setup.append(f'{s.name} = state0["{s.name}"]')
            m.rtrl_setup.append(f"J_{s.name} = np.zeros((K, B, {dim(s.size)}), dtype)")
            m.rtrl_setup.append(f"_add_diagonal(J_{s.name}, o_{s.name}0, 1.0)  # d{s.name}^(-1)/d{s.name}0 = I")
        loop = m.rtrl_loop
        for s in g.states:
            loop.append(f"{s.prev}, J_{s.prev} = {s.name}, J_{s.name}")
        names = {n.name: n.name for n in g.nodes}
        names[g.input.name] = "x[t]"
        x_slab = "o_x + t * n_in"
        for node in g.nodes:
            loop.append(f"# {node.name}  {self.label(node)}")
            if isinstance(node, Pointwise):
                loop.append(f"{node.name} = {self.code(node.expr, 'loop', names)}")
                tangent, direct = [], []
                for dep, coeff in d.tangent_terms(node.name):
                    leaf = g.leaf(dep) if g.is_leaf(dep) else None
                    c = self.code(coeff, "loop", names)
                    if leaf is None or leaf.kind == "prev_state":
                        tangent.append(f"J_{dep}" if coeff == 1 else f"({c}) * J_{dep}")
                    elif leaf.kind == "input":
                        direct.append(f"_add_diagonal(J_{node.name}, {x_slab}, {c})")
                    elif g.param(leaf.param).kind == "scalar":
                        direct.append(f"J_{node.name}[o_{leaf.param}] += {c}")
                    else:
                        row0 = dim(leaf.block * leaf.size) if leaf.block else "0"
                        off = f"o_{leaf.param}" + ("" if row0 == "0" else f" + {row0}")
                        direct.append(f"_add_diagonal(J_{node.name}, {off}, {c})")
                if not tangent:
                    rhs = f"np.zeros((K, B, {dim(node.size)}), dtype)"
                elif len(tangent) == 1 and tangent[0].startswith("J_") and direct:
                    rhs = f"{tangent[0]}.copy()"
                else:
                    rhs = " + ".join(tangent)
                loop.append(f"J_{node.name} = {rhs}")
                loop.extend(direct)
            else:
                w = self.member_weight(node)
                operand = names.get(node.operand, node.operand)
                loop.append(f"{node.name} = {operand} @ {w}.T")
                if node.operand == g.input.name:
                    loop.append(f"J_{node.name} = np.zeros((K, B, {dim(node.size)}), dtype)")
                    loop.append(f"J_{node.name}[{x_slab}:{x_slab} + n_in] += {w}.T[:, None, :]")
                else:
                    loop.append(f"J_{node.name} = J_{node.operand} @ {w}.T")
                row0 = dim(node.block * node.size) if node.block else "0"
                loop.append(f"_add_matrix(J_{node.name}, o_{node.param}, {node.param}.shape, {row0}, {dim(node.cols[0])}, {operand})")
        loop.append("cot = cotangent(t, {" + ", ".join(f'"{o}": {o}' for o in g.outputs) + "})")
        for o in g.outputs:
            loop.append(f'if "{o}" in cot:')
            loop.append(f'    G += np.einsum("kbn,bn->kb", J_{o}, cot["{o}"])')
        m.rtrl_grads = [(p.name, f"G[o_{p.name}:o_{p.name} + {p.name}.size].sum(axis=1).reshape({p.name}.shape)") for p in g.params]
        m.rtrl_grads.append(("x", "G[o_x:].reshape(T, n_in, B).transpose(0, 2, 1)"))
        m.rtrl_grads += [(f"{s.name}0", f"G[o_{s.name}0:o_{s.name}0 + {dim(s.size)}].T") for s in g.states]

    # -- loss ----------------------------------------------------------------------
    def loss(self) -> None:
        loss = self.g.loss
        if loss is None:
            return
        extra = sorted({s.name for s in loss.expr.free_symbols} - {loss.target, loss.target_of})
        if extra:
            raise InternalError(f"the loss of cell '{self.g.cell}' reads {extra}; only '{loss.target_of}' and the target are supported")
        table = {loss.target_of: "y", loss.target: "target"}
        self.m.loss_value = numpy_code(loss.expr, table)
        grad = dict(self.d.loss_partials)[loss.target_of]
        self.m.loss_grad = numpy_code(grad, table)
        self.m.loss_scale = "1.0 / T" if loss.reduction == "mean" else "1.0"
