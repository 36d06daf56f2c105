#!/usr/bin/env python
"""CPU benchmark of the generated torch modules (generated/<cell>_torch.py).

    python benchmarks/torch_cpu.py [--quick] [--rounds N] [--write]

One forward + backward (a cotangent of ones on the layer's output; every parameter gradient,
the input and the initial states) at the sizes of benchmarks/rnn_cpu.py, float32 and float64,
of

* **symrnn torch**: ``generated.<cell>_torch.RNN(I, H)``, ``out, _ = rnn(x, hx); out.backward(ones)``
  with ``x`` and ``hx`` requiring grad (parameter and input gradients reset to None each call);
* **bare NumPy**: the same cell's ``generated.<cell>_numpy`` module, ``forward(params, x, state0)``
  then ``backward(None, cache, {output: ones})``: what the torch module runs; the ratio is the
  adapter's overhead;
* **torch**: ``torch.nn.RNN(tanh)`` / ``nn.LSTM`` / ``nn.GRU`` for the cells in torch's convention,
  with the same weights;
* **torch eager**: for the custom cells (mgu, indrnn, lstm_peephole), the same equations written
  by hand in torch as one would write them: the input-side products of all steps as one matrix
  product before the loop, per step one recurrent product and the elementwise work, autograd
  for the backward (tests/test_spec_torch.py holds the reference equations).

The implementations alternate within each round, the order rotating from round to round, after a
warm-up round; rounds during which other processes took CPU are redone (benchmarks/rnn_cpu.py's
LoadGuard). Reported: the median over the rounds, the per-round range of the ratio, and each
ratio's target. NumPy's BLAS and torch run with the same number of threads, ``--threads`` (default
1). ``--write`` replaces this script's section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import math
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]


def _threads(argv) -> int:
    """--threads N (default 1), read before NumPy and torch start their thread pools."""
    for i, arg in enumerate(argv):
        if arg == "--threads" and i + 1 < len(argv):
            return int(argv[i + 1])
        if arg.startswith("--threads="):
            return int(arg.split("=", 1)[1])
    return 1


THREADS = _threads(sys.argv[1:])
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = str(THREADS)

import numpy as np  # noqa: E402
import torch  # noqa: E402

import rnn_cpu  # noqa: E402  (settle, LoadGuard, machine_info: one way of measuring for both scripts)

TORCH_CELLS = {"rnn_tanh_torch": "RNN", "lstm_torch": "LSTM", "gru_torch": "GRU"}
CUSTOM_CELLS = ("mgu", "indrnn", "lstm_peephole")
SIZES = rnn_cpu.SIZES
DTYPES = {"float32": torch.float32, "float64": torch.float64}
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
BEGIN, END = "<!-- torch-cpu:begin -->", "<!-- torch-cpu:end -->"
TARGET_SAMPLE_S = 0.05
LIBRARY = {"symrnn": "openblas", "numpy": "openblas", "torch": "torch", "eager": "torch"}
#: the targets: adapter overhead at this size, and custom cells against torch eager everywhere
OVERHEAD_SIZE, MAX_OVERHEAD, MIN_SPEEDUP = "medium", 1.05, 2.0


# --------------------------------------------------------------------------- implementations
def make_inputs(cell, size, dtype_name, seed=0):
    """The torch module (weights from the NumPy module's init_params), NumPy params, x, initial states."""
    import importlib

    T, B, I, H = SIZES[size]
    kernels = importlib.import_module(f"generated.{cell}_numpy")
    module = importlib.import_module(f"generated.{cell}_torch")
    np_dtype = np.float32 if dtype_name == "float32" else np.float64
    params = kernels.init_params(I, H, seed=seed, dtype=np_dtype)
    rng = np.random.default_rng(seed + 1)
    x = rng.standard_normal((T, B, I)).astype(np_dtype)
    state0 = {name: (0.1 * rng.standard_normal((B, H))).astype(np_dtype) for name in kernels.STATES}
    return kernels, module, params, x, state0


class TimedKernels:
    """The NumPy module as the torch module calls it, timing its calls (``spent``: seconds inside
    forward and backward since the last reset), so that the adapter's own time is the rest."""

    def __init__(self, kernels):
        self.kernels, self.spent = kernels, 0.0

    def __getattr__(self, name):
        return getattr(self.kernels, name)

    def forward(self, *args):
        t0 = time.perf_counter()
        try:
            return self.kernels.forward(*args)
        finally:
            self.spent += time.perf_counter() - t0

    def backward(self, *args):
        t0 = time.perf_counter()
        try:
            return self.kernels.backward(*args)
        finally:
            self.spent += time.perf_counter() - t0


ADAPTER = {}  # (cell, size, dtype) -> the adapter's own seconds of each timed call of symrnn_impl


def symrnn_impl(cell, size, dtype_name):
    kernels, module, params, x, state0 = make_inputs(cell, size, dtype_name)
    T, B, I, H = SIZES[size]
    backend = module._backend(torch.device("cpu"))
    if not isinstance(backend.kernels, TimedKernels):
        backend.kernels = TimedKernels(backend.kernels)
    timed_kernels = backend.kernels
    own = ADAPTER.setdefault((cell, size, dtype_name), [])
    rnn = module.RNN(I, H, dtype=DTYPES[dtype_name])
    with torch.no_grad():
        for name in module.PARAMETERS:
            getattr(rnn, rnn._name(name, 0, 0)).copy_(torch.from_numpy(params[name]))
    xt = torch.from_numpy(x.copy()).requires_grad_(True)
    hx = [torch.from_numpy(state0[s][None].copy()).requires_grad_(True) for s in module.STATES]
    leaves = [xt, *hx, *rnn.parameters()]
    hx = hx[0] if len(hx) == 1 else tuple(hx)
    ones = None

    def step():
        nonlocal ones
        for leaf in leaves:
            leaf.grad = None
        timed_kernels.spent = 0.0
        t0 = time.perf_counter()
        out, _ = rnn(xt, hx)
        t1 = time.perf_counter()
        if ones is None:
            ones = torch.ones_like(out)
        out.backward(ones)
        t2 = time.perf_counter()
        own.append((t2 - t0 - timed_kernels.spent, timed_kernels.spent))
        return t1 - t0, t2 - t1

    def grads():
        g = {name: getattr(rnn, rnn._name(name, 0, 0)).grad.numpy() for name in module.PARAMETERS}
        g["x"] = xt.grad.numpy()
        return g

    return step, grads


def numpy_impl(cell, size, dtype_name):
    kernels, module, params, x, state0 = make_inputs(cell, size, dtype_name)
    grad_outputs = {}
    last = {}

    def step():
        t0 = time.perf_counter()
        outputs, cache = kernels.forward(params, x, state0)
        t1 = time.perf_counter()
        if not grad_outputs:
            grad_outputs[module.LAYER_OUTPUT] = np.ones_like(outputs[module.LAYER_OUTPUT])
        last["grads"] = kernels.backward(None, cache, grad_outputs)
        del outputs, cache  # freed inside the timing, as the torch module's backward frees its cache
        return t1 - t0, time.perf_counter() - t1

    return step, lambda: last["grads"]


def torch_impl(cell, size, dtype_name):
    """torch.nn.RNN / LSTM / GRU with the same weights."""
    kernels, module, params, x, state0 = make_inputs(cell, size, dtype_name)
    T, B, I, H = SIZES[size]
    kwargs = {"nonlinearity": "tanh"} if cell == "rnn_tanh_torch" else {}
    net = getattr(torch.nn, TORCH_CELLS[cell])(I, H, dtype=DTYPES[dtype_name], **kwargs)
    net.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in params.items()})
    xt = torch.from_numpy(x.copy()).requires_grad_(True)
    hx = [torch.from_numpy(state0[s][None].copy()).requires_grad_(True) for s in kernels.STATES]
    leaves = [xt, *hx, *net.parameters()]
    hx = hx[0] if len(hx) == 1 else tuple(hx)
    ones = torch.ones(T, B, H, dtype=DTYPES[dtype_name])

    def step():
        for leaf in leaves:
            leaf.grad = None
        t0 = time.perf_counter()
        out, _ = net(xt, hx)
        t1 = time.perf_counter()
        out.backward(ones)
        return t1 - t0, time.perf_counter() - t1

    def grads():
        g = {name: p.grad.numpy() for name, p in net.named_parameters()}
        g["x"] = xt.grad.numpy()
        return g

    return step, grads


