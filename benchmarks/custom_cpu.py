#!/usr/bin/env python
"""CPU benchmark of the compiled backend (generated/<cell>_numba.py).

    OPENBLAS_NUM_THREADS=1 python benchmarks/custom_cpu.py [--sizes small,medium] [--dtypes float32]
                                                           [--columns jax,gemm] [--rounds N] [--busy] [--write]

One forward + backward per call (the loss: the sum over every step of h and of every readout,
grad_outputs ones for them; every parameter gradient, x and the initial states), of

* **numba**: ``generated.<cell>_numba`` (compiled on its first call, which is not timed here;
  the first-call time is measured separately, in a fresh interpreter with an empty cache);
* **numpy**: ``generated.<cell>_numpy``, the baseline;
* **torch**: ``nn.RNN``/``nn.LSTM``/``nn.GRU`` for the torch-convention cells (benchmarks/rnn_cpu.py's);
* **eager**: the cell written by hand (benchmarks/cell_oracles.py) in torch eager over a Python loop;
* **compile**: the same with its step ``torch.compile``\ d (float32 at the sizes of
  ``--compile-sizes``: inductor compiles each shape for tens of seconds with g++; a failure is
  written in the table, not dropped);
* **jax**: ``jax.jit(jax.grad(...))`` over ``lax.scan`` of the same hand-written cell, when ``import
  jax`` works (a benchmark-only install: ``pip install jax``), single-threaded (``XLA_FLAGS`` as
  below, unless set);
* **jax v&g**: the same with ``jax.value_and_grad``: the loss's value too.  ``jax.grad`` alone
  drops a readout's forward product as dead code (measured in XLA's optimized HLO: minGRU's 8
  products against 9 with the value; its time 0.88x), while the numba module's forward computes
  every output, as a training step needs them: this column is the like-for-like one;
* **gemm**: the GEMM bound of every cell: exactly the matrix products of the cell's generated
  modules (symrnn's plan: each stacked product once), at their real shapes, through NumPy's
  BLAS, nothing else: per step the recurrent products and their W^T delta, over every step at
  once the input side's and the readout's products, their operands' adjoints, and every weight
  gradient (``plan_products``).

Every oracle (eager, compile, jax) is checked against the NumPy module's gradients (every
parameter, x, the initial states) before it is timed, on the first 100 steps of its input
(``CHECK_STEPS``: at T=1000 float rounding can decide a gradient).  ``--products`` also times a step's
product alone: numba's np.dot (SciPy's OpenBLAS) against the numba module's ``_gemm`` (NumPy's
OpenBLAS) and NumPy's np.dot, at the LSTM's and GRU's step shapes.

Every column is meant to run on one thread: run it with OPENBLAS_NUM_THREADS=1 (numba's np.dot and
NumPy call OpenBLAS), torch.set_num_threads(1), XLA's Eigen pool off.  XLA's CPU runtime
starts threads of its own all the same (measured: JAX's CPU time over its timed calls up to
1.7x its wall time on 2 cores, benchmarks/RESULTS.md); the table below the ratios gives each column's CPU time /
wall time, and ``--one-core`` pins the whole process (every thread it starts) to one core,
so that JAX also runs on one (``--busy`` then spins on the other cores).  The implementations alternate within each round (the order rotates), after a warm-up;
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
SPEC_CELLS = ("mgu", "indrnn", "mingru", "lstm_peephole", "lstm_forget_bias", "antisymmetric_rnn", "rg_lru",
              "elman_classifier", "layer_norm_lstm")
SETUP = {}  # (cell, size, dtype, column) -> seconds to build the column (torch.compile: its compilation)
CPU = {}  # (cell, size, dtype) -> {column: CPU time / wall time of its timed calls (1: one busy core; 2: two)}
SECTION = "## Compiled backend (numba): benchmarks/custom_cpu.py"
COLUMNS = ("numba", "numpy", "torch", "jax", "jax v&g", "eager", "compile", "gemm")


#: an oracle is checked against the NumPy module on the first CHECK_STEPS steps of its timed input
#: (all of them where there are fewer): a check of the oracle's equations, which are the same at
#: every length.  Over 1000 steps float rounding can decide a gradient: layer_norm_lstm at the long
#: size amplifies a relative change of x 7.8e7-5.5e8 times in its gradients (measured, float64), so
#: its float32 oracles and module differ by 1.1-1.2 (relative), its float64 ones by 3e-8.
CHECK_STEPS = 100


def inputs(cell, size, dtype, steps=None):
    """Parameters, x and the initial states of a run at ``size``; ``steps``: x's first steps only."""
    module = importlib.import_module(f"generated.{cell}_numpy")
    T, B, I, H = SIZES[size]
    params = module.init_params(I, H, seed=0, dtype=dtype)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((T, B, module.input_size(I, H))).astype(dtype)
    state0 = {s: (0.1 * rng.standard_normal((B, H))).astype(dtype) for s in module.STATES}
    return params, x[:steps], state0


