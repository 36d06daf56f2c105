#!/usr/bin/env python
"""CPU benchmark: symrnn's generated NumPy kernels against torch.nn.RNN/LSTM/GRU.

    python benchmarks/rnn_cpu.py [--quick] [--write]

For the PyTorch-convention cells (rnn_tanh_torch, lstm_torch, gru_torch) it measures the
median time of one forward + backward (every parameter gradient, the input and the initial
state(s); grad_outputs {"h": ones}) of

* the generated NumPy module ``generated.<cell>_numpy``,
* ``torch.nn.RNN`` / ``nn.LSTM`` / ``nn.GRU`` (``torch.set_num_threads(os.cpu_count())``,
  ``x``, ``h0`` (and ``c0``) requiring grad, ``output.backward(ones)``),
* ``jax.jit(jax.grad(...))`` over ``lax.scan`` if ``import jax`` works,

and the "GEMM bound": the same run's NumPy time of exactly the matrix products the algorithm
needs at their real shapes. The implementations alternate within each round (the order rotates
from round to round); the first round is a warm-up and is discarded. Peak memory is measured in
separate subprocesses (``--_mem``), and the script also times ``symrnn generate`` and the import
of one generated module in a fresh interpreter.

``--quick``: 3 rounds, only the small and medium sizes in float32. ``--write``: also write
``benchmarks/RESULTS.md``. Progress goes to stderr, the tables to stdout.
"""

import argparse
import datetime
import gc
import importlib
import json
import math
import os
import platform
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

# cell -> (number of gates G, torch module class name)
CELLS = {
    "rnn_tanh_torch": (1, "RNN"),
    "lstm_torch": (4, "LSTM"),
    "gru_torch": (3, "GRU"),
}
# size -> (T, B, I, H)
SIZES = {
    "small": (50, 16, 32, 32),
    "medium": (100, 32, 256, 256),
    "large": (50, 64, 512, 512),
}
DTYPES = {"float32": np.float32, "float64": np.float64}
MEM_SIZES = ("medium", "large")
IMPL_NAMES = ("numpy", "torch", "torch_generic", "jax", "gemm")
# configurations where torch's CPU default is oneDNN's fused RNN primitive (float32 nn.LSTM): the
# benchmark also times torch with oneDNN off there ("torch_generic", torch's per-step implementation)
ONEDNN = {("lstm_torch", "float32")}

TARGET_SAMPLE_S = 0.05   # one timing sample repeats a call until it lasts about this long


def log(*args):
    print(*args, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- inputs

def make_inputs(cell, size, dtype_name, seed=0):
    """Generated module, parameters, x, initial states, grad_outputs: the same for everybody."""
    module = importlib.import_module(f"generated.{cell}_numpy")
    T, B, I, H = SIZES[size]
    dtype = DTYPES[dtype_name]
    params = module.init_params(I, H, seed=seed, dtype=dtype)
    rng = np.random.default_rng(seed + 1)
    x = rng.standard_normal((T, B, I)).astype(dtype)
    state0 = {"h": (0.1 * rng.standard_normal((B, H))).astype(dtype)}
    if cell == "lstm_torch":
        state0["c"] = (0.1 * rng.standard_normal((B, H))).astype(dtype)
    grad_h = np.ones((T, B, H), dtype)
    return module, params, x, state0, grad_h


# --------------------------------------------------------------------------- implementations
# Each factory returns step() -> (forward seconds, backward seconds) for one call, and
# grads() -> dict of NumPy gradients of the last call (None for the GEMM bound).

def numpy_impl(cell, size, dtype_name):
    module, params, x, state0, grad_h = make_inputs(cell, size, dtype_name)
    grad_outputs = {"h": grad_h}
    last = {}

    def step():
        t0 = time.perf_counter()
        outputs, cache = module.forward(params, x, state0)
        t1 = time.perf_counter()
        last["grads"] = module.backward(params, cache, grad_outputs)
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1

    return step, lambda: last["grads"]


def torch_impl(cell, size, dtype_name, onednn=True):
    """``onednn=False``: the same call under ``torch.backends.mkldnn.flags(enabled=False)``
    (torch's generic per-step implementation instead of oneDNN's fused RNN primitive)."""
    import contextlib

    import torch

    torch.set_num_threads(os.cpu_count())
    _, params, x, state0, grad_h = make_inputs(cell, size, dtype_name)
    T, B, I, H = SIZES[size]
    tdtype = {"float32": torch.float32, "float64": torch.float64}[dtype_name]
    cls = getattr(torch.nn, CELLS[cell][1])
    kwargs = {"nonlinearity": "tanh"} if cell == "rnn_tanh_torch" else {}
    mod = cls(I, H, dtype=tdtype, **kwargs)
    mod.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in params.items()})
    xt = torch.from_numpy(x.copy()).requires_grad_(True)
    h0 = torch.from_numpy(state0["h"][None].copy()).requires_grad_(True)
    leaves = [xt, h0] + list(mod.parameters())
    if cell == "lstm_torch":
        c0 = torch.from_numpy(state0["c"][None].copy()).requires_grad_(True)
        leaves.append(c0)
        hx = (h0, c0)
    else:
        hx = h0
    gout = torch.from_numpy(grad_h)

    flags = contextlib.nullcontext if onednn else (lambda: torch.backends.mkldnn.flags(enabled=False))

    def step():
        for leaf in leaves:
            leaf.grad = None
        with flags():
            t0 = time.perf_counter()
            out, _ = mod(xt, hx)
            t1 = time.perf_counter()
            out.backward(gout)
            t2 = time.perf_counter()
        return t1 - t0, t2 - t1

    def grads():
        g = {name: p.grad.numpy() for name, p in mod.named_parameters()}
        g["x"] = xt.grad.numpy()
        g["h0"] = h0.grad[0].numpy()
        if cell == "lstm_torch":
            g["c0"] = c0.grad[0].numpy()
        return g

    return step, grads