def _eager_mgu(p, xs, s, H):
    W_fh, W_fx = p["W_f"][:, :H], p["W_f"][:, H:]
    W_hh, W_hx = p["W_h"][:, :H], p["W_h"][:, H:]
    f_in = xs @ W_fx.T + p["b_f"]  # every step at once
    h_in = xs @ W_hx.T + p["b_h"]
    h, hs = s["h"], []
    for t in range(xs.shape[0]):
        f = torch.sigmoid(f_in[t] + h @ W_fh.T)
        h_tilde = torch.tanh(h_in[t] + (f * h) @ W_hh.T)
        h = (1 - f) * h + f * h_tilde
        hs.append(h)
    return torch.stack(hs) @ p["V"].T + p["b_y"]  # the readout, y = V h + b_y


def _eager_indrnn(p, xs, s, H):
    pre = xs @ p["W"].T + p["b"]
    h, hs = s["h"], []
    for t in range(xs.shape[0]):
        h = torch.relu(pre[t] + p["u"] * h)
        hs.append(h)
    return torch.stack(hs)


def _eager_lstm_peephole(p, xs, s, H):
    gates = ("W_i", "W_f", "W_g", "W_o")
    W_h = torch.cat([p[g][:, :H] for g in gates])  # (4H, H): one recurrent product per step
    x_in = xs @ torch.cat([p[g][:, H:] for g in gates]).T + torch.cat([p["b_i"], p["b_f"], p["b_g"], p["b_o"]])
    h, c, hs = s["h"], s["c"], []
    for t in range(xs.shape[0]):
        a = x_in[t] + h @ W_h.T
        i = torch.sigmoid(a[:, :H] + p["p_i"] * c)
        f = torch.sigmoid(a[:, H:2 * H] + p["p_f"] * c)
        g = torch.tanh(a[:, 2 * H:3 * H])
        c = f * c + i * g
        o = torch.sigmoid(a[:, 3 * H:] + p["p_o"] * c)
        h = o * torch.tanh(c)
        hs.append(h)
    return torch.stack(hs)


