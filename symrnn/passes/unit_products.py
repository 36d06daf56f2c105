"""Sums over a short axis as products with a vector of ones (BLAS), in the NumPy module.

``np.mean(a, axis=-1, keepdims=True)`` and ``np.sum`` over the units of a (B, n) array
run NumPy's pairwise reduction row by row, several times slower than the same sums
as one matrix-vector product ``a @ ones((n, 1))`` (measured at B=32, n=256 float32:
np.mean 7.0 us, the product 2.5 us; benchmarks/RESULTS.md, layer-norm section).  With
the ``unit_products`` pass the module computes, through its own helpers:

* a reduction ``mean(a)`` or ``sum(a)`` of a value (forward): ``_mean_units(a)``,
  ``_sum_units(a)``;
* the sum over units of a reduction's adjoint (backward): ``_sum_units(d_r)``;
* a parameter's per-step gradient summed over the batch rows in the loop:
  ``_sum_rows(d)`` (``ones((B,)) @ d``).

logsumexp keeps its own stable spelling.  The products accumulate in the array's
dtype as the sums do; the values agree to rounding (tests/test_passes.py: the same
values with the pass off).  The vectors of ones are made once per size and dtype
(``_ones``, read-only; a new one each call cost 1.3-2 us of a 3-5 us sum).

After block stacking (symrnn.passes.stack_blocks, which proves the shapes it needs), a sum
over the units of a product of two arrays of that width, or of a square, takes the two as
its arguments, ``_mean_units(a, b)``: ``np.vecdot`` reads them once and forms no product
(measured at B=32 and 1024 units, float32: 4.3 us against 7.8 us for the product and its sum;
a square 3.4 against 6.6 us; over (100, 32, 1024) 0.26 ms against 1.45 ms); and a sum over the
rows of a product with a (B, 1) column w is ``_sum_rows_by(a, w)``, a product with w.
"""

from __future__ import annotations

from ..reductions import Reduce, mean, sum_units

__all__ = ["HELPERS", "ROWS", "UNITS", "WEIGHTED_ROWS", "helpers_used"]

#: reduction over the units -> the module's helper computing it as a product
UNITS: dict[type[Reduce], str] = {mean: "_mean_units", sum_units: "_sum_units"}
#: the helper summing a (B, n) array over its rows, and the one summing them weighted by a (B, 1) column
ROWS, WEIGHTED_ROWS = "_sum_rows", "_sum_rows_by"
#: every helper this pass (and stack_blocks's weighted row sums) may use, in the order the template defines them
HELPERS = ("_ones", UNITS[sum_units], UNITS[mean], ROWS, WEIGHTED_ROWS)
#: helper -> the helpers it calls (the template defines them too)
CALLS = {UNITS[mean]: (UNITS[sum_units], "_ones"), UNITS[sum_units]: ("_ones",), ROWS: ("_ones",)}


def helpers_used(read: set[str]) -> tuple[str, ...]:
    """The helpers a module whose statements read the names ``read`` must define."""
    used = {h for h in HELPERS if h in read}
    used |= {dep for h in used for dep in CALLS.get(h, ())}
    return tuple(h for h in HELPERS if h in used)
