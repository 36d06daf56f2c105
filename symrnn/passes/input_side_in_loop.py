"""The input side's adjoints in backward's loop (NumPy): computed step by step, in cache, not after it.

The plan puts what depends on the input side only after backward's loop, over every step at once:
a layer norm of the input projection has its adjoint's last terms there (``d_var_x = -0.5 *
d_rstd_x_seq * ...``, ``d_x_proj_seq += d_mean_wx + 2 * d_msd_x * x_proj_seq``), passes over
(T, B, 4n) arrays that do not fit in cache and allocate temporaries of that size at every call.
The loop has the step's values at hand: this pass moves the statements at the start of
``backward_pre`` that are elementwise over the steps to the end of the loop's body, each reading
step t (``d_rstd_x_seq[t]``, ``x_proj_seq[t]``) where it read every step.

It moves a statement only where that computes the same values: its value is an elementwise
expression (or another name) of arrays over the steps (forward's, whose first axis is the step,
or backward's), of names an earlier moved statement binds, of the parameters and numbers; an array
it reads is written in backward's loop only at step t (by any of its names), and after the loop
not at all; an array it adds into (``d_x_proj_seq += ...``) is read and written in the loop only at
step t; the names it binds are no name of the loop's, and no statement left after the loop reads
them.  The first statement that cannot move, and every one after it, stays.  Measured
(layer_norm_lstm, interleaved with the module before, 30 rounds, float32, the same bits): 0.97x
backward's time (0.98x forward + backward) at T=100, B=32, H=256; 1.00x at T=50, B=16, H=32.
"""

from __future__ import annotations

import dataclasses

import sympy

from ..stmt import Assign, Call, Do, Elementwise, Helper, OpCall, Ref, Reshape, Size, Text, Update, refs_read, t_SYM
from .stack_blocks import _UNIT_REDUCTIONS

__all__ = ["input_side_in_loop"]

_ALLOCATIONS = frozenset({"empty", "zeros"})


def _leads_with_steps(shape) -> bool:
    """Whether an allocation's shape tuple starts with T."""
    if not isinstance(shape, tuple) or not shape:
        return False
    first = shape[0]
    if isinstance(first, Text):
        return first.text == "T"
    if isinstance(first, Size):
        return sympy.sympify(first.expr) == sympy.Symbol("T")
    return first == sympy.Symbol("T")


def _step_arrays(m, params: frozenset[str]) -> set[str]:
    """The names of arrays whose first axis is the step: allocated (T, ...), the input side's
    products over every step, the seeds, and what forward computes from those elementwise or by a
    reduction over the units."""
    steps: set[str] = set()
    for s in [*m.forward_pre, *m.forward_alloc, *m.backward_seed]:
        if not (isinstance(s, Assign) and isinstance(s.dst, Ref) and not s.dst.index):
            continue
        v, name = s.value, s.dst.name
        if isinstance(v, Call) and v.func in _ALLOCATIONS and v.args and _leads_with_steps(v.args[0]):
            steps.add(name)
        elif isinstance(v, Reshape) and v.steps and not v.T:
            steps.add(name)
        elif isinstance(v, Helper) and v.func == "_seed" and len(v.args) >= 3 and _leads_with_steps(v.args[2]):
            steps.add(name)
        elif isinstance(v, Helper) and v.func in _UNIT_REDUCTIONS and all(_over_steps(a, steps, params) for a in v.args):
            steps.add(name)
        elif isinstance(v, Elementwise) and _over_steps(v, steps, params) and _reads_steps(v, steps):
            steps.add(name)
    return steps


def _over_steps(v, steps: set[str], params: frozenset[str], local: frozenset[str] = frozenset()) -> bool:
    """Whether ``v`` is elementwise over arrays over the steps read whole (``steps``), ``local``
    names, parameters and numbers."""
    if isinstance(v, Ref):
        return not v.index and not v.T and (v.name in steps or v.name in local)
    if not isinstance(v, Elementwise):
        return False
    refs = dict(v.refs)
    for s in v.expr.free_symbols:
        if s.name in refs:
            ref = refs[s.name]
            if not (isinstance(ref, Ref) and not ref.index and not ref.T
                    and (ref.name in steps or ref.name in local or ref.name in params)):
                return False
        elif s.name not in steps and s.name not in local and s.name not in params:
            return False
    return True