EAGER = {"mgu": _eager_mgu, "indrnn": _eager_indrnn, "lstm_peephole": _eager_lstm_peephole}


def eager_impl(cell, size, dtype_name):
    """The custom cell written by hand in torch eager."""
    kernels, module, params, x, state0 = make_inputs(cell, size, dtype_name)
    H = SIZES[size][3]
    p = {k: torch.from_numpy(v.copy()).requires_grad_(True) for k, v in params.items()}
    xt = torch.from_numpy(x.copy()).requires_grad_(True)
    s = {k: torch.from_numpy(v.copy()).requires_grad_(True) for k, v in state0.items()}
    leaves = [xt, *s.values(), *p.values()]
    run = EAGER[cell]
    ones = None

    def step():
        nonlocal ones
        for leaf in leaves:
            leaf.grad = None
        t0 = time.perf_counter()
        out = run(p, xt, s, H)
        t1 = time.perf_counter()
        if ones is None:
            ones = torch.ones_like(out)
        out.backward(ones)
        return t1 - t0, time.perf_counter() - t1

    def grads():
        g = {k: v.grad.numpy() for k, v in p.items()}
        g["x"] = xt.grad.numpy()
        return g

    return step, grads


FACTORIES = {"symrnn": symrnn_impl, "numpy": numpy_impl, "torch": torch_impl, "eager": eager_impl}