def gemm_impl(cell, size, dtype_name):
    """Exactly the matrix products of one forward + backward, at their real shapes."""
    G = CELLS[cell][0]
    T, B, I, H = SIZES[size]
    dtype = DTYPES[dtype_name]
    rng = np.random.default_rng(2)
    r = lambda *shape: rng.standard_normal(shape).astype(dtype)  # noqa: E731
    w_ih, w_hh = r(G * H, I), r(G * H, H)
    # the per-step products multiply by a contiguous W_hh^T (OpenBLAS is faster with it
    # than with the transposed view; the generated modules make it once per call too) and,
    # like the generated modules, call np.dot (less dispatch per call than np.matmul)
    w_hh_t = np.ascontiguousarray(w_hh.T)
    x2 = r(T * B, I)                 # x, all steps
    h_seq = r(T, B, H)               # h_prev of every step
    d_proj = r(T, B, G * H)          # gate pre-activation adjoints of every step
    d2 = d_proj.reshape(T * B, G * H)
    h2 = h_seq.reshape(T * B, H)
    out_xproj = np.empty((T * B, G * H), dtype)
    out_hproj = np.empty((B, G * H), dtype)
    out_dh = np.empty((B, H), dtype)
    out_dx = np.empty((T * B, I), dtype)
    out_dwih = np.empty((G * H, I), dtype)
    out_dwhh = np.empty((G * H, H), dtype)

    def step():
        t0 = time.perf_counter()
        np.matmul(x2, w_ih.T, out=out_xproj)                 # (T*B, I) x (I, G*H)
        for t in range(T):
            np.dot(h_seq[t], w_hh_t, out=out_hproj)          # (B, H) x (H, G*H)
        t1 = time.perf_counter()
        for t in range(T):
            np.dot(d_proj[t], w_hh, out=out_dh)              # (B, G*H) x (G*H, H)
        np.matmul(d2, w_ih, out=out_dx)                      # (T*B, G*H) x (G*H, I)
        np.matmul(d2.T, x2, out=out_dwih)                    # (G*H, T*B) x (T*B, I)
        np.matmul(d2.T, h2, out=out_dwhh)                    # (G*H, T*B) x (T*B, H)
        t2 = time.perf_counter()
        return t1 - t0, t2 - t1

    return step, lambda: None


def jax_impl(cell, size, dtype_name):
    """jax.jit(jax.grad(sum of h)) over lax.scan; only used when `import jax` works."""
    import jax
    import jax.numpy as jnp

    _, params, x, state0, _ = make_inputs(cell, size, dtype_name)
    H = SIZES[size][3]
    sig = jax.nn.sigmoid

    def run(p, xs, s0):
        xproj = xs @ p["weight_ih_l0"].T + p["bias_ih_l0"]
        w_hh, b_hh = p["weight_hh_l0"], p["bias_hh_l0"]

        def body(carry, xp):
            if cell == "rnn_tanh_torch":
                h = jnp.tanh(xp + carry["h"] @ w_hh.T + b_hh)
                new = {"h": h}
            elif cell == "lstm_torch":
                gates = xp + carry["h"] @ w_hh.T + b_hh
                i, f, g, o = (gates[:, k * H:(k + 1) * H] for k in range(4))
                c = sig(f) * carry["c"] + sig(i) * jnp.tanh(g)
                h = sig(o) * jnp.tanh(c)
                new = {"h": h, "c": c}
            else:  # gru_torch
                hh = carry["h"] @ w_hh.T + b_hh
                rr = sig(xp[:, :H] + hh[:, :H])
                z = sig(xp[:, H:2 * H] + hh[:, H:2 * H])
                n = jnp.tanh(xp[:, 2 * H:] + rr * hh[:, 2 * H:])
                h = (1 - z) * n + z * carry["h"]
                new = {"h": h}
            return new, h

        _, hs = jax.lax.scan(body, s0, xproj)
        return jnp.sum(hs)

    grad_fn = jax.jit(jax.grad(run, argnums=(0, 1, 2)))
    jp = {k: jnp.asarray(v) for k, v in params.items()}
    jx = jnp.asarray(x)
    js = {k: jnp.asarray(v) for k, v in state0.items()}
    last = {}

    def step():
        t0 = time.perf_counter()
        out = grad_fn(jp, jx, js)
        jax.block_until_ready(out)
        last["out"] = out
        return 0.0, time.perf_counter() - t0   # one fused program: no phase split

    def grads():
        gp, gx, gs = last["out"]
        g = {k: np.asarray(v) for k, v in gp.items()}
        g["x"] = np.asarray(gx)
        for k, v in gs.items():
            g[k + "0"] = np.asarray(v)
        return g

    return step, grads


def jax_available():
    try:
        import jax  # noqa: F401
    except Exception:  # ImportError, or a broken install
        return False
    jax.config.update("jax_enable_x64", True)   # float64 inputs stay float64 (float32 stay float32)
    return True


# --------------------------------------------------------------------------- timing

def settle(max_s=0.4):
    """Wait until this process's own helper threads stop burning CPU.

    OpenBLAS's worker threads spin for ~0.1 s after each call (torch's OpenMP threads for a few
    ms); on 2 cores a spinning thread of the previous library steals a core from the next one
    and can slow it down by 10x or more. Polls the process CPU time (all threads) every 5 ms."""
    deadline = time.perf_counter() + max_s
    last = time.process_time()
    quiet = 0
    while time.perf_counter() < deadline:
        time.sleep(0.005)
        now = time.process_time()
        quiet = quiet + 1 if now - last < 0.0005 else 0
        last = now
        if quiet >= 2:
            return


