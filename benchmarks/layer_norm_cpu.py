#!/usr/bin/env python
"""CPU benchmark: the layer-normalized LSTM's generated NumPy module against the plain LSTM's.

    OPENBLAS_NUM_THREADS=1 python benchmarks/layer_norm_cpu.py [--rounds N] [--quick] [--write]

Times one forward + backward (every gradient; grad_outputs {"h": ones}) of
``generated.layer_norm_lstm_numpy`` (haste's LayerNormLSTM: layer norm of W x, R h and c,
with gains and biases; symrnn/specs/layer_norm_lstm.toml) and of ``generated.lstm_numpy``
(the same gates, no normalization) at T=100, B=32, I=H=256 (n_out=1), float32 and float64.
All run in every round, the order rotating from round to round; a round's time of a module is the median of
``--reps`` calls; the first round is a warm-up and is discarded.  The table gives the median
over the rounds, the per-round range, and the ratio layer_norm_lstm / lstm (the median of
the per-round ratios, and their range): ratios within one interleaved run are what count on a
shared machine.  Target (issue 15): ratio <= 1.3 in float32.

``--write`` replaces this script's section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import numpy as np  # noqa: E402

import rnn_cpu  # noqa: E402  (machine_info, settle)

RESULTS = ROOT / "benchmarks" / "RESULTS.md"
BEGIN, END = "<!-- layer-norm-cpu:begin -->", "<!-- layer-norm-cpu:end -->"
CELLS = ("lstm", "layer_norm_lstm", "layer_norm_lstm_nohoist")
#: a variant rendered here, not committed: the layer-normalized LSTM without the hoist_coefficients pass
NOHOIST = "layer_norm_lstm_nohoist"
SIZE = (100, 32, 256, 256)  # T, B, I, H
TARGET = 1.3


def load(cell: str):
    if cell != NOHOIST:
        return importlib.import_module(f"generated.{cell}_numpy")
    from symrnn.passes import ALL
    from symrnn.pipeline import build, load_module
    from symrnn.render import render_numpy

    return load_module(render_numpy(build("layer_norm_lstm"), passes=ALL - {"hoist_coefficients"}), NOHOIST)


def make_step(cell: str, dtype, size=SIZE):
    module = load(cell)
    T, B, I, H = size
    params = module.init_params(I, H, 1, seed=0, dtype=dtype)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((T, B, I)).astype(dtype)
    state0 = {s: (0.1 * rng.standard_normal((B, H))).astype(dtype) for s in module.STATES}
    grad_outputs = {"h": np.ones((T, B, H), dtype)}

    def step() -> float:
        t0 = time.perf_counter()
        _, cache = module.forward(params, x, state0)
        module.backward(params, cache, grad_outputs)
        return time.perf_counter() - t0

    return step


def run(dtype_name: str, rounds: int, reps: int, size=SIZE) -> dict:
    dtype = np.dtype(dtype_name).type
    steps = {cell: make_step(cell, dtype, size) for cell in CELLS}
    per_round: dict[str, list[float]] = {cell: [] for cell in CELLS}
    gc.disable()
    try:
        for r in range(rounds + 1):
            order = CELLS[r % len(CELLS):] + CELLS[:r % len(CELLS)]  # rotated from round to round
            times = {}
            for cell in order:
                rnn_cpu.settle()
                times[cell] = statistics.median(steps[cell]() for _ in range(reps))
            if r:  # round 0: warm-up
                for cell in CELLS:
                    per_round[cell].append(times[cell])
            print(f"  {dtype_name} round {r}: " + ", ".join(f"{c} {1e3 * t:.1f} ms" for c, t in times.items()),
                  file=sys.stderr)
    finally:
        gc.enable()
    ratios = {cell: [a / b for a, b in zip(per_round[cell], per_round["lstm"])] for cell in CELLS[1:]}
    return {"dtype": dtype_name, "times": per_round, "ratios": ratios}


def table(results: list[dict], size=SIZE) -> str:
    T, B, I, H = size
    lines = ["| dtype | module | ms (median, per-round range) | / lstm (median, per-round range) | target |",
             "|---|---|---|---|---|"]
    for res in results:
        for cell in CELLS:
            ts = [1e3 * t for t in res["times"][cell]]
            name = "layer_norm_lstm, without the hoist_coefficients pass" if cell == NOHOIST else cell
            if cell == "lstm":
                lines.append(f"| {res['dtype']} | {name} | {statistics.median(ts):.1f} ({min(ts):.1f}-{max(ts):.1f}) | 1 | |")
                continue
            rs = res["ratios"][cell]
            met = "met" if statistics.median(rs) <= TARGET else "**not met**"
            target = f"<= {TARGET}x: {met}" if res["dtype"] == "float32" and cell == "layer_norm_lstm" else ""
            lines.append(f"| {res['dtype']} | {name} | {statistics.median(ts):.1f} ({min(ts):.1f}-{max(ts):.1f}) | "
                         f"{statistics.median(rs):.2f}x ({min(rs):.2f}-{max(rs):.2f}) | {target} |")
    return "\n".join(lines)


def section(results: list[dict], rounds: int, reps: int, size=SIZE) -> str:
    info = rnn_cpu.machine_info()
    T, B, I, H = size
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"""{BEGIN}
## Layer-normalized LSTM vs LSTM: the generated NumPy modules

`OPENBLAS_NUM_THREADS=1 python benchmarks/layer_norm_cpu.py --write` ({when}; {info['cpu']}, {info['cores']} cores,
Python {info['python']}, NumPy {info['numpy']} ({info['blas']}), environment: {info['env']}).
One forward + backward (every gradient) at T={T}, B={B}, I=H={I}, n_out=1; {rounds} interleaved rounds after a
warm-up, each module's time in a round the median of {reps} calls; medians over the rounds and per-round ranges;
the ratio is the median of the per-round ratios to lstm.  The machine is shared with other work:
absolute times are noisy, the ratios within one run are what count.  The third module is the committed
layer_norm_lstm rendered without the `hoist_coefficients` pass (symrnn/passes), for comparison.

{table(results, size)}
{END}"""


def write(text: str) -> None:
    old = RESULTS.read_text() if RESULTS.exists() else ""
    if BEGIN in old and END in old:
        new = old[:old.index(BEGIN)] + text + old[old.index(END) + len(END):]
    else:
        new = old.rstrip("\n") + "\n\n" + text + "\n"
    RESULTS.write_text(new)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=9, help="timed rounds after the warm-up (default 9)")
    ap.add_argument("--reps", type=int, default=3, help="calls per module per round (default 3)")
    ap.add_argument("--quick", action="store_true", help="3 rounds of 1 call, float32 only, T=20 (a smoke test)")
    ap.add_argument("--write", action="store_true", help="replace this script's section of benchmarks/RESULTS.md")
    args = ap.parse_args(argv)
    if args.quick:
        size, dtypes, rounds, reps = (20, 8, 32, 32), ("float32",), 3, 1
    else:
        size, dtypes, rounds, reps = SIZE, ("float32", "float64"), args.rounds, args.reps
    results = [run(d, rounds, reps, size) for d in dtypes]
    print(table(results, size))
    if args.write:
        write(section(results, rounds, reps, size))
        print(f"wrote {RESULTS}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