# --------------------------------------------------------------------------- timing
def bench_config(cell, size, dtype_name, names, rounds, guard):
    """{name: {"total": median s, "samples": [...]}, "pairs": {(a, b): sorted per-round a/b}, "parity": ...}."""
    steps, grads = {}, {}
    for name in names:
        steps[name], grads[name] = FACTORIES[name](cell, size, dtype_name)
    reps = {}
    for name in names:  # warm-up, and the repetitions per sample
        rnn_cpu.settle()
        rnn_cpu.timed(steps[name], 1)
        f, b = rnn_cpu.timed(steps[name], 1)
        reps[name] = max(1, min(200, math.ceil(TARGET_SAMPLE_S / max(f + b, 1e-9))))
    ref = grads["numpy"]()
    parity = {}
    for name in names:
        if name != "numpy":
            got = grads[name]()
            parity[name] = rnn_cpu.rel_diff(got, {key: ref[key] for key in got})
    records = []
    gc.collect()
    gc.disable()
    previous = None
    try:
        while True:
            clean = [r for r in records if r[1] < guard.THRESHOLD]
            if len(clean) >= rounds or (len(records) >= rounds and (guard.exhausted or len(records) >= 3 * rounds)):
                break
            if records and records[-1][1] >= guard.THRESHOLD:
                guard.wait_quiet()
                previous = None
            k = len(records) % len(names)
            s0 = guard.snap()
            samples = {}
            for name in names[k:] + names[:k]:
                if previous is not None and LIBRARY[previous] != LIBRARY[name]:
                    rnn_cpu.settle()
                f, b = rnn_cpu.timed(steps[name], reps[name])
                samples[name] = f + b
                previous = name
            s1 = guard.snap()
            if len(records) >= rounds:
                guard.spent_s += s1[0] - s0[0]
            records.append((samples, guard.load(s0, s1)[0]))
    finally:
        gc.enable()
    clean = [r for r in records if r[1] < guard.THRESHOLD]
    used = clean if len(clean) >= min(3, rounds) else records
    result = {"parity": parity, "rounds": len(used), "contaminated": used is records and len(clean) < len(records)}
    for name in names:
        result[name] = statistics.median(r[0][name] for r in used)
    result["pairs"] = {(a, b): sorted(r[0][a] / r[0][b] for r in used) for a in names for b in names if a != b}
    own = ADAPTER.pop((cell, size, dtype_name), [])[-20 * rounds:]  # the adapter's own time in single calls
    result["adapter"] = (statistics.median(a for a, _ in own), statistics.median(a / k for a, k in own)) if own else None
    return result


