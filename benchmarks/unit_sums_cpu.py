#!/usr/bin/env python
"""CPU micro-benchmark: the ways a generated NumPy module can sum over a short unit axis.

    OPENBLAS_NUM_THREADS=1 python benchmarks/unit_sums_cpu.py [--rounds N]

What symrnn.passes.unit_products and stack_blocks choose between, at the shapes of
layer_norm_lstm's benchmark (B=32 rows of 256 or 1024 units, and (T, B, 1024) with T=100),
float32 and float64: a sum over the units as ``np.sum(axis=-1)``, as a product with a new
column of ones, with a cached vector of ones (``_ones``), as ``np.vecdot`` with ones; the sum
of a product ``a * b`` formed then summed, against ``np.vecdot(a, b)``; and of a square.
Every variant runs in every round (the order rotating), a round's time the best of 5 repeats
of many calls; the table gives the median over the rounds of each variant's time and its ratio
to the first variant of its group (median of the per-round ratios, and their range).
"""

from __future__ import annotations

import argparse
import statistics
import timeit

import numpy as np

SHAPES = ((32, 256), (32, 1024), (100, 32, 1024))


def groups(a: np.ndarray, b: np.ndarray) -> dict[str, dict[str, object]]:
    n, dtype = a.shape[-1], a.dtype
    column, ones = np.ones((n, 1), dtype), np.ones(n, dtype)
    return {
        "sum of a": {
            "np.sum(axis=-1)": lambda: a.sum(axis=-1, keepdims=True),
            "a @ new ones column": lambda: a @ np.ones((n, 1), dtype),
            "a @ cached ones": lambda: (a @ ones)[..., None],
            "vecdot(a, ones)": lambda: np.vecdot(a, ones)[..., None],
        },
        "sum of a * b": {
            "(a * b) @ ones": lambda: (a * b) @ column,
            "vecdot(a, b)": lambda: np.vecdot(a, b)[..., None],
        },
        "sum of a**2": {
            "(a**2) @ ones": lambda: (a * a) @ column,
            "vecdot(a, a)": lambda: np.vecdot(a, a)[..., None],
        },
    }


def run(rounds: int) -> list[str]:
    rng = np.random.default_rng(0)
    rows = ["| dtype | shape | sum | form | us (median) | / first form (median, per-round range) |", "|---|---|---|---|---|---|"]
    for dtype in (np.float32, np.float64):
        for shape in SHAPES:
            a, b = (rng.standard_normal(shape).astype(dtype) for _ in range(2))
            number = 2000 if len(shape) == 2 else 20
            for group, forms in groups(a, b).items():
                names = list(forms)
                times = {k: [] for k in names}
                for r in range(rounds):
                    for k in names[r % len(names):] + names[:r % len(names)]:
                        times[k].append(min(timeit.repeat(forms[k], number=number, repeat=5)) / number)
                for k in names:
                    ratios = [x / y for x, y in zip(times[k], times[names[0]])]
                    rows.append(f"| {np.dtype(dtype).name} | {shape} | {group} | {k} | {1e6 * statistics.median(times[k]):.1f} "
                                f"| {statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f}) |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    args = parser.parse_args()
    print("\n".join(run(args.rounds)))


if __name__ == "__main__":
    main()