LIBRARY = {"numpy": "openblas", "gemm": "openblas", "torch": "torch", "torch_generic": "torch", "jax": "jax"}


def timed(step, reps):
    """Mean (forward, backward) seconds over `reps` calls (the caller turns the gc off)."""
    fwd = bwd = 0.0
    for _ in range(reps):
        f, b = step()
        fwd += f
        bwd += b
    return fwd / reps, bwd / reps


class LoadGuard:
    """CPU used by *other* processes while we measure (the machine may be shared).

    Other load = busy time of all CPUs from /proc/stat minus this process's CPU time (all its
    threads) and its children's, plus the steal time (the hypervisor running something else on our
    virtual CPUs), divided by the wall time: in cores. A timing round with more than THRESHOLD
    cores of it is "contaminated": it is redone after waiting for the machine to go quiet, as long
    as the extra-time budget lasts."""

    THRESHOLD = 0.15   # cores (other processes + steal)

    def __init__(self, budget_s):
        self.budget_s = budget_s
        self.spent_s = 0.0
        self.hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.available = os.path.exists("/proc/stat")

    def snap(self):
        busy = steal = 0
        if self.available:
            with open("/proc/stat") as fh:
                v = [int(x) for x in fh.readline().split()[1:]]
            busy = v[0] + v[1] + v[2] + v[5] + v[6]      # user nice system irq softirq
            steal = v[7] if len(v) > 7 else 0
        t = os.times()
        return (time.perf_counter(), busy / self.hz, steal / self.hz, time.process_time(),
                t.children_user + t.children_system)

    def load(self, s0, s1):
        """(other processes' load + steal, steal) in cores between two snaps."""
        if not self.available:
            return 0.0, 0.0
        dt = max(s1[0] - s0[0], 1e-9)
        other = (s1[1] - s0[1]) - (s1[3] - s0[3]) - (s1[4] - s0[4])
        steal = (s1[2] - s0[2]) / dt
        return max(0.0, other / dt) + steal, steal

    @property
    def exhausted(self):
        return self.spent_s >= self.budget_s

    def wait_quiet(self, window_s=0.3):
        """Wait (within the budget) until other processes use < THRESHOLD cores over a window."""
        t0 = time.perf_counter()
        try:
            while self.available and not self.exhausted:
                s0 = self.snap()
                time.sleep(window_s)
                self.spent_s += window_s
                if self.load(s0, self.snap())[0] < self.THRESHOLD:
                    return True
            return not self.available
        finally:
            if time.perf_counter() - t0 > 0.5:
                log(f"    waited {time.perf_counter() - t0:.1f}s for other processes to go idle"
                f" (extra-time budget used: {self.spent_s:.0f}/{self.budget_s:.0f}s)")


def rel_diff(a, b):
    """max over gradients of max|a - b| / max|b|."""
    worst = 0.0
    for key in b:
        x, y = np.asarray(a[key], np.float64), np.asarray(b[key], np.float64)
        scale = max(float(np.max(np.abs(y))), 1e-30)
        worst = max(worst, float(np.max(np.abs(x - y))) / scale)
    return worst


def bench_config(cell, size, dtype_name, impl_names, rounds, guard):
    factories = {"numpy": numpy_impl, "torch": torch_impl, "jax": jax_impl, "gemm": gemm_impl,
                 "torch_generic": lambda *a: torch_impl(*a, onednn=False)}
    steps, grad_getters = {}, {}
    for name in impl_names:
        steps[name], grad_getters[name] = factories[name](cell, size, dtype_name)
    # warm-up round: first calls (lazy init, jit), then calibrate the repetitions per sample
    reps = {}
    for name in impl_names:
        settle()
        timed(steps[name], 1)
        f, b = timed(steps[name], 1)
        reps[name] = max(1, min(200, math.ceil(TARGET_SAMPLE_S / max(f + b, 1e-9))))
    settle()
    parity = {}
    ref = grad_getters["torch"]() if "torch" in impl_names else None
    if ref is not None:
        for name in impl_names:
            if name not in ("torch", "torch_generic", "gemm"):
                parity[name] = rel_diff(grad_getters[name](), ref)
    records = []   # (samples {name: (fwd, bwd)}, other load + steal, steal) per round
    gc.collect()
    gc_was_enabled = gc.isenabled()
    gc.disable()   # (collecting costs ~70 ms with torch loaded; nothing here makes cycles)
    previous = None
    while True:
        clean = [r for r in records if r[1] < guard.THRESHOLD]
        if len(clean) >= rounds:
            break
        if len(records) >= rounds and (guard.exhausted or len(records) >= 3 * rounds):
            break
        if records and records[-1][1] >= guard.THRESHOLD:
            guard.wait_quiet()
            previous = None
        k = len(records) % len(impl_names)
        s0 = guard.snap()
        samples = {}
        for name in impl_names[k:] + impl_names[:k]:      # rotate the order each round
            if previous is not None and LIBRARY[previous] != LIBRARY[name]:
                settle()
            samples[name] = timed(steps[name], reps[name])
            previous = name
        s1 = guard.snap()
        if len(records) >= rounds:                        # a redone round: extra time
            guard.spent_s += s1[0] - s0[0]
        records.append((samples, *guard.load(s0, s1)))
    if gc_was_enabled:
        gc.enable()
    clean = [r for r in records if r[1] < guard.THRESHOLD]
    used = clean if len(clean) >= min(3, rounds) else records
    result = {"reps": reps, "parity": parity, "rounds_run": len(records), "rounds_used": len(used),
              "contaminated": used is records and len(clean) < len(records),
              "other_load": statistics.mean(r[1] for r in used),
              "steal": statistics.mean(r[2] for r in used)}
    for name in impl_names:
        ss = [r[0][name] for r in used]
        totals = [f + b for f, b in ss]
        result[name] = {
            "total": statistics.median(totals),
            "fwd": statistics.median(f for f, _ in ss),
            "bwd": statistics.median(b for _, b in ss),
            "spread": (max(totals) - min(totals)) / statistics.median(totals),
            "samples": totals,
        }
    if "torch" in impl_names:   # numpy / torch within each round: how firm the ratio of medians is
        result["paired"] = sorted((r[0]["numpy"][0] + r[0]["numpy"][1]) / (r[0]["torch"][0] + r[0]["torch"][1])
                                  for r in used)
    del steps, grad_getters
    gc.collect()
    return result


