"""Optimisations of the generated NumPy module, one a file, each possible to switch off.

Each rewrites what a module computes into something cheaper that computes the same
values, deciding from the step graph, the plan and what statements read and write
(symrnn.stmt), never from emitted text:

* ``fusion`` (loop_fusion.py): a step's recurrent GEMM and its consumers as one fused
  step (biases folded into the input side, the input side added in one operation,
  gates activated in place where the GEMM wrote them; a GEMM whose products are all
  stored written into their stored buffer);
* ``in_place`` (the NumPy backend): a value or an adjoint that has a stored buffer is
  computed straight into it (``out=``, or an op's in-place calls: sigmoid's four) instead of
  into a temporary that is copied; an input-side GEMM's output adjoints, when the loop adds
  into all of them, share the one buffer the adjoint GEMM reads (no concatenation);
* ``hoist_coefficients`` (hoist_coefficients.py): the coefficients of the backward
  recursion computed for a block of steps before the loop over them;
* ``lean_buffers`` (lean_buffers.py): backward allocates no more than it writes;
* ``prune_views`` (prune_views.py): views nothing reads are not made;
* ``shared_unit_sums`` (unit_sums.py): reductions whose adjoints are one value sum it
  over the units once, and terms reading two names of one adjoint combine;
* ``zero_unit_sums`` (unit_sums.py): the terms of a uniform value's adjoint (a mean's,
  a variance's) whose sum over units is zero by the reductions' definitions are left out;
* ``compact_unit_adjoints`` (the NumPy backward): the adjoint of a value the same at every
  unit (a layer norm's mean, variance, inverse standard deviation) is computed as its mean
  over the units, one value per row, and passed on as that (a reduction's share n times
  it), instead of a full-width array summed over the units again;
* ``unit_products`` (unit_products.py): sums and means over the units, and parameters'
  sums over the batch rows in the loop, as products with a vector of ones (BLAS), one made
  per size and dtype;
* ``shared_temporaries`` (the NumPy backward): a subexpression of forward values that one
  stage of a region computed (sympy.cse's temporary) is read, not computed again, by the
  stages after it in that region (a layer norm's centred ``rh - mu``);
* ``stack_blocks`` (stack_blocks.py): the K statements that are one computation on the K blocks
  of a stacked array (a cell written by gates: ``d_tmp6 = d_tmp5*gamma_r_1`` ... for each gate)
  become one statement on the stacked array, and K reductions of its blocks that one sum reads one
  reduction of the stacked array; what it stacked is then computed where it goes (``out=``), and
  a sum over the units of a product of two arrays reads the two (np.vecdot), a sum over the rows
  of a product with a row's value is that sum weighted;
* ``centred_in_place`` (centred_in_place.py): an array that forward writes once and everything after
  reads only centred, ``S - M`` (a layer norm's projection less its mean), is centred in place
  (``S -= M``) and read as it is;
* ``input_side_in_loop`` (input_side_in_loop.py): the input side's adjoint statements after backward's
  loop that are elementwise over the steps computed step by step at the end of the loop's body.

``symrnn.pipeline.render_numpy(plan, passes=...)`` takes the set to run (default: all);
tests/test_passes.py checks that every module computes the same values with any one
of them off, and that each does what it says.
"""

PASSES = ("fusion", "in_place", "hoist_coefficients", "lean_buffers", "prune_views", "shared_unit_sums", "zero_unit_sums",
          "compact_unit_adjoints", "unit_products", "shared_temporaries", "stack_blocks", "centred_in_place",
          "input_side_in_loop")
ALL = frozenset(PASSES)

__all__ = ["ALL", "PASSES", "check"]


def check(passes) -> frozenset[str]:
    """``passes`` as a frozenset, every name a known pass (ValueError naming one that is not)."""
    passes = frozenset(passes)
    unknown = sorted(passes - ALL)
    if unknown:
        raise ValueError(f"unknown pass '{unknown[0]}'; the passes are {', '.join(PASSES)}")
    return passes
