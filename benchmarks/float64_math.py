#!/usr/bin/env python
"""The errors and the speed of the numba modules' float64 exp and tanh (generated/<cell>_numba.py's
``_exp_float64``, ``_tanh_float64``) against libm's (numba's np.exp, np.tanh) and NumPy's.

    python benchmarks/float64_math.py [--points N] [--rounds R] [--write]

Errors: on a seeded sample of ``4 N`` points per function (uniform over exp's whole range
-745..710 and over -30..30, -1..1, and x = +-2^-k u for k up to 60; tanh: -25..25, -2..2, the
switch of formula at |x| = 0.625, the same tiny x), in units in the last place of the exact
value (mpmath at 120 bits), where that is a normal float64; the same for NumPy's np.exp /
np.tanh (what the NumPy modules use); then the special values (0, -0, +-inf, NaN, overflow,
underflow, |x| beyond tanh's clamp).  Speed: nanoseconds per element of a compiled loop over
8192 normal samples (x ~ 3 N(0, 1)) calling the module's function or libm's, interleaved
rounds, medians, the ratio's per-round range.  ``--write`` replaces this script's section of
benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import mpmath  # noqa: E402  (SymPy's dependency)
import numba  # noqa: E402
import numpy as np  # noqa: E402

from generated import lstm_torch_numba as module  # noqa: E402  (a cell with both)

SECTION = "## float64 exp and tanh of the numba modules: benchmarks/float64_math.py"
_exp, _tanh = module._exp_float64, module._tanh_float64
TINY = float(np.finfo(np.float64).tiny)


@numba.njit(error_model="numpy")
def _apply(x, e, t):
    for i in range(x.size):
        e[i] = _exp(x[i])
        t[i] = _tanh(x[i])


@numba.njit(error_model="numpy")
def own_exp(x, out):
    for i in range(x.size):
        out[i] = _exp(x[i])


@numba.njit(error_model="numpy")
def libm_exp(x, out):
    for i in range(x.size):
        out[i] = np.exp(x[i])


@numba.njit(error_model="numpy")
def own_tanh(x, out):
    for i in range(x.size):
        out[i] = _tanh(x[i])


@numba.njit(error_model="numpy")
def libm_tanh(x, out):
    for i in range(x.size):
        out[i] = np.tanh(x[i])


@numba.njit(error_model="numpy")
def own_sigmoid(x, out):
    for i in range(x.size):
        out[i] = 1.0 / (1.0 + _exp(-x[i]))


@numba.njit(error_model="numpy")
def libm_sigmoid(x, out):
    for i in range(x.size):
        out[i] = 1.0 / (1.0 + np.exp(-x[i]))


def samples(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    tiny = np.ldexp(rng.uniform(-1, 1, n), -rng.integers(1, 61, n))
    return {"exp": np.concatenate([rng.uniform(-745, 710, n), rng.uniform(-30, 30, n), rng.uniform(-1, 1, n), tiny]),
            "tanh": np.concatenate([rng.uniform(-25, 25, n), rng.uniform(-2, 2, n),
                                    rng.uniform(0.6, 0.65, n) * rng.choice([-1.0, 1.0], n), tiny])}


def ulps(got: np.ndarray, x: np.ndarray, exact) -> np.ndarray:
    """|got - exact(x)| in ulps of the exact value, where that is a normal float64 (else 0)."""
    mpmath.mp.prec = 120
    out = np.zeros((len(got), x.size))
    for i, xi in enumerate(x):
        ref = exact(mpmath.mpf(float(xi)))
        r = abs(float(ref))
        if TINY <= r <= np.finfo(np.float64).max:
            for j, g in enumerate(got):
                out[j, i] = float(abs(mpmath.mpf(float(g[i])) - ref)) / float(np.spacing(r))
    return out


def errors(n: int) -> list[str]:
    lines = ["| function | largest error (ulp) | at x | mean (ulp) | NumPy's, largest (ulp) |", "| --- | --- | --- | --- | --- |"]
    for name, x in samples(n).items():
        e, t = np.empty_like(x), np.empty_like(x)
        _apply(x, e, t)
        with np.errstate(all="ignore"):
            theirs = np.exp(x) if name == "exp" else np.tanh(x)
        ours, numpys = ulps([e if name == "exp" else t, theirs], x, mpmath.exp if name == "exp" else mpmath.tanh)
        i = int(np.argmax(ours))
        lines.append(f"| {name} | {ours[i]:.3g} | {float(x[i])!r} | {ours.mean():.3g} | {numpys.max():.3g} |")
        print(lines[-1], flush=True)
    return lines


def specials() -> tuple[int, int]:
    """(wrong special values, values checked)."""
    x = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 709.78, 709.79, 1000.0, -708.39, -708.4, -745.2, -1000.0,
                  5e-324, -5e-324, 1e-300, 22.0, -22.0, 30.0, -30.0, 1e308, -1e308])
    e, t = np.empty_like(x), np.empty_like(x)
    _apply(x, e, t)
    with np.errstate(all="ignore"):
        want_e, want_t = np.exp(x), np.tanh(x)
    want_e = np.where(want_e < TINY, 0.0, want_e)  # below -708.4: 0, not the subnormal value
    wrong = 0
    for got, want in ((e, want_e), (t, want_t)):
        same = (np.isnan(got) & np.isnan(want)) | ((got == want) & (np.signbit(got) == np.signbit(want)))
        close = np.isfinite(want) & (np.abs(got - want) <= 2 * np.spacing(np.abs(want)))
        wrong += int(np.sum(~(same | (close & ~np.isin(x, [0.0])))))
    return wrong, 2 * x.size


def speed(rounds: int) -> list[str]:
    x = 3 * np.random.default_rng(1).standard_normal(8192)
    out = np.empty_like(x)
    pairs = {"exp": (own_exp, libm_exp), "tanh": (own_tanh, libm_tanh), "sigmoid 1/(1+exp(-x))": (own_sigmoid, libm_sigmoid)}
    lines = ["| function | module's ns/element | libm's ns/element | module / libm |", "| --- | --- | --- | --- |"]
    for name, (own, libm) in pairs.items():
        own(x, out)
        libm(x, out)
        s = {"own": [], "libm": []}
        for r in range(rounds):
            for tag, f in ((("own", own), ("libm", libm)) if r % 2 == 0 else (("libm", libm), ("own", own))):
                t0 = time.perf_counter()
                for _ in range(100):
                    f(x, out)
                s[tag].append((time.perf_counter() - t0) / 100 / x.size * 1e9)
        ratios = sorted(a / b for a, b in zip(s["own"], s["libm"]))
        lines.append(f"| {name} | {statistics.median(s['own']):.2f} | {statistics.median(s['libm']):.2f} | "
                     f"{statistics.median(ratios):.2f} ({ratios[0]:.2f}-{ratios[-1]:.2f}) |")
        print(lines[-1], flush=True)
    return lines


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--points", type=int, default=300_000, help="points per sampled range (4 ranges per function)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args(argv)
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    err = errors(args.points)
    wrong, checked = specials()
    took = time.perf_counter() - t0
    lines = [SECTION, "",
             f"{cpu_model()}, Python {platform.python_version()}, NumPy {np.__version__}, numba {numba.__version__}, "
             f"mpmath {mpmath.__version__}; load average at the start {load:.1f}.", "",
             f"Errors on {4 * args.points} seeded points per function ({took:.0f} s); exact values: mpmath at 120 bits; "
             "ulp of the exact value, where it is a normal float64:", "", *err, "",
             f"Wrong special values (0 and -0, +-inf, NaN, overflow to inf, underflow to 0 below -708.4, "
             f"tanh beyond its clamp; within 2 ulp of NumPy's elsewhere): {wrong} of {checked}.", "",
             f"Speed ({args.rounds} interleaved rounds, medians, ratio min-max; a compiled loop over 8192 float64, "
             "x ~ 3 N(0, 1)):", "", *speed(args.rounds)]
    print("\n".join(lines))
    if args.write:
        path = ROOT / "benchmarks" / "RESULTS.md"
        text = path.read_text() if path.exists() else ""
        before, _, after = text.partition(SECTION)
        rest = after[after.find("\n## ") + 1:] if "\n## " in after else ""
        path.write_text(before.rstrip() + "\n\n" + "\n".join(lines) + "\n" + ("\n" + rest if rest else ""))


if __name__ == "__main__":
    main()