def check_steps(size):
    """How many steps an oracle is checked on (CHECK_STEPS)."""
    return min(SIZES[size][0], CHECK_STEPS)


def module_impl(kind):
    def factory(cell, size, dtype):
        module = importlib.import_module(f"generated.{cell}_{kind}")
        params, x, state0 = inputs(cell, size, dtype)
        out, _ = module.forward(params, x, state0)
        seeds = {k: np.ones_like(out[k]) for k in loss_outputs(module)}

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


def loss_outputs(module):
    """The outputs whose sum over every step is the benchmarks' loss: h and every readout."""
    return ["h", *(k for k in module.OUTPUTS if k not in module.STATES)]


def reference_grads(cell, size, dtype, steps=None):
    """The NumPy module's gradients of the loss (every parameter, x, the initial states)."""
    module = importlib.import_module(f"generated.{cell}_numpy")
    params, x, state0 = inputs(cell, size, dtype, steps)
    out, cache = module.forward(params, x, state0)
    return module.backward(params, cache, {k: np.ones_like(out[k]) for k in loss_outputs(module)})


def readout_sum(cell, p, m, hs):
    """The sum of the cell's readouts over every step (0 without readouts)."""
    import cell_oracles

    readout = cell_oracles.READOUTS.get(cell)
    return sum(v.sum() for v in readout(p, m, hs).values()) if readout else 0


def check_oracle(name, cell, size, dtype, grads):
    """Raise if a hand-written oracle's gradients (on the first check_steps(size) steps) are
    not the NumPy module's."""
    ref = reference_grads(cell, size, dtype, check_steps(size))
    tol = 2e-3 if dtype == np.float32 else 1e-9
    for k, want in ref.items():
        got = np.asarray(grads[k], np.float64)
        err = float(np.max(np.abs(got - want))) / max(float(np.max(np.abs(want))), 1e-30) if want.size else 0.0
        if not err <= tol:
            raise AssertionError(f"{name} oracle of {cell} ({size}, {np.dtype(dtype).name}, {check_steps(size)} steps): "
                                 f"d{k} off by {err:.1e} (relative)")


def jax_factory(with_value):
    """jax.jit(jax.grad(loss)) over lax.scan (the issue's column), or with ``with_value``
    jax.jit(jax.value_and_grad(loss)): the loss too, as a training step has it.  jax.grad
    alone drops the forward readout's product as dead code (its value only feeds the loss);
    the numba module's forward computes every output (a loss needs them): the v&g column does
    the same work."""
    def factory(cell, size, dtype):
        import cell_oracles
        import jax
        import jax.numpy as jnp

        params, x, state0 = inputs(cell, size, dtype)
        H, m = SIZES[size][3], cell_oracles.namespace("jax")

        def run(p, xs, s0):
            pre, step = cell_oracles.CELLS[cell](p, m, H)

            def body(s, a):
                new = step(s, a)
                return new, new["h"]
            _, hs = jax.lax.scan(body, s0, pre(xs))
            return jnp.sum(hs) + readout_sum(cell, p, m, hs)

        grad_fn = jax.jit((jax.value_and_grad if with_value else jax.grad)(run, argnums=(0, 1, 2)))
        jp, jx, js = ({k: jnp.asarray(v) for k, v in params.items()}, jnp.asarray(x),
                      {k: jnp.asarray(v) for k, v in state0.items()})
        jx_check = jx[:check_steps(size)]
        gp, gx, gs = grad_fn(jp, jx_check, js)[1] if with_value else grad_fn(jp, jx_check, js)
        check_oracle("jax", cell, size, dtype, {**gp, "x": gx, **{f"{k}0": v for k, v in gs.items()}})

        def call():
            jax.block_until_ready(grad_fn(jp, jx, js))
        return call
    return factory