# --------------------------------------------------------------------------- report
def fmt_ms(s):
    ms = s * 1e3
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def table(rows):
    head = ["cell", "size (T,B,I=H)", "dtype", "symrnn torch ms", "bare NumPy ms", "torch/NumPy (overhead)",
            "per round (min-max)", "adapter's own ms (% of the kernels')", "baseline", "baseline ms",
            "baseline/symrnn (speed-up)", "per round (min-max)", "grad diff vs NumPy"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (cell, size, dt), r in rows:
        T, B, I, H = SIZES[size]
        base = "torch" if cell in TORCH_CELLS else "eager"
        label = f"nn.{TORCH_CELLS[cell]}" if base == "torch" else "torch eager"
        over = r["pairs"][("symrnn", "numpy")]
        speed = r["pairs"][(base, "symrnn")]
        diff = max(r["parity"].values())
        lines.append(f"| {cell} | {size} ({T},{B},{H}) | {dt} | {fmt_ms(r['symrnn'])} | {fmt_ms(r['numpy'])} | "
                     f"{r['symrnn'] / r['numpy']:.3f} | {over[0]:.2f}-{over[-1]:.2f} | "
                     f"{r['adapter'][0] * 1e3:.2f} ({100 * r['adapter'][1]:.1f}%) | {label} | {fmt_ms(r[base])} | "
                     f"{r[base] / r['symrnn']:.2f} | {speed[0]:.2f}-{speed[-1]:.2f} | {diff:.1e} |")
    return "\n".join(lines)


def verdicts(rows):
    """The targets, one line each: met or not, with the numbers."""
    lines = []
    over = [(k, r["symrnn"] / r["numpy"], statistics.median(r["pairs"][("symrnn", "numpy")]), 100 * r["adapter"][1])
            for k, r in rows if k[1] == OVERHEAD_SIZE]
    if over:
        worst = max(over, key=lambda item: item[2])
        ok = all(paired <= MAX_OVERHEAD for _, _, paired, _ in over)
        lines.append(f"- Adapter overhead at {OVERHEAD_SIZE} (T,B,I=H = {SIZES[OVERHEAD_SIZE][0]},{SIZES[OVERHEAD_SIZE][1]},"
                     f"{SIZES[OVERHEAD_SIZE][3]}), target at most {MAX_OVERHEAD:.2f}x the bare NumPy module (judged on the "
                     f"median of the per-round ratios): **{'met' if ok else 'not met'}** "
                     f"(worst: {'/'.join(worst[0])}); ratio of medians {min(o[1] for o in over):.3f} to "
                     f"{max(o[1] for o in over):.3f}; median of the per-round ratios "
                     f"{min(o[2] for o in over):.3f} to {max(o[2] for o in over):.3f}; the adapter's own time "
                     f"{min(o[3] for o in over):.1f}% to {max(o[3] for o in over):.1f}% of the kernels' time.")
    custom = [(k, r["eager"] / r["symrnn"]) for k, r in rows if k[0] in CUSTOM_CELLS]
    if custom:
        worst = min(custom, key=lambda item: item[1])
        ok = all(s >= MIN_SPEEDUP for _, s in custom)
        misses = [f"{'/'.join(k)} ({s:.2f}x)" for k, s in custom if s < MIN_SPEEDUP]
        lines.append(f"- Custom cells at least {MIN_SPEEDUP:.0f}x faster than the same cell in torch eager at every size: "
                     f"**{'met' if ok else 'not met'}**; speed-ups {worst[1]:.2f}x (lowest: {'/'.join(worst[0])}) to "
                     f"{max(s for _, s in custom):.2f}x" + (f"; below target: {', '.join(misses)}" if misses else "") + ".")
    torch_rows = [(k, r["torch"] / r["symrnn"]) for k, r in rows if k[0] in TORCH_CELLS]
    if torch_rows:
        lines.append(f"- Against torch's own nn.RNN/LSTM/GRU (no target; benchmarks/rnn_cpu.py compares the bare NumPy "
                     f"modules with them in detail): speed-ups {min(s for _, s in torch_rows):.2f}x to "
                     f"{max(s for _, s in torch_rows):.2f}x.")
    noisy = [k for k, r in rows if r["contaminated"]]
    if noisy:
        lines.append(f"- Rounds with other load had to be kept (the extra-time budget ran out) for: "
                     + ", ".join("/".join(k) for k in noisy) + ".")
    return "\n".join(lines)


def section(command, info, rows, seconds, rounds):
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"""{BEGIN}
## The torch modules on the CPU: adapter overhead, torch, torch eager

`{command}` ({now}; {seconds:.0f} s). Written by `benchmarks/torch_cpu.py`; re-run it instead of editing.
{info['cpu']}, {info['cores']} logical cores; Python {info['python']}, NumPy {info['numpy']} ({info['blas']}),
torch {torch.__version__} (`torch.set_num_threads({torch.get_num_threads()})`); environment: {info['env']}.

One forward + backward with a cotangent of ones on the layer's output. **symrnn torch**:
`generated.<cell>_torch.RNN(I, H)` (`out, _ = rnn(x, hx); out.backward(ones)`, x and hx requiring
grad); **bare NumPy**: `generated.<cell>_numpy` `forward` + `backward(None, cache, ...)`, what the
torch module runs (torch/NumPy is the adapter's overhead); **baseline**: `torch.nn.RNN(tanh)` /
`nn.LSTM` / `nn.GRU` with the same weights for the cells in torch's convention, and for the custom
cells the same equations written by hand in torch eager (input-side products of all steps hoisted
into one matrix product, autograd backward). Medians over {rounds} interleaved rounds (order rotating,
rounds with other load redone); "per round" is the range of the ratio within single rounds.
"adapter's own ms" is the time of one call of the torch module outside the kernels' forward and
backward (autograd, the conversions, the layer's bookkeeping), timed inside the same calls, median
over them, and its share of the kernels' time in those calls: the overhead without the noise of
comparing two separate runs. The last column is the largest relative gradient difference from the
bare NumPy module.

{table(rows)}

{verdicts(rows)}
{END}"""


def write(text):
    old = RESULTS.read_text() if RESULTS.exists() else ""
    if BEGIN in old:
        new = old[:old.index(BEGIN)] + text + old[old.index(END) + len(END):]
    elif "<!-- fused-cpu:begin -->" in old:
        i = old.index("<!-- fused-cpu:begin -->")
        new = old[:i] + text + "\n\n" + old[i:]
    else:
        new = old.rstrip("\n") + "\n\n" + text + "\n"
    RESULTS.write_text(new)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 rounds, the small and medium sizes in float32")
    ap.add_argument("--rounds", type=int, default=None, help="rounds per configuration (default 7; --quick: 3)")
    ap.add_argument("--sizes", help=f"comma-separated sizes (default: all of {', '.join(SIZES)})")
    ap.add_argument("--cells", help="comma-separated cells (default: all)")
    ap.add_argument("--threads", type=int, default=1,
                    help="threads of NumPy's BLAS and of torch, the same for both (default 1: on a shared 2-core "
                         "machine a second thread's speed depends on what else runs)")
    ap.add_argument("--write", action="store_true", help="replace this script's section of benchmarks/RESULTS.md")
    args = ap.parse_args(argv)
    torch.set_num_threads(THREADS)
    start = time.perf_counter()
    rounds = args.rounds or (3 if args.quick else 7)
    sizes = args.sizes.split(",") if args.sizes else ["small", "medium"] if args.quick else list(SIZES)
    dtypes = ["float32"] if args.quick else list(DTYPES)
    guard = rnn_cpu.LoadGuard(30.0 if args.quick else 240.0)
    rows = []
    for size in sizes:
        for dt in dtypes:
            for cell in (args.cells.split(",") if args.cells else (*TORCH_CELLS, *CUSTOM_CELLS)):
                names = ["symrnn", "numpy", "torch" if cell in TORCH_CELLS else "eager"]
                r = bench_config(cell, size, dt, names, rounds, guard)
                rows.append(((cell, size, dt), r))
                rnn_cpu.log(f"[{time.perf_counter() - start:6.1f}s] {cell:15s} {size:6s} {dt}: "
                            + ", ".join(f"{n} {fmt_ms(r[n])} ms" for n in names))
    command = "python benchmarks/torch_cpu.py" + (" --quick" if args.quick else "") + \
        (f" --rounds {args.rounds}" if args.rounds else "") + (f" --sizes {args.sizes}" if args.sizes else "") + \
        (f" --cells {args.cells}" if args.cells else "") + (f" --threads {THREADS}" if THREADS != 1 else "") + \
        (" --write" if args.write else "")
    text = section(command, rnn_cpu.machine_info(), rows, time.perf_counter() - start, rounds)
    print(text)
    if args.write:
        write(text)
        rnn_cpu.log(f"wrote {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
