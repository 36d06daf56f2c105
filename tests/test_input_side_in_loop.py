"""The input_side_in_loop pass (symrnn/passes/input_side_in_loop.py): the statements it moves into
backward's loop compute what they computed after it, and it refuses what would not."""

from __future__ import annotations

import numpy as np
import pytest
import sympy

from symrnn.backends.numpy_backend import NumpyModule
from symrnn.gradcheck import random_problem
from symrnn.passes import ALL
from symrnn.passes.input_side_in_loop import input_side_in_loop
from symrnn.pipeline import load_module, render_numpy
from symrnn.stmt import Assign, Call, Do, Elementwise, Ref, Text, Update, t_SYM

from test_centred_in_place import _plan
from test_stack_blocks import value_differences

#: cell -> whether the pass moves statements of its module (ln_in adds its input-side adjoint into a
#: new array that the input side's GEMM reads after the loop: not moved)
CELLS = {"layer_norm_lstm": True, "haste_ln_gru": True, "ln_gru": False, "ln_in": False, "lstm": False}


@pytest.mark.parametrize("name", CELLS)
@pytest.mark.parametrize("mode", ["all steps", "lengths", "lengths reversed"])
def test_moved_statements_compute_the_same_values(name, mode):
    plan = _plan(name)
    on_source, off_source = render_numpy(plan, passes=ALL), render_numpy(plan, passes=ALL - {"input_side_in_loop"})
    assert (on_source != off_source) == CELLS[name]
    on, off = load_module(on_source, f"{name}_in_loop"), load_module(off_source, f"{name}_after_loop")
    pr = random_problem(on, T=6, B=4, seed=7)
    kw = {} if mode == "all steps" else {"lengths": np.array([6, 2, 0, 5]), "reverse": mode == "lengths reversed"}
    bad = value_differences(on, off, pr, **kw)
    assert not bad, (name, bad)


def _ew(expr, **refs):
    return Elementwise(sympy.sympify(expr), tuple(sorted(refs.items())))


def _module(loop_write=t_SYM, loop_read_of_target=None, later_reads_local=False):
    """A backward with an array over the steps dX the loop writes (at step ``loop_write``), and after
    the loop ``y = 2 dX`` then ``dA += y`` (dA read by a GEMM after), as the emitter lays them out."""
    zeros = Call("zeros", ((Text("T"), Text("B"), Text("n_hidden")), Text("dtype")))
    m = NumpyModule()
    m.backward_seed = [Assign(Ref("dX"), zeros), Assign(Ref("dA"), zeros)]
    m.backward_loop = [Assign(Ref("dX", (loop_write,)), _ew("d"))]
    if loop_read_of_target is not None:
        m.backward_loop.append(Assign(Ref("e"), _ew("2*a", a=Ref("dA", (loop_read_of_target,)))))
    m.backward_pre = [Assign(Ref("y"), _ew("2*x", x=Ref("dX"))), Update(Ref("dA"), "+", _ew("y"))]
    later = [Ref("y")] if later_reads_local else [Ref("dA")]
    m.backward_pre.append(Do(Call("matmul", (*later, Ref("W")))))
    return m


def test_an_elementwise_statement_moves_to_the_loops_end_at_step_t():
    m = _module()
    input_side_in_loop(m, frozenset({"W"}))
    assert m.backward_loop[-2:] == [Assign(Ref("y"), _ew("2*x", x=Ref("dX", (t_SYM,)))),
                                    Update(Ref("dA", (t_SYM,)), "+", _ew("y"))]
    assert len(m.backward_pre) == 1 and isinstance(m.backward_pre[0], Do)


@pytest.mark.parametrize("kw", [
    {"loop_write": t_SYM - 1},  # the loop writes dX at another step: dX[t] is not final at step t
    {"loop_read_of_target": t_SYM + 1},  # the loop reads dA at another step: it would see the adds
    {"later_reads_local": True},  # a statement left after the loop reads y over every step
])
def test_what_would_change_values_is_not_moved(kw):
    m = _module(**kw)
    before = (list(m.backward_loop), list(m.backward_pre))
    input_side_in_loop(m, frozenset({"W"}))
    assert (m.backward_loop, m.backward_pre) == before
