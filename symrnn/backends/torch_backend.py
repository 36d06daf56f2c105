"""The torch backend's data: what the adapter module (templates/torch_module.py.j2) needs
to know about the cell, computed from the step graph.

The torch module is an adapter, not a kernel: its forward and backward call the cell's
generated NumPy module (CPU tensors) or CuPy module (CUDA tensors).  Here:

* the parameters in the kernels' order and torch's name of each (``weight_ih_l0`` ->
  ``weight_ih``: the module registers ``weight_ih_l1_reverse`` and so on);
* which parameters are biases (:func:`bias_params`), left out by ``RNN(bias=False)``;
* how each parameter is drawn (the cell's declared init, else torch's
  uniform(-1/sqrt(hidden_size), 1/sqrt(hidden_size)));
* the outputs' sizes, and the output one layer passes to the next.

``symrnn.render.render_torch`` puts it in the template.
"""

from __future__ import annotations

import sympy

from ..errors import InternalError
from ..init import _code, _tree
from ..ir import MatVecNode, Pointwise, StepGraph
from ..plan import KernelPlan
from .python_printer import dim

__all__ = ["torch_fields", "bias_params", "torch_names", "TORCH_EQUIVALENTS"]

#: built-in cells that are torch's own cells: their RNN is interchangeable with this torch module
TORCH_EQUIVALENTS = {
    "rnn_tanh_torch": "torch.nn.RNN",
    "lstm_torch": "torch.nn.LSTM",
    "gru_torch": "torch.nn.GRU",
}

#: the characters an init's argument may hold once printed (numbers, dimensions, np.sqrt, operators)
_INIT_CODE = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_ .+-*/()")


def torch_fields(kernel_plan: KernelPlan) -> dict:
    """The template's variables that come from the cell (besides its header)."""
    g = kernel_plan.graph
    names = torch_names(g)
    biases = set(bias_params(g))
    sizes = {s.name: dim(s.size) for s in g.states}
    sizes.update({name: dim(g.size(name)) for name in g.readouts})
    return dict(
        params=[(p.name, names[p.name]) for p in g.params],
        biases=[p.name for p in g.params if p.name in biases],
        inits=_inits(g),
        uses_default_init=any(p.init is None for p in g.params),
        states=[s.name for s in g.states],
        outputs=list(g.outputs),
        readouts=list(g.readouts),
        layer_output=g.readouts[0] if g.readouts else g.states[0].name,
        sizes=[(name, sizes[name]) for name in g.outputs],
        equivalent=TORCH_EQUIVALENTS.get(g.cell),
        state_args=", ".join(f"{s.name}0" for s in g.states),
        param_args=", ".join(p.name for p in g.params),
        output_doc=", ".join(g.outputs),
        final_doc=", ".join(f"{s.name}_n" for s in g.states),
        hx_doc=_hx_doc(g),
    )


def torch_names(g: StepGraph) -> dict[str, str]:
    """Kernel parameter name -> torch's name without the layer and direction suffix.

    Where every name ends in ``_l0`` (the cells in torch's convention) that suffix is
    dropped, else the names are kept; RNN appends ``_l{layer}`` (and ``_reverse``), so
    a name of any layer and direction reads back to one parameter of one layer."""
    names = [p.name for p in g.params]
    if names and all(n.endswith("_l0") and len(n) > 3 for n in names):
        return {n: n[:-3] for n in names}
    return {n: n for n in names}


def bias_params(g: StepGraph) -> tuple[str, ...]:
    """The parameters that are biases: vectors or scalars that every expression using them
    adds, either alone (coefficient 1) or with the coefficient of one of its matrix-vector
    products (``W @ v + b``; GRU's ``r * (W_hn @ h + b_hn)``).  A diagonal weight
    (``u * h_prev``), a peephole (``p * c``) or a scalar weight (``w * x``) is not one.

    >>> from symrnn.pipeline import build
    >>> bias_params(build("gru_torch").graph)
    ('bias_ih_l0', 'bias_hh_l0')
    >>> bias_params(build("indrnn").graph)
    ('b',)
    """
    products = {n.name for n in g.nodes if isinstance(n, MatVecNode)}
    uses: dict[str, list[bool]] = {}
    for node in g.nodes:
        if not isinstance(node, Pointwise):
            continue
        arg = node.expr.args[0] if node.op is not None else node.expr
        for sym in sorted(arg.free_symbols, key=lambda s: s.name):
            if not g.is_leaf(sym.name) or g.leaf(sym.name).kind != "param":
                continue
            coeff = sympy.diff(arg, sym)
            added = sympy.diff(coeff, sym) == 0 and (
                coeff == 1 or any(sympy.simplify(coeff - sympy.diff(arg, m)) == 0
                                  for m in arg.free_symbols if m.name in products))
            uses.setdefault(g.leaf(sym.name).param, []).append(bool(added))
    return tuple(p.name for p in g.params if len(p.shape) < 2 and uses.get(p.name) and all(uses[p.name]))


def _inits(g: StepGraph) -> list[tuple[str, str, list[str]]]:
    """(parameter, init kind, argument code in n_in, n_hidden, n_out) for every declared init."""
    out = []
    for p in g.params:
        if p.init is None:
            continue
        args = [_code(_tree(a)) for a in p.init.args]
        for a in args:  # printed into code: numbers, dimensions, np.sqrt and operators only
            if not set(a) <= _INIT_CODE:
                raise InternalError(f"init argument {a!r} holds a character it cannot hold")
        out.append((p.name, p.init.kind, args))
    return out


def _hx_doc(g: StepGraph) -> str:
    states = [f"{s.name}_0" for s in g.states]
    return states[0] if len(states) == 1 else "(" + ", ".join(states) + ")"
