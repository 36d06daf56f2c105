#!/usr/bin/env python
"""CPU benchmark: the layer-normalized LSTM's generated NumPy module against the plain LSTM's.

    OPENBLAS_NUM_THREADS=1 python benchmarks/layer_norm_cpu.py [--rounds N] [--quick] [--write]

Times one forward + backward (every gradient; grad_outputs {"h": ones}) of
``generated.layer_norm_lstm_numpy`` (haste's LayerNormLSTM: layer norm of W x, R h and c,
with gains and biases; symrnn/specs/layer_norm_lstm.toml) and of ``generated.lstm_numpy``
(the same gates, no normalization) at T=100, B=32, I=H=256 (n_out=1), float32 and float64, and
of the layer-normalized LSTM written by hand in NumPy (benchmarks/layer_norm_by_hand.py, checked
against the generated module first): what NumPy itself allows.
All run in every round, the order rotating from round to round; a round's time of a module is the median of
``--reps`` calls; the first round is a warm-up and is discarded.  The table gives the median
over the rounds, the per-round range, and the ratio layer_norm_lstm / lstm (the median of
the per-round ratios, and their range): ratios within one interleaved run are what count on a
shared machine.  Target (issue 15): ratio <= 1.3 in float32.

A second table breaks each module's time into forward and backward (medians over the rounds) and
counts, from each module's source, the statements of one step of forward's loop and of backward's
loop, and the coefficient buffers backward computes per block of steps before its loop (each one
NumPy call or more on (steps, B, n) arrays).  The section also gives the load average (1 min)
before and after the run: on a shared machine, what else ran.

``--write`` replaces this script's section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import ast
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
CELLS = ("lstm", "layer_norm_lstm", "layer_norm_lstm_by_hand")
#: the same cell written by hand in NumPy (benchmarks/layer_norm_by_hand.py): what NumPy can do
BY_HAND = "layer_norm_lstm_by_hand"
SIZE = (100, 32, 256, 256)  # T, B, I, H
TARGET = 1.3


def load(cell: str):
    if cell == BY_HAND:
        return importlib.import_module("layer_norm_by_hand")
    return importlib.import_module(f"generated.{cell}_numpy")


def check_by_hand(size=(6, 3, 5, 4)) -> None:
    """The by-hand module's states and gradients equal the generated module's (float64, 1e-10
    relative to each array's largest entry); raise AssertionError naming the first that does not."""
    generated, by_hand = load("layer_norm_lstm"), load(BY_HAND)
    T, B, I, H = size
    params = generated.init_params(I, H, 1, seed=3, dtype=np.float64)
    rng = np.random.default_rng(4)
    for name in ("gamma_x", "gamma_r", "gamma_c", "beta_c", "b"):  # away from their constant initial values
        params[name] = params[name] + 0.3 * rng.standard_normal(params[name].shape)
    x = rng.standard_normal((T, B, I))
    state0 = {s: 0.5 * rng.standard_normal((B, H)) for s in generated.STATES}
    grad_outputs = {"h": rng.standard_normal((T, B, H))}
    outputs, cache = generated.forward(params, x, state0)
    grads = generated.backward(params, cache, grad_outputs)
    hand_outputs, hand_cache = by_hand.forward(params, x, state0)
    hand_grads = by_hand.backward(params, hand_cache, grad_outputs)
    for what, ref, got in [(f"output {k}", outputs[k], hand_outputs[k]) for k in hand_outputs] + \
            [(f"gradient {k}", grads[k], hand_grads[k]) for k in hand_grads]:
        err = np.abs(ref - got).max() / max(np.abs(ref).max(), 1e-300)
        assert err < 1e-10, f"{BY_HAND}: {what} differs from the generated module's by {err:.2e} (relative)"


def make_step(cell: str, dtype, size=SIZE):
    module = load(cell)
    T, B, I, H = size
    init = load("layer_norm_lstm").init_params if cell == BY_HAND else module.init_params
    params = init(I, H, 1, seed=0, dtype=dtype)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((T, B, I)).astype(dtype)
    state0 = {s: (0.1 * rng.standard_normal((B, H))).astype(dtype) for s in ("h", "c")}
    grad_outputs = {"h": np.ones((T, B, H), dtype)}

    def step() -> tuple[float, float]:
        """(forward, backward) seconds of one call of each."""
        t0 = time.perf_counter()
        _, cache = module.forward(params, x, state0)
        t1 = time.perf_counter()
        module.backward(params, cache, grad_outputs)
        return t1 - t0, time.perf_counter() - t1

    return step


def source(cell: str) -> str:
    """A module's source: the committed file (or the by-hand one)."""
    return Path(load(cell).__file__).read_text()


def _loops(tree: ast.Module, function: str, var: str) -> list[ast.For]:
    """The ``for <var> in ...`` loops of a module's function."""
    fn = next(node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == function)
    return [node for node in ast.walk(fn) if isinstance(node, ast.For) and isinstance(node.target, ast.Name)
            and node.target.id == var]


def _statements(body) -> int:
    """Statements in ``body``, those inside nested blocks counted one by one."""
    return sum(_statements(s.body) if isinstance(s, (ast.For, ast.If)) else 1 for s in body)


def counts(cell: str) -> dict[str, int]:
    """Per-step statement counts of a module: forward's loop, backward's loop, and the
    coefficient buffers computed per block of steps (the block loop's assignments outside its step loop)."""
    tree = ast.parse(source(cell))
    block = _loops(tree, "backward", "t1")
    coefs = sum(1 for s in block[0].body if isinstance(s, ast.Assign)) - 1 if block else 0  # less the line t0 = ...
    return {"forward": _statements(_loops(tree, "forward", "t")[0].body),
            "backward": _statements(_loops(tree, "backward", "t")[0].body), "coefs": coefs}


def run(dtype_name: str, rounds: int, reps: int, size=SIZE) -> dict:
    dtype = np.dtype(dtype_name).type
    steps = {cell: make_step(cell, dtype, size) for cell in CELLS}
    per_round: dict[str, list[float]] = {cell: [] for cell in CELLS}
    parts: dict[str, list[tuple[float, float]]] = {cell: [] for cell in CELLS}
    gc.disable()
    try:
        for r in range(rounds + 1):
            order = CELLS[r % len(CELLS):] + CELLS[:r % len(CELLS)]  # rotated from round to round
            times = {}
            for cell in order:
                rnn_cpu.settle()
                calls = sorted((steps[cell]() for _ in range(reps)), key=sum)
                times[cell] = calls[len(calls) // 2]  # the median call (by its forward + backward)
            if r:  # round 0: warm-up
                for cell in CELLS:
                    per_round[cell].append(sum(times[cell]))
                    parts[cell].append(times[cell])
            print(f"  {dtype_name} round {r}: " + ", ".join(f"{c} {1e3 * sum(t):.1f} ms" for c, t in times.items()),
                  file=sys.stderr)
    finally:
        gc.enable()
    ratios = {cell: [a / b for a, b in zip(per_round[cell], per_round["lstm"])] for cell in CELLS[1:]}
    return {"dtype": dtype_name, "times": per_round, "ratios": ratios, "parts": parts}


def breakdown(results: list[dict]) -> str:
    """Forward and backward medians, and the statements per step, of each module."""
    lines = ["| dtype | module | forward ms | backward ms | statements per step: forward loop | backward loop "
             "| coefficient buffers per block |", "|---|---|---|---|---|---|---|"]
    for res in results:
        for cell in CELLS:
            c = counts(cell)
            fwd = statistics.median(f for f, _ in res["parts"][cell])
            bwd = statistics.median(b for _, b in res["parts"][cell])
            lines.append(f"| {res['dtype']} | {cell} | {1e3 * fwd:.1f} | {1e3 * bwd:.1f} | {c['forward']} | {c['backward']} "
                         f"| {c['coefs']} |")
    return "\n".join(lines)


def table(results: list[dict], size=SIZE) -> str:
    T, B, I, H = size
    lines = ["| dtype | module | ms (median, per-round range) | / lstm (median, per-round range) | target |",
             "|---|---|---|---|---|"]
    for res in results:
        for cell in CELLS:
            ts = [1e3 * t for t in res["times"][cell]]
            name = "layer_norm_lstm written by hand in NumPy" if cell == BY_HAND else cell
            if cell == "lstm":
                lines.append(f"| {res['dtype']} | {name} | {statistics.median(ts):.1f} ({min(ts):.1f}-{max(ts):.1f}) | 1 | |")
                continue
            rs = res["ratios"][cell]
            met = "met" if statistics.median(rs) <= TARGET else "**not met**"
            target = f"<= {TARGET}x: {met}" if res["dtype"] == "float32" and cell == "layer_norm_lstm" else ""
            lines.append(f"| {res['dtype']} | {name} | {statistics.median(ts):.1f} ({min(ts):.1f}-{max(ts):.1f}) | "
                         f"{statistics.median(rs):.2f}x ({min(rs):.2f}-{max(rs):.2f}) | {target} |")
    return "\n".join(lines)


def section(results: list[dict], rounds: int, reps: int, size=SIZE, load=("?", "?")) -> str:
    info = rnn_cpu.machine_info()
    T, B, I, H = size
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"""{BEGIN}
## Layer-normalized LSTM vs LSTM: the generated NumPy modules

`OPENBLAS_NUM_THREADS=1 python benchmarks/layer_norm_cpu.py --write` ({when}; {info['cpu']}, {info['cores']} cores,
Python {info['python']}, NumPy {info['numpy']} ({info['blas']}), environment: {info['env']};
load average (1 min) {load[0]} before the run, {load[1]} after it).
One forward + backward (every gradient) at T={T}, B={B}, I=H={I}, n_out=1; {rounds} interleaved rounds after a
warm-up, each module's time in a round the median of {reps} calls; medians over the rounds and per-round ranges;
the ratio is the median of the per-round ratios to lstm.  The machine is shared with other work:
absolute times are noisy, the ratios within one run are what count.  The third module is
the same cell written by hand in NumPy on the stacked (B, 4n) arrays (benchmarks/layer_norm_by_hand.py,
checked against the generated module's outputs and gradients, float64, 1e-10, before the run): what a
NumPy implementation costs, the floor for the generated module.

{table(results, size)}

Forward and backward separately (medians over the rounds), and what each module runs per step:

{breakdown(results)}
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
    check_by_hand()
    before = f"{os.getloadavg()[0]:.1f}"
    results = [run(d, rounds, reps, size) for d in dtypes]
    load = (before, f"{os.getloadavg()[0]:.1f}")
    print(table(results, size))
    print(breakdown(results))
    print(f"load average (1 min): {load[0]} before, {load[1]} after", file=sys.stderr)
    if args.write:
        write(section(results, rounds, reps, size, load))
        print(f"wrote {RESULTS}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
