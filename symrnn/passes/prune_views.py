"""Views of the input side's products that nothing reads are not made.

Folding biases into the input-side GEMM's buffer (symrnn.passes.loop_fusion) leaves
some ``name = buffer[..., a:b]`` views unread by forward, its outputs and its cache.
"""

from __future__ import annotations

from ..stmt import ETC, Assign, Ref

__all__ = ["without_unread_views"]


def without_unread_views(pre: list, later: list, kept: set[str]) -> list:
    """The input side without the views of its products that folding left unread (a view is
    ``name = buffer[..., a:b]``, read by nothing else of forward, its outputs or its cache)."""
    def is_view(s) -> bool:
        return isinstance(s, Assign) and isinstance(s.value, Ref) and s.value.index[:1] == (ETC,) and not s.dst.index

    read = set(kept)
    for s in [*later, *(s for s in pre if not is_view(s))]:
        read |= s.reads
    return [s for s in pre if not is_view(s) or s.dst.name in read]
