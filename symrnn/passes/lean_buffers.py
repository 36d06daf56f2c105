"""Backward allocates no more than it writes.

* A weight's gradient GEMM that is the only write to that gradient writes into it
  (``np.matmul(a, b, out=d_W)``), and the gradient is allocated empty, not zeroed.
* A seed (an output's adjoint from the caller) nothing writes into is the caller's
  array itself, read only (zeros where the caller gives none): ``_seed(..., writable=False)``.
* When the first statement that touches d_x is a GEMM over every step adding into
  it, that GEMM writes into d_x (no zero fill, no temporary).
"""

from __future__ import annotations

from dataclasses import replace

from ..stmt import Assign, Call, Do, Helper, MatMul, Ref, Reshape, Size, Text, Update

__all__ = ["lean_buffers"]


def _gemm_into(dst: Ref, product: MatMul, comment: str = "") -> Do:
    return Do(Call("matmul", (product.a, product.b), (("out", dst),)), dst, comment)


def _replace_seed(seeds: list, name: str, value) -> None:
    for i, s in enumerate(seeds):
        if isinstance(s, Assign) and s.dst == Ref(name):
            seeds[i] = replace(s, value=value)
            return


def lean_buffers(m, grad_of: dict[str, str], d_x: str) -> None:
    """Rewrite the backward sections of module ``m`` in place; ``grad_of``: a gradient's
    name -> the name its parameter is bound to; ``d_x``: the name of the input's adjoint."""
    later = [*m.backward_post, *m.backward_coefs, *m.backward_loop, *m.backward_after, *m.backward_pre, *m.backward_weights]
    writes: dict[str, int] = {}
    for s in later:
        for name in s.writes:
            writes[name] = writes.get(name, 0) + 1
    for i, s in enumerate(m.backward_weights):
        if (isinstance(s, Update) and s.op == "+" and not s.dst.index and s.dst.name in grad_of
                and isinstance(s.value, MatMul) and writes[s.dst.name] == 1):
            m.backward_weights[i] = _gemm_into(s.dst, s.value, s.comment)
            _replace_seed(m.backward_seed, s.dst.name, Call("empty_like", (Ref(grad_of[s.dst.name]),)))
    for i, s in enumerate(m.backward_seed):
        if isinstance(s.value, Helper) and s.value.func == "_seed" and s.dst.name not in writes:
            m.backward_seed[i] = replace(s, value=replace(s.value, kwargs=(("writable", Text("False")),)))
    for body in (m.backward_post, m.backward_coefs, m.backward_loop, m.backward_after, m.backward_pre):
        for i, s in enumerate(body):
            if d_x not in s.reads | s.writes:
                continue
            if (isinstance(s, Update) and s.op == "+" and s.dst == Ref(d_x) and isinstance(s.value, Reshape)
                    and s.value.steps and isinstance(s.value.value, MatMul)):
                product, cols = s.value.value, s.value.cols
                body[i] = Do(Call("matmul", (product.a, product.b), (("out", Reshape(s.dst, cols)),)), s.dst)
                _replace_seed(m.backward_seed, d_x, Call("empty", ((Text("T"), Text("B"), Size(cols)), Text("dtype"))))
            return
