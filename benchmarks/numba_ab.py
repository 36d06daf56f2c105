#!/usr/bin/env python
"""The numba modules of a git revision against the working tree's (generated/<cell>_numba.py),
interleaved: what a change of the numba backend did to their speed.

    OPENBLAS_NUM_THREADS=1 python benchmarks/numba_ab.py REV [--cells lstm_torch,indrnn]
                                                         [--sizes small,medium] [--dtypes float32] [--rounds 7]

One forward + backward per call, as benchmarks/custom_cpu.py times it (its inputs and loss);
REV's modules come from ``git show REV:generated/<cell>_numba.py`` (and its _numpy.py) into a
temporary folder.  The two alternate within each round (the order swaps), after a warm-up that
compiles both; reported: medians, the ratio new / REV with its per-round range, whether the
gradients are bit-identical, the load average after each row.
"""

from __future__ import annotations

import argparse
import atexit
import importlib.util
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]
# a cache folder of this run's own: numba would otherwise cache the modules loaded here (under
# names of their own, not importable) in generated/__pycache__, whose entries a later
# `import generated.<cell>_numba` of the same file then fails to load
os.environ["NUMBA_CACHE_DIR"] = tempfile.mkdtemp(prefix="numba_ab_")
atexit.register(shutil.rmtree, os.environ["NUMBA_CACHE_DIR"], True)

import numpy as np  # noqa: E402

import custom_cpu  # noqa: E402


def load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def old_modules(rev: str, cells: list[str], folder: Path) -> dict[str, Path]:
    out = {}
    for cell in cells:
        for kind in ("numba", "numpy"):
            text = subprocess.run(["git", "show", f"{rev}:generated/{cell}_{kind}.py"], cwd=ROOT, check=True,
                                  capture_output=True, text=True).stdout
            (folder / f"{cell}_{kind}.py").write_text(text)
        out[cell] = folder / f"{cell}_numba.py"
    return out


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("rev")
    ap.add_argument("--cells", default="lstm_torch,indrnn")
    ap.add_argument("--sizes", default="small,medium")
    ap.add_argument("--dtypes", default="float32")
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args(argv)
    cells = args.cells.split(",")
    print(f"load average at the start {os.getloadavg()[0]:.1f}; {args.rounds} rounds; OPENBLAS_NUM_THREADS="
          f"{os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}")
    print(f"| cell | size | dtype | {args.rev} ms | new ms | new / {args.rev} | gradients bit-identical | load |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as folder:
        old = old_modules(args.rev, cells, Path(folder))
        for cell in cells:
            modules = {"old": load(old[cell], f"old_{cell}_numba"), "new": load(ROOT / "generated" / f"{cell}_numba.py", f"new_{cell}_numba")}
            for size in args.sizes.split(","):
                for dtype in args.dtypes.split(","):
                    params, x, state0 = custom_cpu.inputs(cell, size, getattr(np, dtype))
                    steps, grads = {}, {}
                    for tag, m in modules.items():
                        out, _ = m.forward(params, x, state0)
                        seeds = {k: np.ones_like(out[k]) for k in custom_cpu.loss_outputs(m)}

                        def step(m=m, seeds=seeds):
                            _, cache = m.forward(params, x, state0)
                            return m.backward(params, cache, seeds)
                        steps[tag], grads[tag] = step, step()
                    same = all(np.array_equal(grads["old"][k], grads["new"][k]) for k in grads["old"])
                    t0 = time.perf_counter()
                    steps["old"]()
                    reps = max(1, min(50, int(0.15 / max(time.perf_counter() - t0, 1e-6))))
                    samples = {"old": [], "new": []}
                    for r in range(args.rounds):
                        for tag in (("old", "new") if r % 2 == 0 else ("new", "old")):
                            t0 = time.perf_counter()
                            for _ in range(reps):
                                steps[tag]()
                            samples[tag].append((time.perf_counter() - t0) / reps)
                    ratios = sorted(b / a for a, b in zip(samples["old"], samples["new"]))
                    print(f"| {cell} | {size} | {dtype} | {statistics.median(samples['old']) * 1e3:.3f} | "
                          f"{statistics.median(samples['new']) * 1e3:.3f} | {statistics.median(ratios):.2f} "
                          f"({ratios[0]:.2f}-{ratios[-1]:.2f}) | {'yes' if same else 'no'} | {os.getloadavg()[0]:.1f} |", flush=True)


if __name__ == "__main__":
    main()