def _reads_steps(v: Elementwise, steps: set[str]) -> bool:
    refs = dict(v.refs)
    return any((refs[s.name].name if s.name in refs else s.name) in steps for s in v.expr.free_symbols)


def _at_step(v, steps: set[str]):
    """``v`` reading step t of each array over the steps it reads whole."""
    if isinstance(v, Ref):
        return Ref(v.name, (t_SYM,)) if v.name in steps else v
    refs = []
    for s in sorted(v.expr.free_symbols, key=lambda s: s.name):
        ref = dict(v.refs).get(s.name)
        if ref is not None:
            refs.append((s.name, Ref(ref.name, (t_SYM,)) if ref.name in steps else ref))
        elif s.name in steps:
            refs.append((s.name, Ref(s.name, (t_SYM,))))
    return Elementwise(v.expr, tuple(refs))


def _names_of(m, arrays: set[str]) -> set[str]:
    """``arrays`` and every name backward binds to a part of one of them."""
    names = set(arrays)
    grew = True
    while grew:
        grew = False
        for s in [*m.backward_seed, *m.backward_carry, *m.backward_post, *m.backward_coefs, *m.backward_loop]:
            if (isinstance(s, Assign) and isinstance(s.dst, Ref) and not s.dst.index and isinstance(s.value, Ref)
                    and s.value.name in names and s.dst.name not in names):
                names.add(s.dst.name)
                grew = True
    return names


def _touches(s):
    """(the refs statement ``s`` writes, every ref it reads) as Refs (a name in an expression as a ref)."""
    written = []
    if isinstance(s, (Assign, Update)):
        written = list(s.dst) if isinstance(s.dst, tuple) else [s.dst]
    elif isinstance(s, (Do, OpCall)):
        out = s.out
        written = [out] if out is not None else []
    read = refs_read(s)
    if isinstance(s, Update):
        read.append(s.dst)
    return written, read


def _only_at_step(refs, names: set[str]) -> bool:
    return all(r.index and r.index[0] == t_SYM for r in refs if r.name in names)


def input_side_in_loop(m, params: frozenset[str]) -> None:
    """Move the statements at the start of the NumPy module ``m``'s ``backward_pre`` that are
    elementwise over the steps into the end of its backward loop (the module docstring);
    ``params``: the names the parameters (and their blocks) are bound to."""
    if not m.backward_loop or not m.backward_pre:
        return
    steps = _step_arrays(m, params)
    loop_names = set().union(*(s.writes | s.reads for s in m.backward_loop))
    loop_touches = [_touches(s) for s in m.backward_loop]
    between = [*m.backward_after]
    moved, local = [], set()
    for s in m.backward_pre:
        if isinstance(s, Assign) and isinstance(s.dst, Ref) and not s.dst.index:
            target = None
        elif isinstance(s, Update) and s.op == "+" and isinstance(s.dst, Ref) and not s.dst.index and s.dst.name in steps:
            target = s.dst.name
        else:
            break
        if not _over_steps(s.value, steps, params, frozenset(local)):
            break
        read_arrays = {r.name for r in _touches(s)[1] if r.name in steps}
        names = _names_of(m, read_arrays | ({target} if target else set()))
        if any(_touches(b)[0] and {r.name for r in _touches(b)[0]} & names for b in between):
            break  # written after the loop
        if not all(_only_at_step(written, names) for written, _ in loop_touches):
            break  # the loop writes an array it reads at another step than t
        if target and not all(_only_at_step(read, _names_of(m, {target})) for _, read in loop_touches):
            break  # the loop reads the array it adds into at another step
        if target is None and (s.dst.name in loop_names or s.dst.name in steps):
            break
        moved.append(dataclasses.replace(s, dst=Ref(target, (t_SYM,)) if target else s.dst,
                                         value=_at_step(s.value, steps)))
        if target is None:
            local.add(s.dst.name)
    rest = m.backward_pre[len(moved):]
    later = [*rest, *m.backward_weights]
    if not moved or any(local & s.reads for s in later):
        return
    m.backward_loop = [*m.backward_loop, *moved]
    m.backward_pre = rest