def grad(leaf):
    """A torch leaf's gradient as NumPy (zero where the loss does not reach it: a readout's weights)."""
    return np.zeros(tuple(leaf.shape)) if leaf.grad is None else leaf.grad.numpy()


def torch_oracle_factory(compiled):
    def factory(cell, size, dtype):
        import cell_oracles
        import torch

        torch.set_num_threads(1)
        params, x, state0 = inputs(cell, size, dtype)
        H, m = SIZES[size][3], cell_oracles.namespace("torch")
        p = {k: torch.from_numpy(v.copy()).requires_grad_(True) for k, v in params.items()}
        xt = torch.from_numpy(x.copy()).requires_grad_(True)
        s0 = {k: torch.from_numpy(v.copy()).requires_grad_(True) for k, v in state0.items()}
        pre, step = cell_oracles.CELLS[cell](p, m, H)
        step = torch.compile(step, dynamic=False) if compiled else step

        def run(xs):
            for leaf in (*p.values(), xs, *s0.values()):
                leaf.grad = None
            a, s, hs = pre(xs), s0, []
            for t in range(xs.shape[0]):
                s = step(s, {k: v[t] for k, v in a.items()})
                hs.append(s["h"])
            hs = torch.stack(hs)
            (hs.sum() + readout_sum(cell, p, m, hs)).backward()

        x_check = torch.from_numpy(x[:check_steps(size)].copy()).requires_grad_(True)
        run(x_check)  # compiles (torch.compile); then the gradients are checked
        check_oracle("torch.compile" if compiled else "torch eager", cell, size, dtype,
                     {**{k: grad(v) for k, v in p.items()}, "x": grad(x_check), **{f"{k}0": grad(v) for k, v in s0.items()}})

        def call():
            run(xt)
        return call
    return factory


def jax_available():
    import rnn_cpu

    return rnn_cpu.jax_available()


def plan_products(cell, size):
    """The matrix products of one forward + backward of ``cell``'s generated modules, from its
    plan: (where, rows, cols) per stacked product, where "step" (a recurrent product: one GEMM
    (B x cols @ cols x rows) per step forward and its W^T delta per step backward) or "all" (the
    input side's or a readout's: one GEMM over every step, forward and backward); each also
    has its weight gradient, one GEMM over every step.  A product of parameters alone (formed
    once per call, no batch) is left out."""
    from symrnn.pipeline import build

    module = importlib.import_module(f"generated.{cell}_numpy")
    _, _, I, H = SIZES[size]
    dims = dict(zip(("n_in", "n_hidden", "n_out"), module._dims(I, H, None)))

    def value(size):  # a size (n_hidden, 4*n_hidden, ...) at this benchmark size
        return int(size.subs({s: dims[s.name] for s in size.free_symbols}))
    kernel_plan = build(cell)
    graph = kernel_plan.graph
    leaves = {leaf.name: leaf for leaf in graph.leaves}
    found = []
    for region in (kernel_plan.pre, kernel_plan.loop, kernel_plan.post):
        for stage in region.stages:
            for group in stage.groups:
                operand = leaves.get(group.operand)
                if operand is not None and operand.kind == "param":
                    continue
                cols = operand.size if operand is not None else graph.node(group.operand).size
                found.append(("step" if region.name == "loop" else "all", value(group.rows), value(cols)))
    return found


