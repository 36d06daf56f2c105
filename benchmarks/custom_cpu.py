#!/usr/bin/env python
"""CPU benchmark of the compiled backend (generated/<cell>_numba.py).

    OPENBLAS_NUM_THREADS=1 python benchmarks/custom_cpu.py [--sizes small,medium] [--dtypes float32]
                                                           [--rounds N] [--busy] [--write]

One forward + backward (grad_outputs {"h": ones}; every parameter gradient, x and the
initial states) per call, of

* **numba**: ``generated.<cell>_numba`` (compiled on its first call, which is not timed here;
  the first-call time is measured separately, in a fresh interpreter with an empty cache);
* **numpy**: ``generated.<cell>_numpy``, the baseline;
* **torch**: ``nn.RNN``/``nn.LSTM``/``nn.GRU`` for the torch-convention cells (benchmarks/rnn_cpu.py's);
* **eager**: the spec cells mgu, indrnn, lstm_peephole written by hand in torch eager over a
  Python loop (benchmarks/torch_cpu.py's oracles);
* **gemm**: the GEMM bound of the torch-convention cells (benchmarks/rnn_cpu.py's).

* **jax**: ``jax.jit(jax.grad(...))`` over ``lax.scan`` for the torch-convention cells
  (benchmarks/rnn_cpu.py's), when ``import jax`` works (a benchmark-only install: ``pip install
  jax``), single-threaded (``XLA_FLAGS`` as below, unless set).

Every column runs on one thread: run it with OPENBLAS_NUM_THREADS=1 (numba's np.dot and
NumPy call OpenBLAS), torch.set_num_threads(1), XLA's Eigen pool off.  A ``torch.compile``
column is not measured (not yet).  The implementations alternate within each round (the order rotates), after a warm-up;
reported: medians, ratios numba/other with their per-round range. ``--busy`` runs a competing
busy process (a spinning Python loop) for the whole run. ``--write`` replaces this script's
section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")

import numpy as np  # noqa: E402

SIZES = {"small": (50, 16, 32, 32), "medium": (100, 32, 256, 256), "large": (50, 64, 512, 512), "long": (1000, 8, 64, 64)}
TORCH_CELLS = {"rnn_tanh_torch": "RNN", "lstm_torch": "LSTM", "gru_torch": "GRU"}
EAGER_CELLS = ("mgu", "indrnn", "lstm_peephole")
SECTION = "## Compiled backend (numba): benchmarks/custom_cpu.py"


def inputs(cell, size, dtype):
    module = importlib.import_module(f"generated.{cell}_numpy")
    T, B, I, H = SIZES[size]
    params = module.init_params(I, H, seed=0, dtype=dtype)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((T, B, module.input_size(I, H))).astype(dtype)
    state0 = {s: (0.1 * rng.standard_normal((B, H))).astype(dtype) for s in module.STATES}
    return params, x, state0


def module_impl(kind):
    def factory(cell, size, dtype):
        module = importlib.import_module(f"generated.{cell}_{kind}")
        params, x, state0 = inputs(cell, size, dtype)
        out, _ = module.forward(params, x, state0)
        seeds = {"h": np.ones_like(out["h"])} if "h" in out else {k: np.ones_like(v) for k, v in out.items()}

        def step():
            _, cache = module.forward(params, x, state0)
            module.backward(params, cache, seeds)
        return step
    return factory


def torch_factory(cell, size, dtype):
    import rnn_cpu
    import torch

    rnn_cpu.SIZES.setdefault(size, SIZES[size])
    step, _ = rnn_cpu.torch_impl(cell, size, np.dtype(dtype).name)
    torch.set_num_threads(1)  # rnn_cpu's sets every core
    return step


def jax_factory(cell, size, dtype):
    import rnn_cpu

    rnn_cpu.SIZES.setdefault(size, SIZES[size])
    step, _ = rnn_cpu.jax_impl(cell, size, np.dtype(dtype).name)
    return step


def jax_available():
    import rnn_cpu

    return rnn_cpu.jax_available()


def gemm_factory(cell, size, dtype):
    import rnn_cpu

    rnn_cpu.SIZES.setdefault(size, SIZES[size])
    step, _ = rnn_cpu.gemm_impl(cell, size, np.dtype(dtype).name)
    return step


def eager_factory(cell, size, dtype):
    import torch
    import torch_cpu

    torch_cpu.SIZES.setdefault(size, SIZES[size])
    step, _ = torch_cpu.eager_impl(cell, size, np.dtype(dtype).name)
    torch.set_num_threads(1)
    return step


def columns(cell):
    cols = {"numba": module_impl("numba"), "numpy": module_impl("numpy")}
    if cell in TORCH_CELLS:
        cols |= {"torch": torch_factory, "gemm": gemm_factory}
        if jax_available():
            cols["jax"] = jax_factory
    if cell in EAGER_CELLS:
        cols["eager"] = eager_factory
    return cols


def bench(cell, size, dtype, rounds):
    steps = {name: f(cell, size, dtype) for name, f in columns(cell).items()}
    for step in steps.values():  # warm-up (compiles the numba module's functions)
        step()
    reps = {}
    for name, step in steps.items():
        t0 = time.perf_counter()
        step()
        reps[name] = max(1, min(50, int(0.15 / max(time.perf_counter() - t0, 1e-6))))
    samples = {name: [] for name in steps}
    names = list(steps)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            for _ in range(reps[name]):
                steps[name]()
            samples[name].append((time.perf_counter() - t0) / reps[name])
    return samples


def first_call(cell, dtype):
    """Seconds of the numba module's first forward + backward in a fresh interpreter with an
    empty cache (compilation), and of the first call in a second interpreter (cache loaded)."""
    code = (f"import time, numpy as np, sys; sys.path.insert(0, {str(ROOT)!r}); t0 = time.perf_counter();"
            f"from generated import {cell}_numba as m, {cell}_numpy as r; p = r.init_params(8, 8, dtype=np.{dtype});"
            f"x = np.ones((4, 2, r.input_size(8, 8)), np.{dtype}); o, c = m.forward(p, x);"
            "m.backward(p, c, {k: np.ones_like(v) for k, v in o.items()}); print(time.perf_counter() - t0)")
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "NUMBA_CACHE_DIR": cache}
        cold = float(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout)
        warm = float(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout)
    return cold, warm


def cpu_model():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def spin(stop):
    while not stop.is_set():
        pass


def fmt_range(a, b):
    ratios = sorted(x / y for x, y in zip(a, b))
    return f"{statistics.median(ratios):.2f} ({ratios[0]:.2f}-{ratios[-1]:.2f})"


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="small,medium")
    ap.add_argument("--dtypes", default="float32")
    ap.add_argument("--cells", default=",".join([*TORCH_CELLS, *EAGER_CELLS, "mingru"]))
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--busy", action="store_true")
    ap.add_argument("--first-call", action="store_true")
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--label", default="", help="added to the section's title (a run of its own: --write replaces only it)")
    args = ap.parse_args(argv)
    stop = multiprocessing.Event()
    busy = multiprocessing.Process(target=spin, args=(stop,), daemon=True) if args.busy else None
    if busy:
        busy.start()
    versions = [f"Python {platform.python_version()}", f"NumPy {np.__version__}", f"numba {importlib.import_module('numba').__version__}"]
    for name in ("torch", "jax"):
        try:
            versions.append(f"{name} {importlib.import_module(name).__version__}")
        except ImportError:
            pass
    load = os.getloadavg()
    section = SECTION + (f", {args.label}" if args.label else "") + (", with a busy core" if busy else "")
    lines = [section, "",
             f"Run {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {cpu_model()}, "
             f"{os.cpu_count()} cores, {', '.join(versions)}; OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}, "
             f"XLA_FLAGS={os.environ['XLA_FLAGS']}; load average at the start {load[0]:.1f} (a shared machine); "
             f"busy process on the other core: {'yes' if busy else 'no'}; {args.rounds} rounds, medians; "
             "ratio = numba / column, median over rounds (min-max); below 1: numba is faster.", "",
             "| cell | size | dtype | numba ms | numpy ms | numba/numpy | numba/torch nn | numba/jax | numba/torch eager | numba/GEMM bound |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    try:
        for cell in args.cells.split(","):
            for size in args.sizes.split(","):
                for dtype in args.dtypes.split(","):
                    s = bench(cell, size, getattr(np, dtype), args.rounds)
                    med = {k: statistics.median(v) for k, v in s.items()}
                    row = [cell, size, dtype, f"{med['numba'] * 1e3:.2f}", f"{med['numpy'] * 1e3:.2f}",
                           fmt_range(s["numba"], s["numpy"])]
                    row += [fmt_range(s["numba"], s[k]) if k in s else "-" for k in ("torch", "jax", "eager", "gemm")]
                    lines.append("| " + " | ".join(row) + " |")
                    print(lines[-1], flush=True)
    finally:
        if busy:
            stop.set()
            busy.join()
    if args.first_call:
        lines += ["", "First call (compile, empty NUMBA_CACHE_DIR) and first call from the cache, fresh interpreters, float32:", "",
                  "| cell | first call s | cached first call s |", "| --- | --- | --- |"]
        for cell in args.cells.split(","):
            cold, warm = first_call(cell, "float32")
            lines.append(f"| {cell} | {cold:.1f} | {warm:.2f} |")
            print(lines[-1], flush=True)
    if args.write:
        path = ROOT / "benchmarks" / "RESULTS.md"
        text = path.read_text() if path.exists() else ""
        before, _, after = text.partition(section + "\n")
        rest = after[after.find("\n## ") + 1:] if "\n## " in after else ""
        path.write_text(before.rstrip() + "\n\n" + "\n".join(lines) + "\n" + ("\n" + rest if rest else ""))


if __name__ == "__main__":
    main()