# --------------------------------------------------------------------------- peak memory

def mem_child(impl, cell, size, dtype_name):
    """Runs in its own process: ru_maxrss growth of one forward + backward."""
    if impl == "torch":
        import torch  # noqa: F401  (imported before the baseline)
    elif impl == "jax":
        jax_available()
    factory = {"numpy": numpy_impl, "torch": torch_impl, "jax": jax_impl}[impl]
    step, _ = factory(cell, size, dtype_name)
    gc.collect()
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss   # KiB on Linux
    status0 = proc_status()
    step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    status1 = proc_status()
    print(json.dumps({"base_kib": base, "peak_kib": peak, "delta_kib": peak - base,
                      "rss_at_base_kib": status0.get("VmRSS", base),
                      "hwm_delta_kib": status1.get("VmHWM", 0) - status0.get("VmHWM", 0)}))


def proc_status():
    """VmRSS / VmHWM (KiB) of this process from /proc/self/status ({} where unavailable)."""
    out = {}
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                key = line.split(":", 1)[0]
                if key in ("VmRSS", "VmHWM"):
                    out[key] = int(line.split()[1])
    except OSError:
        pass
    return out


def measure_memory(impl, cell, size, dtype_name):
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_mem", impl, cell, size, dtype_name]
    if os.path.exists("/bin/sh"):
        # Linux keeps ru_maxrss across execve, and a child forked (or vforked) from this big
        # process starts with this process's resident set as its high-water mark. Starting the
        # child from a small shell (not exec'ed: "; exit") gives it a clean ru_maxrss.
        cmd = ["/bin/sh", "-c", " ".join(shlex.quote(c) for c in cmd) + '; exit "$?"']
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        log(proc.stderr)
        raise RuntimeError(f"memory subprocess failed: {' '.join(cmd)}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- tool timings

def time_generate(repeats):
    exe = shutil.which("symrnn")
    base = [exe] if exe else [sys.executable, "-m", "symrnn"]
    times = []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            subprocess.run(base + ["generate", "--out", tmp], cwd=ROOT, check=True,
                           capture_output=True)
            times.append(time.perf_counter() - t0)
    shown = "symrnn" if exe else "python -m symrnn"
    return statistics.median(times), f"{shown} generate --out <tmpdir>"


def time_import(repeats, guard):
    def run(code):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True)
        return time.perf_counter() - t0

    run("import numpy")   # warm the file cache
    run("import generated.lstm_torch_numpy")
    pairs = []                          # (with module, numpy only, foreign load)
    while True:
        clean = [p for p in pairs if p[2] < guard.THRESHOLD]
        if len(clean) >= repeats or len(pairs) >= 3 * repeats:
            break
        s0 = guard.snap()
        a = run("import generated.lstm_torch_numpy")   # alternate the two commands
        b = run("import numpy")
        pairs.append((a, b, guard.load(s0, guard.snap())[0]))
    clean = [p for p in pairs if p[2] < guard.THRESHOLD]
    used = clean if len(clean) >= 3 else pairs
    return (statistics.median(p[0] for p in used), statistics.median(p[1] for p in used),
            statistics.median(p[0] - p[1] for p in used), len(used), len(pairs))


# --------------------------------------------------------------------------- machine