def gemm_factory(cell, size, dtype):
    """The GEMM bound: ``plan_products``' GEMMs alone, as the generated modules call them (a
    recurrent product by a contiguous W^T through np.dot, the others through np.matmul)."""
    T, B, _, _ = SIZES[size]
    rng = np.random.default_rng(2)
    work = []
    for where, rows, cols in plan_products(cell, size):
        w = rng.standard_normal((rows, cols)).astype(dtype)
        a = rng.standard_normal((T * B, cols)).astype(dtype)  # the operand, every step
        d = rng.standard_normal((T * B, rows)).astype(dtype)  # the product's adjoint, every step
        work.append((where, w, np.ascontiguousarray(w.T), a, d, np.empty((T * B, rows), dtype),
                     np.empty((T * B, cols), dtype), np.empty((rows, cols), dtype)))

    def step():
        for where, w, w_t, a, d, out, d_a, d_w in work:  # forward
            if where == "step":
                for t in range(T):
                    np.dot(a[t * B:(t + 1) * B], w_t, out=out[t * B:(t + 1) * B])
            else:
                np.matmul(a, w.T, out=out)
        for where, w, w_t, a, d, out, d_a, d_w in work:  # backward
            if where == "step":
                for t in range(T):
                    np.dot(d[t * B:(t + 1) * B], w, out=d_a[t * B:(t + 1) * B])
            else:
                np.matmul(d, w, out=d_a)
            np.matmul(d.T, a, out=d_w)
    return step


def columns(cell, dtype, size, compile_sizes):
    cols = {"numba": module_impl("numba"), "numpy": module_impl("numpy"), "gemm": gemm_factory}
    if cell in TORCH_CELLS:
        cols["torch"] = torch_factory
    if jax_available():
        cols["jax"] = jax_factory(with_value=False)
        cols["jax v&g"] = jax_factory(with_value=True)
    cols["eager"] = torch_oracle_factory(compiled=False)
    if dtype == np.float32 and size in compile_sizes:
        cols["compile"] = torch_oracle_factory(compiled=True)
    return cols


def bench(cell, size, dtype, rounds, compile_sizes=(), wanted=COLUMNS):
    """{column: per-round seconds}, and {column: why it has none} (a factory that failed:
    torch.compile, or an oracle off the NumPy module's gradients); the columns of ``wanted``
    besides numba and numpy, which always run."""
    steps, failed = {}, {}
    for name, f in columns(cell, dtype, size, compile_sizes).items():
        if name not in ("numba", "numpy", *wanted):
            continue
        t0 = time.perf_counter()
        try:
            steps[name] = f(cell, size, dtype)
        except Exception as exc:  # noqa: BLE001 - said in the table
            if name in ("numba", "numpy"):
                raise
            failed[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:80] if str(exc) else ''}"
            print(f"# {cell} {size}: {name} failed: {failed[name]}", flush=True)
        SETUP[(cell, size, np.dtype(dtype).name, name)] = time.perf_counter() - t0
    for step in steps.values():  # warm-up (compiles the numba module's functions)
        step()
    reps = {}
    for name, step in steps.items():
        t0 = time.perf_counter()
        step()
        reps[name] = max(1, min(50, int(0.15 / max(time.perf_counter() - t0, 1e-6))))
    samples = {name: [] for name in steps}
    names = list(steps)
    cpu = {name: [0.0, 0.0] for name in steps}  # the process's CPU seconds (every thread) and wall seconds of the timed calls
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            c0, t0 = time.process_time(), time.perf_counter()
            for _ in range(reps[name]):
                steps[name]()
            wall = time.perf_counter() - t0
            cpu[name][0] += time.process_time() - c0
            cpu[name][1] += wall
            samples[name].append(wall / reps[name])
    CPU[(cell, size, np.dtype(dtype).name)] = {name: c / w for name, (c, w) in cpu.items()}
    return samples, failed


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


