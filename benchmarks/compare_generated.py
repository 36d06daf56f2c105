#!/usr/bin/env python
"""A/B of two folders of generated NumPy modules (e.g. before and after an emitter change).

    git show OLD:generated/lstm_torch_numpy.py > /tmp/old/lstm_torch_numpy.py   # (per cell)
    python benchmarks/compare_generated.py /tmp/old generated [--cells a,b] [--sizes small,medium]

Forward + backward ({"h": ones}) of each cell from both folders, alternating within each of
``--rounds`` rounds, in one process; the table gives the minimum of each (the minimum is the
estimate least moved by a shared machine's noise) and new/old.  For the judged numbers
against torch, run benchmarks/rnn_cpu.py.
"""

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import numpy as np

SIZES = {"small": (50, 16, 32, 32), "medium": (100, 32, 256, 256), "large": (50, 64, 512, 512)}


def load(folder: Path, cell: str, tag: str):
    spec = importlib.util.spec_from_file_location(f"{cell}_{tag}", folder / f"{cell}_numpy.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("old", type=Path)
    ap.add_argument("new", type=Path)
    ap.add_argument("--cells", default="rnn_tanh_torch,lstm_torch,gru_torch")
    ap.add_argument("--sizes", default="small,medium,large")
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    print("| cell | size | dtype | old fwd ms | old bwd ms | new fwd ms | new bwd ms | new/old |")
    print("|---|---|---|---|---|---|---|---|")
    for size in args.sizes.split(","):
        T, B, I, H = SIZES[size]
        for dtype in (np.float32, np.float64):
            for cell in args.cells.split(","):
                modules = [load(args.old, cell, "old"), load(args.new, cell, "new")]
                params = modules[0].init_params(I, H, dtype=dtype)
                x = np.random.default_rng(0).standard_normal((T, B, I)).astype(dtype)
                ones = {"h": np.ones((T, B, H), dtype)}
                best = [[float("inf")] * 2 for _ in modules]
                for _ in range(args.rounds + 1):  # the first round warms up
                    for k, m in enumerate(modules):
                        t0 = time.perf_counter()
                        _, cache = m.forward(params, x)
                        t1 = time.perf_counter()
                        m.backward(params, cache, ones)
                        t2 = time.perf_counter()
                        best[k] = [min(best[k][0], t1 - t0), min(best[k][1], t2 - t1)]
                (fo, bo), (fn, bn) = best
                print(f"| {cell} | {size} | {np.dtype(dtype).name} | {fo * 1e3:.2f} | {bo * 1e3:.2f} | "
                      f"{fn * 1e3:.2f} | {bn * 1e3:.2f} | {(fn + bn) / (fo + bo):.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