def machine_info():
    info = {}
    model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info["cpu"] = model
    info["cores"] = os.cpu_count()
    try:
        info["affinity"] = len(os.sched_getaffinity(0))
    except AttributeError:
        info["affinity"] = None
    info["python"] = platform.python_version()
    info["numpy"] = np.__version__
    info["blas"] = numpy_blas()
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = os.cpu_count()
        cfg = torch.__config__.show()
        info["torch_blas"] = "MKL" if "BLAS_INFO=mkl" in cfg else "see torch.__config__.show()"
        info["torch_mkldnn"] = torch.backends.mkldnn.is_available()
    except ImportError:
        info["torch"] = "not installed"
    info["platform"] = platform.platform()
    env = ["OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "PYTHONDONTWRITEBYTECODE"]
    info["env"] = ", ".join(f"{k}={os.environ[k]}" for k in env if k in os.environ) or "none set"
    return info


def numpy_blas():
    """The BLAS NumPy uses: threadpoolctl if present, else numpy.show_config, plus OpenBLAS's runtime core."""
    try:
        import threadpoolctl

        for lib in threadpoolctl.threadpool_info():
            if lib.get("user_api") == "blas":
                return (f"{lib.get('internal_api')} {lib.get('version')} ({lib.get('architecture')}, "
                        f"{lib.get('num_threads')} threads) [threadpoolctl]")
    except ImportError:
        pass
    desc = "unknown"
    try:
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        desc = f"{blas.get('name')} {blas.get('version')}"
    except Exception:
        pass
    # OpenBLAS runtime core and threads, via the library NumPy already loaded
    try:
        import ctypes
        import glob

        libdir = Path(np.__file__).parent.parent / "numpy.libs"
        for path in glob.glob(str(libdir / "*openblas*")):
            lib = ctypes.CDLL(path)
            for suffix in ("64_", ""):
                core = getattr(lib, f"scipy_openblas_get_corename{suffix}", None)
                nth = getattr(lib, f"scipy_openblas_get_num_threads{suffix}", None)
                if core is not None and nth is not None:
                    core.restype = ctypes.c_char_p
                    nth.restype = ctypes.c_int
                    desc += f" (core {core().decode()}, {nth()} threads)"
                    return desc + " [numpy.show_config]"
    except Exception:
        pass
    return desc + " [numpy.show_config]"


# --------------------------------------------------------------------------- report

def fmt_ms(s):
    ms = s * 1e3
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def fmt_ratio(r):
    return f"{r:.2f}"


def timing_table(rows, has_jax):
    head = ["cell", "size (T,B,I=H)", "dtype", "numpy ms", "torch ms"]
    if has_jax:
        head.append("jax ms")
    head += ["numpy/torch", "numpy/torch per round (min-max)", "GEMM bound ms", "numpy/GEMM", "torch/GEMM"]
    if has_jax:
        head.append("jax/GEMM")
    head += ["torch, oneDNN off ms", "numpy/(torch, oneDNN off)", "grad diff numpy vs torch"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (cell, size, dt), r in rows:
        T, B, I, H = SIZES[size]
        n, t, g = r["numpy"]["total"], r["torch"]["total"], r["gemm"]["total"]
        cols = [cell, f"{size} ({T},{B},{H})", dt, fmt_ms(n), fmt_ms(t)]
        if has_jax:
            cols.append(fmt_ms(r["jax"]["total"]))
        cols += [fmt_ratio(n / t), f"{r['paired'][0]:.2f}-{r['paired'][-1]:.2f}", fmt_ms(g),
                 fmt_ratio(n / g), fmt_ratio(t / g)]
        if has_jax:
            cols.append(fmt_ratio(r["jax"]["total"] / g))
        if "torch_generic" in r:
            cols += [fmt_ms(r["torch_generic"]["total"]), fmt_ratio(n / r["torch_generic"]["total"])]
        else:
            cols += ["(same path)", ""]
        cols.append(f"{r['parity']['numpy']:.1e}")
        lines.append("| " + " | ".join(cols) + " |")
    return "\n".join(lines)


def targets_table(rows, mem_rows, generate_s):
    """The targets of the performance issue, each judged on this run's numbers."""
    big = [(k, r) for k, r in rows if k[1] != "small"]
    small = [(k, r) for k, r in rows if k[1] == "small"]
    lines = ["| target | met in | not met in |", "|---|---|---|"]

    def add(what, items, ok, value):
        good = [k for k, r in items if ok(r)]
        bad = [f"{'/'.join(k)} ({value(r)})" for k, r in items if not ok(r)]
        lines.append(f"| {what} | {len(good)} of {len(items)} | {', '.join(bad) or '-'} |")

    ratio = lambda r: r["numpy"]["total"] / r["torch"]["total"]  # noqa: E731
    bound = lambda r: r["numpy"]["total"] / r["gemm"]["total"]  # noqa: E731
    add("numpy <= 1.0x torch, medium and large", big, lambda r: ratio(r) <= 1.0, lambda r: f"{ratio(r):.2f}x")
    add("numpy <= 1.0x torch, small", small, lambda r: ratio(r) <= 1.0, lambda r: f"{ratio(r):.2f}x")
    add("numpy <= 1.5x GEMM bound, medium and large", big, lambda r: bound(r) <= 1.5, lambda r: f"{bound(r):.2f}x")
    if mem_rows:
        mem = lambda m: m["numpy"]["delta_kib"] / max(m["torch"]["delta_kib"], 1)  # noqa: E731
        add("peak memory <= torch's", mem_rows, lambda m: mem(m) <= 1.0, lambda m: f"{mem(m):.2f}x")
    lines.append(f"| `symrnn generate`, all built-in cells, < 10 s | {'yes' if generate_s < 10 else 'no'} "
                 f"({generate_s:.2f} s) | {'-' if generate_s < 10 else 'all'} |")
    onednn = [k for k, r in rows if "torch_generic" in r and ratio(r) > 1.0]
    if onednn:
        lines.append("")
        lines.append("Where numpy is slower than torch's oneDNN LSTM, against torch with oneDNN off (its "
                     "per-step implementation): " + ", ".join(
                         f"{'/'.join(k)} {r['numpy']['total'] / r['torch_generic']['total']:.2f}x"
                         for k, r in rows if k in onednn) + ".")
    return "\n".join(lines)


def phase_table(rows):
    head = ["cell", "size", "dtype", "numpy fwd ms", "numpy bwd ms", "torch fwd ms", "torch bwd ms",
            "GEMM fwd ms", "GEMM bwd ms", "numpy fwd/GEMM fwd", "numpy bwd/GEMM bwd",
            "max spread", "rounds used/run", "other load+steal (cores)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (cell, size, dt), r in rows:
        n, t, g = r["numpy"], r["torch"], r["gemm"]
        spread = max(r[k]["spread"] for k in IMPL_NAMES if k in r)
        cols = [cell, size, dt, fmt_ms(n["fwd"]), fmt_ms(n["bwd"]), fmt_ms(t["fwd"]),
                fmt_ms(t["bwd"]), fmt_ms(g["fwd"]), fmt_ms(g["bwd"]),
                fmt_ratio(n["fwd"] / g["fwd"]), fmt_ratio(n["bwd"] / g["bwd"]), f"{spread:.0%}",
                f"{r['rounds_used']}/{r['rounds_run']}" + (" (!)" if r["contaminated"] else ""),
                f"{r['other_load']:.2f}"]
        lines.append("| " + " | ".join(cols) + " |")
    return "\n".join(lines)


def memory_table(mem_rows, impls):
    head = ["cell", "size", "dtype"] + [f"{i} peak MiB" for i in impls]
    if "torch" in impls:
        head.append("numpy/torch")
    head += [f"{i}: peak - RSS at baseline, MiB" for i in impls]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (cell, size, dt), m in mem_rows:
        cols = [cell, size, dt] + [f"{m[i]['delta_kib'] / 1024:.1f}" for i in impls]
        if "torch" in impls:
            t = m["torch"]["delta_kib"]
            cols.append(fmt_ratio(m["numpy"]["delta_kib"] / t) if t > 0 else "n/a")
        cols += [f"{(m[i]['peak_kib'] - m[i]['rss_at_base_kib']) / 1024:.1f}" for i in impls]
        lines.append("| " + " | ".join(cols) + " |")
    return "\n".join(lines)


def observations(rows, mem_rows):
    """A few automatic remarks (the numbers themselves are in the tables)."""
    notes = []
    if rows:
        worst = max(rows, key=lambda kv: kv[1]["numpy"]["total"] / kv[1]["torch"]["total"])
        best = min(rows, key=lambda kv: kv[1]["numpy"]["total"] / kv[1]["torch"]["total"])
        for label, (key, r) in (("slowest", worst), ("fastest", best)):
            ratio = r["numpy"]["total"] / r["torch"]["total"]
            phase = "forward" if r["numpy"]["fwd"] / r["torch"]["fwd"] > r["numpy"]["bwd"] / r["torch"]["bwd"] else "backward"
            notes.append(
                f"NumPy relative to torch is {label} for {' / '.join(key)}: {ratio:.2f}x torch's time "
                f"(forward {r['numpy']['fwd'] / r['torch']['fwd']:.2f}x, backward "
                f"{r['numpy']['bwd'] / r['torch']['bwd']:.2f}x; the larger gap is in the {phase}).")
        below = [k for k, r in rows if r["torch"]["total"] < r["gemm"]["total"]]
        if below:
            notes.append(
                "torch beats the NumPy GEMM bound in " + ", ".join("/".join(k) for k in below)
                + ": the bound is OpenBLAS's time for the products, and torch runs them with MKL/oneDNN "
                "(and fuses the gate arithmetic), so it is a bound for the NumPy module, not for torch.")
        noisy = [(k, max(r[n]["spread"] for n in IMPL_NAMES if n in r)) for k, r in rows]
        noisy = [(k, s) for k, s in noisy if s > 0.25]
        if noisy:
            notes.append("Rounds spread by more than 25% (max-min over median) in: "
                         + ", ".join(f"{'/'.join(k)} ({s:.0%})" for k, s in noisy) + ".")
        dirty = [k for k, r in rows if r["contaminated"]]
        if dirty:
            notes.append("Other processes kept the machine busy and the extra-time budget ran out, so "
                         "these rows include rounds measured under foreign load (marked (!) in the "
                         "phase table; their times are unreliable): " + ", ".join("/".join(k) for k in dirty) + ".")
        else:
            notes.append("Every timing median is over rounds during which other processes and steal "
                         f"took less than {LoadGuard.THRESHOLD} cores on average.")
        bad = [(k, r["parity"]["numpy"]) for k, r in rows
               if r["parity"]["numpy"] > (1e-4 if k[2] == "float32" else 1e-10)]
        if bad:
            notes.append("Gradients differ from torch's more than expected in: "
                         + ", ".join(f"{'/'.join(k)} ({d:.1e})" for k, d in bad) + ".")
        else:
            notes.append("The NumPy gradients match torch's in every configuration "
                         "(max relative difference in the last column).")
    if mem_rows:
        hwm = max(abs(m[i]["delta_kib"] - m[i]["hwm_delta_kib"]) for _, m in mem_rows for i in m)
        gaps = {i: max(m[i]["base_kib"] - m[i]["rss_at_base_kib"] for _, m in mem_rows) for i in mem_rows[0][1]}
        notes.append("Memory cross-checks: the ru_maxrss growth agrees with the growth of VmHWM (the "
                     f"kernel's per-process peak RSS) to within {hwm / 1024:.1f} MiB. At the baseline, "
                     "ru_maxrss is above the RSS of that moment by at most "
                     + ", ".join(f"{g / 1024:.1f} MiB for {i}" for i, g in gaps.items())
                     + " (a transient peak while importing and building the inputs); the ru_maxrss "
                     "difference understates the growth over the baseline RSS by up to that much, which "
                     "the last columns (peak minus VmRSS at the baseline) show.")
    return notes


# --------------------------------------------------------------------------- main

def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 rounds, small+medium float32 only")
    ap.add_argument("--write", action="store_true", help="write benchmarks/RESULTS.md")
    ap.add_argument("--_mem", nargs=4, metavar=("IMPL", "CELL", "SIZE", "DTYPE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._mem:
        mem_child(*args._mem)
        return 0

    t_start = time.perf_counter()
    command = "python benchmarks/rnn_cpu.py" + (" --quick" if args.quick else "") + (" --write" if args.write else "")
    info = machine_info()
    has_jax = jax_available()
    if not has_jax:
        print("jax: not installed")
    impls = ["numpy", "torch", "torch_generic"] + (["jax"] if has_jax else []) + ["gemm"]
    rounds = 3 if args.quick else 9
    sizes = ["small", "medium"] if args.quick else list(SIZES)
    dtypes = ["float32"] if args.quick else list(DTYPES)

    guard = LoadGuard(30.0 if args.quick else 180.0)
    rows = []
    for size in sizes:
        for dt in dtypes:
            for cell in CELLS:
                t0 = time.perf_counter()
                here = [i for i in impls if i != "torch_generic" or (cell, dt) in ONEDNN]
                r = bench_config(cell, size, dt, here, rounds, guard)
                rows.append(((cell, size, dt), r))
                log(f"[{time.perf_counter() - t_start:6.1f}s] {cell:15s} {size:6s} {dt}: "
                    + ", ".join(f"{n} {fmt_ms(r[n]['total'])} ms" for n in here)
                    + f"  ({time.perf_counter() - t0:.1f}s)")
    t_timing = time.perf_counter() - t_start

    mem_impls = ["numpy", "torch"] + (["jax"] if has_jax else [])
    mem_rows = []
    t0 = time.perf_counter()
    for size in [s for s in MEM_SIZES if s in sizes]:
        for dt in dtypes:
            for cell in CELLS:
                m = {i: measure_memory(i, cell, size, dt) for i in mem_impls}
                mem_rows.append(((cell, size, dt), m))
                log(f"[{time.perf_counter() - t_start:6.1f}s] memory {cell} {size} {dt}: "
                    + ", ".join(f"{i} {m[i]['delta_kib'] / 1024:.1f} MiB" for i in mem_impls))
    t_mem = time.perf_counter() - t0

    guard.wait_quiet()
    s0 = guard.snap()
    gen_s, gen_cmd = time_generate(1 if args.quick else 3)
    imp_mod, imp_np, imp_diff, imp_used, imp_run = time_import(7 if args.quick else 15, guard)
    tool_load = guard.load(s0, guard.snap())[0]
    log(f"[{time.perf_counter() - t_start:6.1f}s] generate {gen_s:.2f}s, import {imp_diff:.3f}s")
    total_s = time.perf_counter() - t_start

    table = timing_table(rows, has_jax)
    phases = phase_table(rows)
    mem_table = memory_table(mem_rows, mem_impls)
    tools = "\n".join([
        "| what | wall time |",
        "|---|---|",
        f"| `{gen_cmd}` (all built-in cells, subprocess, median of {1 if args.quick else 3}) | {gen_s:.2f} s |",
        f"| `python -c \"import generated.lstm_torch_numpy\"` (median) | {imp_mod * 1e3:.0f} ms |",
        f"| `python -c \"import numpy\"` (median) | {imp_np * 1e3:.0f} ms |",
        f"| import of one generated module (median of the paired differences; {imp_used} of {imp_run} pairs, those under {LoadGuard.THRESHOLD} cores of foreign load) | {imp_diff * 1e3:.1f} ms |",
    ]) + f"\n\nOther processes' load during these tool timings: {tool_load:.2f} cores."
    notes = observations(rows, mem_rows)
    targets = targets_table(rows, mem_rows, gen_s)

    print()
    print("## Targets\n")
    print(targets)
    print()
    print("## Forward + backward, median time\n")
    print(table)
    print("\n## Phases (median of each phase)\n")
    print(phases)
    if mem_rows:
        print("\n## Peak memory growth of one forward + backward (separate subprocesses)\n")
        print(mem_table)
    print("\n## Tooling\n")
    print(tools)
    print()
    for n in notes:
        print("- " + n)
    print(f"\ntotal wall time: {total_s:.0f} s (timing {t_timing:.0f} s, memory {t_mem:.0f} s)")

    if args.write:
        write_results(ROOT / "benchmarks" / "RESULTS.md", info, command, has_jax, rounds, targets, table,
                      phases, mem_table if mem_rows else None, tools, notes, total_s, args.quick,
                      guard)
        log(f"wrote {ROOT / 'benchmarks' / 'RESULTS.md'}")
    return 0


def write_results(path, info, command, has_jax, rounds, targets, table, phases, mem_table, tools, notes,
                  total_s, quick, guard):
    now = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    sizes = ", ".join(f"{k} (T={T}, B={B}, I=H={H})" for k, (T, B, I, H) in SIZES.items())
    text = f"""# symrnn CPU benchmark: generated NumPy kernels vs torch

Produced by `benchmarks/rnn_cpu.py`; do not edit by hand, re-run instead.

- **Command:** `{command}` (from the repository root; total wall time {total_s:.0f} s)
- **Date:** {now}
- **CPU:** {info['cpu']}, {info['cores']} logical cores (os.cpu_count(); {info['affinity']} usable)
- **Python** {info['python']}, **NumPy** {info['numpy']}, **torch** {info.get('torch')}
  (CPU build, BLAS {info.get('torch_blas')}, oneDNN available: {info.get('torch_mkldnn')},
  `torch.set_num_threads({info.get('torch_threads')})`)
- **NumPy's BLAS:** {info['blas']}
- **jax:** {'installed: jax.jit(jax.grad(...)) over lax.scan' if has_jax else 'not installed (column left out)'}
- **Platform:** {info['platform']}
- **Environment variables** (threads, bytecode cache): {info['env']}

## What is measured

Cells `rnn_tanh_torch`, `lstm_torch`, `gru_torch` (the generated modules follow `nn.RNN(tanh)`,
`nn.LSTM`, `nn.GRU` exactly and take torch's `state_dict()` names); sizes {sizes}{'' if not quick else ' (--quick: small and medium, float32 only)'}.

- **numpy**: `generated.<cell>_numpy.forward(params, x, state0)` then `backward(params, cache,
  {{"h": ones}})`, which returns every parameter gradient, `x`, `h0` (and `c0`).
- **torch**: `torch.nn.RNN/LSTM/GRU` with the same weights, `x`, `h0` (and `c0`) with
  `requires_grad=True`, `out, _ = mod(x, hx); out.backward(ones)` (the `out.sum().backward()`
  gradient), parameter/input gradients reset to `None` before each call. On CPU, torch runs a
  float32 `nn.LSTM` through oneDNN's fused RNN primitive (`torch.backends.mkldnn`); `nn.RNN`,
  `nn.GRU` and float64 LSTMs go through torch's generic per-step implementation.
- **torch, oneDNN off** (float32 LSTM only, where torch's default is oneDNN): the same call inside
  `torch.backends.mkldnn.flags(enabled=False)`, i.e. torch's generic per-step implementation; a
  reference that shows how much of torch's lead there is oneDNN's fused kernel.
{'- **jax**: `jax.jit(jax.grad(lambda p, x, s0: sum(h)))` with the recurrence in `lax.scan`.' + chr(10) if has_jax else ''}- **GEMM bound**: NumPy's time, in the same run, for exactly the matrix products the algorithm
  needs, at their real shapes, into preallocated outputs (G = 1, 4, 3 gates for RNN, LSTM, GRU).
  Forward: one input projection (T*B, I) x (I, G*H) and T recurrent products (B, H) x (H, G*H).
  Backward: T recurrent products (B, G*H) x (G*H, H), one input-gradient product
  (T*B, G*H) x (G*H, I) and two weight-gradient products (G*H, T*B) x (T*B, I) and
  (G*H, T*B) x (T*B, H); the per-step forward products multiply by a contiguous copy of W_hh^T
  (made outside the timing), the layout the generated modules use, and are `np.dot` calls, as
  there. Elementwise gate arithmetic, bias sums and allocations are not in it, so
  it is a lower bound for the NumPy module (torch uses MKL/oneDNN instead of OpenBLAS and can go
  below it).
- **Protocol:** per configuration, one warm-up round (first calls; it also fixes how many calls one
  sample averages, so that a sample lasts about {TARGET_SAMPLE_S * 1e3:.0f} ms -- several for the small size,
  1 for the others), then {rounds} rounds; within a round the implementations alternate (the order
  rotates from round to round); the tables give medians over rounds, and ratios are taken between
  medians of the same run. "numpy/torch per round" is the range of numpy's time over torch's
  within each round: how firm the ratio of medians is on this (shared, virtual) machine. Before a sample whose library differs from the previous sample's
  (OpenBLAS for numpy and the GEMM bound, torch, jax), the script waits until the process's own
  helper threads stop using CPU: OpenBLAS's workers spin for ~0.1 s after each call, and on 2
  cores a thread left spinning by one library slows the next one down by up to 10x or more.
  The garbage collector is off during the rounds.
- **Foreign load:** the machine may be shared (and is a VM). For each round the script computes
  the CPU time other processes used (busy time in `/proc/stat` minus this process's own CPU time)
  plus the steal time the hypervisor reports, in cores; a round above {LoadGuard.THRESHOLD} cores is redone
  after waiting for quiet, within an extra-time budget
  ({guard.budget_s:.0f} s for the run; {guard.spent_s:.0f} s used). "rounds used/run" in the phase table
  says how many rounds entered the medians; (!) marks rows whose medians had to include
  contaminated rounds. "other load+steal" is the mean foreign load over the rounds used.
- "grad diff" is max over gradients of max|numpy - torch| / max|torch| after the warm-up
  (float32 and float64 results each against torch in the same dtype).

## Targets

Judged on the medians of this run (`benchmarks/rnn_cpu.py` computes this table; see the
observations at the end and the note of the performance issue for what limits the rest).

{targets}

## Forward + backward, median time

{table}

## Phases

Forward and backward timed separately inside the same calls (medians of each phase, so they need
not add up exactly to the totals). "max spread" is the largest (max - min) / median over the rounds
among the implementations of that row.

{phases}
"""
    if mem_table:
        text += f"""
## Peak memory

Each number comes from its own fresh subprocess (`python benchmarks/rnn_cpu.py --_mem IMPL CELL SIZE
DTYPE`): it imports what the implementation needs (NumPy and the generated module; or torch), builds
the parameters, inputs, initial states and the ones used as grad_outputs (for torch also the module),
runs `gc.collect()`, reads `resource.getrusage(RUSAGE_SELF).ru_maxrss` as the baseline, runs **one**
forward + backward, and reports `ru_maxrss` after it minus the baseline. That is the growth of the
process's peak resident set during the first call: activations/cache, gradients, temporaries, and
any lazily allocated library state (torch's first-call allocator and thread-pool setup included).
Inputs and parameters are in the baseline, not in the number. ru_maxrss is a high-water mark in KiB
(Linux), so the number is a peak, not what stays allocated afterwards. The child is started through
`/bin/sh -c '...; exit'`: Linux carries ru_maxrss across `execve`, so a child forked straight from
the (large) benchmark process would start with the parent's resident set as its high-water mark.
The last columns give the peak minus the VmRSS read at the baseline instead: when importing left a
transient peak above the baseline RSS (the observations below say how much), the ru_maxrss
difference is smaller than the growth over the baseline RSS by that amount.

{mem_table}
"""
    text += f"""
## Tooling

{tools}

## Observations (automatic)

""" + "\n".join("- " + n for n in notes) + "\n"
    old = path.read_text() if path.exists() else ""
    # the sections of benchmarks/torch_cpu.py, fused_cpu.py and rnn_gpu.py are theirs: kept as they are
    kept = [i for i in (old.find("\n<!-- torch-cpu:begin -->"), old.find("\n<!-- fused-cpu:begin -->"),
                        old.find("\n## GPU: ")) if i >= 0]
    path.write_text(text + (old[min(kept):] if kept else ""))


if __name__ == "__main__":
    sys.exit(main())
