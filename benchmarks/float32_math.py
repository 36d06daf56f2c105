#!/usr/bin/env python
"""The errors of the numba modules' float32 exp and tanh (generated/<cell>_numba.py's
``_exp_float32``, ``_tanh_float32``; float64: benchmarks/float64_math.py), over every float32.

    python benchmarks/float32_math.py [--stride N] [--write]

Every float32 bit pattern (``--stride N``: every N-th) is evaluated by the compiled
function and by NumPy in float64 (the reference); reported: the largest error in units in
the last place of the float32 reference (ulp) where the result is a normal float32, the
largest relative error of sigmoid = 1 / (1 + exp(-x)) as the kernels compute it, the
same for NumPy's own float32 np.exp / np.tanh (what the NumPy modules use), and the count
of wrong special values (NaN, inf, overflow to inf, underflow to 0).  ``--write`` replaces
this script's section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numba  # noqa: E402
import numpy as np  # noqa: E402

from generated import lstm_torch_numba as module  # noqa: E402  (a cell with both)

SECTION = "## float32 exp and tanh of the numba modules: benchmarks/float32_math.py"
TINY = float(np.finfo(np.float32).tiny)
BIG = float(np.finfo(np.float32).max)
_exp, _tanh = module._exp_float32, module._tanh_float32


@numba.njit(error_model="numpy")
def _apply(x, e, s, t):
    one = np.float32(1)
    for i in range(x.size):
        e[i] = _exp(x[i])
        s[i] = one / (one + _exp(-x[i]))
        t[i] = _tanh(x[i])


def _ulps(got, ref):
    """|got - ref| in ulps of ref as a float32, where ref is a normal float32 (else 0)."""
    normal = (np.abs(ref) >= TINY) & (np.abs(ref) <= BIG)
    spacing = np.spacing(np.abs(ref).astype(np.float32)).astype(np.float64)
    return np.where(normal, np.abs(got - ref) / np.where(normal, spacing, 1.0), 0.0)


def sweep(stride: int):
    worst = {}

    def keep(name, values, x):
        i = int(np.argmax(values))
        if values[i] > worst.get(name, (-1.0, 0.0))[0]:
            worst[name] = (float(values[i]), float(x[i]))

    wrong = 0
    chunk = 1 << 22
    with np.errstate(all="ignore"):
        for lo in range(0, 1 << 32, chunk * stride):
            x = np.arange(lo, min(lo + chunk * stride, 1 << 32), stride, dtype=np.uint64).astype(np.uint32).view(np.float32)
            e, s, t = np.empty_like(x), np.empty_like(x), np.empty_like(x)
            _apply(x, e, s, t)
            x64 = x.astype(np.float64)
            re, rt = np.exp(x64), np.tanh(x64)
            rs = 1.0 / (1.0 + np.exp(-x64))
            keep("exp (ulp)", _ulps(e, re), x)
            keep("tanh (ulp)", _ulps(t, rt), x)
            keep("np.exp float32 (ulp)", _ulps(np.exp(x).astype(np.float64), re), x)
            keep("np.tanh float32 (ulp)", _ulps(np.tanh(x).astype(np.float64), rt), x)
            normal_s = rs >= TINY
            keep("sigmoid (relative)", np.where(normal_s, np.abs(s - rs) / np.where(normal_s, rs, 1.0), 0.0), x)
            nan = np.isnan(x)
            wrong += int(np.sum(nan & ~(np.isnan(e) & np.isnan(t) & np.isnan(s))))
            wrong += int(np.sum((re > BIG) & ~nan & (e != np.inf)))  # overflow: inf
            wrong += int(np.sum((re < TINY) & ~nan & ((e < 0) | (e > TINY))))  # underflow: 0 (or the subnormal)
            wrong += int(np.sum(~nan & ((np.abs(t) > 1) | (s < 0) | (s > 1))))
    return worst, wrong


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--stride", type=int, default=1)
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    worst, wrong = sweep(args.stride)
    what = "every float32" if args.stride == 1 else f"every {args.stride}-th float32 bit pattern"
    lines = [SECTION, "",
             f"Over {what} ({time.perf_counter() - t0:.0f} s; NumPy {np.__version__}, numba {numba.__version__}); "
             "reference: NumPy in float64; ulp of the float32 reference, where it is a normal float32.", "",
             "| function | largest error | at x |", "| --- | --- | --- |"]
    lines += [f"| {name} | {err:.3g} | {x!r} |" for name, (err, x) in worst.items()]
    lines += ["", f"Wrong special values (NaN in -> NaN out, overflow -> inf, underflow -> 0, |tanh| <= 1, 0 <= sigmoid <= 1): {wrong}"]
    print("\n".join(lines))
    if args.write:
        path = ROOT / "benchmarks" / "RESULTS.md"
        text = path.read_text() if path.exists() else ""
        before, _, after = text.partition(SECTION)
        rest = after[after.find("\n## ") + 1:] if "\n## " in after else ""
        path.write_text(before.rstrip() + "\n\n" + "\n".join(lines) + "\n" + ("\n" + rest if rest else ""))


if __name__ == "__main__":
    main()