def products(rounds):
    """A step's product alone, N of them in one compiled loop: numba's np.dot (SciPy's OpenBLAS)
    against the numba modules' _gemm (NumPy's OpenBLAS, by symbol) and NumPy's np.dot from Python."""
    import numba

    module = importlib.import_module("generated.lstm_torch_numba")
    gemm = module._gemm

    @numba.njit
    def with_numba_dot(a, w, out, n):
        for _ in range(n):
            np.dot(a, w, out)

    @numba.njit
    def with_gemm(a, w, out, n):
        for _ in range(n):
            gemm(a, w, out)

    def with_numpy(a, w, out, n):
        for _ in range(n):
            np.dot(a, w, out=out)

    impls = {"numba np.dot": with_numba_dot, "_gemm": with_gemm, "NumPy np.dot": with_numpy}
    lines = [f"A step's product alone (us per product, medians of {rounds} interleaved rounds; _gemm: "
             f"{module._BLAS or 'not found: np.dot'}):", "",
             "| shape (B x K @ K x N) | dtype | numba np.dot | _gemm | NumPy np.dot | _gemm / numba np.dot |",
             "| --- | --- | --- | --- | --- | --- |"]
    rng = np.random.default_rng(0)
    for size in ("medium", "large"):
        _, B, _, H = SIZES[size]
        for G in (4, 3):  # LSTM, GRU: forward h @ W_hh^T, backward delta @ W_hh
            for K, N in ((H, G * H), (G * H, H)):
                for dtype in (np.float32, np.float64):
                    a, w = rng.standard_normal((B, K)).astype(dtype), rng.standard_normal((K, N)).astype(dtype)
                    outs = {name: np.empty((B, N), dtype) for name in impls}
                    n = max(1, int(2e8 / (B * K * N)))
                    for name, f in impls.items():
                        f(a, w, outs[name], 1)
                    samples = {name: [] for name in impls}
                    for r in range(rounds):
                        for name in list(impls)[r % 3:] + list(impls)[:r % 3]:
                            t0 = time.perf_counter()
                            impls[name](a, w, outs[name], n)
                            samples[name].append((time.perf_counter() - t0) / n)
                    if not np.array_equal(outs["_gemm"], outs["NumPy np.dot"]):
                        raise AssertionError("_gemm is not NumPy's product")
                    med = {k: statistics.median(v) * 1e6 for k, v in samples.items()}
                    lines.append(f"| {B} x {K} @ {K} x {N} | {np.dtype(dtype).name} | {med['numba np.dot']:.0f} | "
                                 f"{med['_gemm']:.0f} | {med['NumPy np.dot']:.0f} | "
                                 f"{fmt_range(samples['_gemm'], samples['numba np.dot'])} |")
                    print(lines[-1], flush=True)
    return lines


def cpu_model():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def spin(stop, cores=None):
    if cores:  # off the core the benchmark is pinned to (--one-core)
        os.sched_setaffinity(0, cores)
    while not stop.is_set():
        pass


def thread_masks():
    """{cores allowed: how many of this process's threads have that mask} (Linux /proc)."""
    masks = {}
    for status in Path("/proc/self/task").glob("*/status"):
        for line in status.read_text().splitlines():
            if line.startswith("Cpus_allowed_list:"):
                mask = line.split(":", 1)[1].strip()
                masks[mask] = masks.get(mask, 0) + 1
    return masks


def fmt_range(a, b):
    ratios = sorted(x / y for x, y in zip(a, b))
    return f"{statistics.median(ratios):.2f} ({ratios[0]:.2f}-{ratios[-1]:.2f})"


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="small,medium")
    ap.add_argument("--dtypes", default="float32")
    ap.add_argument("--cells", default=",".join([*TORCH_CELLS, *SPEC_CELLS]))
    ap.add_argument("--compile-sizes", default="small,medium", help="the sizes with a torch.compile column (float32)")
    ap.add_argument("--products", action="store_true", help="also time a step's product alone (the BLAS behind it)")
    ap.add_argument("--columns", default=",".join(COLUMNS[2:]),
                    help="the columns besides numba and numpy (default: every one; a column a cell lacks is '-')")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--busy", action="store_true")
    ap.add_argument("--first-call", action="store_true")
    ap.add_argument("--one-core", action="store_true",
                    help="pin this process (every thread it starts: XLA's, BLAS's) to one core, so that every column runs on one core")
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--label", default="", help="added to the section's title (a run of its own: --write replaces only it)")
    args = ap.parse_args(argv)
    cores = os.sched_getaffinity(0)
    if args.one_core and len(cores) > 1:
        # A thread keeps the mask it was started with, and NumPy's import (above) has started
        # OpenBLAS's threads already (measured: CPU/wall 2.0 with OPENBLAS_NUM_THREADS unset).
        # Pin, then start this script again: every thread of the new process inherits the mask.
        os.environ["SYMRNN_BENCH_CORES"] = ",".join(map(str, sorted(cores)))
        os.sched_setaffinity(0, {min(cores)})
        os.execv(sys.executable, [sys.executable, __file__, *(sys.argv[1:] if argv is None else argv)])
    if args.one_core:
        cores = {int(c) for c in os.environ.get("SYMRNN_BENCH_CORES", str(min(cores))).split(",")}
    stop = multiprocessing.Event()
    others = (cores - {min(cores)}) if args.one_core else None
    busy = multiprocessing.Process(target=spin, args=(stop, others), daemon=True) if args.busy else None
    if busy:
        busy.start()
    versions = [f"Python {platform.python_version()}", f"NumPy {np.__version__}", f"numba {importlib.import_module('numba').__version__}"]
    for name in ("torch", "jax"):
        try:
            versions.append(f"{name} {importlib.import_module(name).__version__}")
        except ImportError:
            pass
    load = os.getloadavg()
    # a run of its own kind gets a section of its own (--write replaces only that section)
    section = (SECTION + (f", {args.label}" if args.label else "") + (", with a busy core" if busy else "")
               + (", first call" if args.first_call else ""))
    lines = [section, "",
             f"Run {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {cpu_model()}, "
             f"{os.cpu_count()} cores, {', '.join(versions)}; OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}, "
             f"XLA_FLAGS={os.environ['XLA_FLAGS']}; load average at the start {load[0]:.1f} (a shared machine); "
             f"busy process on the other core: {'yes' if busy else 'no'}; "
             f"{'this process pinned to one core (os.sched_setaffinity: every column on one core); ' if args.one_core else ''}"
             f"{args.rounds} rounds, medians; "
             "ratio = numba / column, median over rounds (min-max); below 1: numba is faster.", "",
             "| cell | size | dtype | numba ms | numpy ms | numba/numpy | numba/torch nn | numba/jax | numba/jax v&g "
             "| numba/torch eager | numba/torch.compile | numba/GEMM bound |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    failures = []
    try:
        for cell in args.cells.split(","):
            for size in args.sizes.split(","):
                for dtype in args.dtypes.split(","):
                    s, failed = bench(cell, size, getattr(np, dtype), args.rounds, args.compile_sizes.split(","),
                                      args.columns.split(","))
                    med = {k: statistics.median(v) for k, v in s.items()}
                    row = [cell, size, dtype, f"{med['numba'] * 1e3:.2f}", f"{med['numpy'] * 1e3:.2f}",
                           fmt_range(s["numba"], s["numpy"])]
                    for k in ("torch", "jax", "jax v&g", "eager", "compile", "gemm"):
                        if k in failed:
                            failures.append(f"{cell} {size} {dtype} {k}: {failed[k]}")
                        row.append(fmt_range(s["numba"], s[k]) if k in s else f"failed ({len(failures)})" if k in failed else "-")
                    lines.append("| " + " | ".join(row) + " |")
                    print(lines[-1], flush=True)
    finally:
        if busy:
            stop.set()
            busy.join()
    if args.one_core:
        masks = thread_masks()
        lines[3:3] = ["", f"Pinning checked at the end of the run: {sum(masks.values())} threads, "
                      + ", ".join(f"{n} allowed on cores {m}" for m, n in sorted(masks.items())) + "."]
        print(lines[4], flush=True)
    lines += ["", "CPU time / wall time of each column's timed calls (the process's CPU seconds, every thread, "
              "os.times via time.process_time; 1.0: one core busy, above 1: more than one core):", "",
              "| cell | size | dtype | " + " | ".join(COLUMNS) + " |", "| --- | --- | --- |" + " --- |" * len(COLUMNS)]
    for (cell, size, dtype), ratios in CPU.items():
        lines.append(f"| {cell} | {size} | {dtype} | " + " | ".join(f"{ratios[k]:.2f}" if k in ratios else "-" for k in COLUMNS) + " |")
    print("\n".join(lines[-len(CPU) - 2:]), flush=True)
    compiled = sorted((k, v) for k, v in SETUP.items() if k[3] == "compile")
    if compiled:
        lines += ["", "torch.compile's compilation of the step (the first call, seconds): "
                  + ", ".join(f"{c} {sz} {v:.0f}" for (c, sz, _, _), v in compiled) + "."]
    if failures:
        lines += ["", "Failed columns (not timed):", ""] + [f"{i}. {f}" for i, f in enumerate(failures, 1)]
    if args.products:
        lines += ["", *products(args.rounds)]
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
