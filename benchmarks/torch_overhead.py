#!/usr/bin/env python
"""Where the torch module's own time goes (the adapter around the kernels), one layer.

    python benchmarks/torch_overhead.py [--cell indrnn] [--dtype float32] [--calls 30]

Runs benchmarks/torch_cpu.py's symrnn call (``out, _ = rnn(x, hx); out.backward(ones)``) with
timers around the parts of the module's glue and prints the medians over ``--calls`` calls (gc
off, one thread): RNN.forward outside Function.apply, torch's Function.apply outside our
Function.forward, Function.forward outside the kernels' forward, the autograd engine before and
after our Function.backward, Function.backward outside the kernels' backward.  Then the glue's
total on a tiny problem (T=2, B=2, I=H=4), as it is and with 64 MB read before each kernel call
(caches cold, as after the kernels of a real size): how much of the glue's time is cold caches.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time

import torch_cpu as tc  # noqa: E402  (sets the thread variables first)
import numpy as np  # noqa: E402
import torch  # noqa: E402


def parts(cell: str, dtype: str, size: str, calls: int, sweep=None) -> dict[str, float]:
    """Median seconds of each part of the glue over ``calls`` calls."""
    step, _ = tc.symrnn_impl(cell, size, dtype)
    module = sys.modules[f"generated.{cell}_torch"]
    timed = module._backend(torch.device("cpu")).kernels  # torch_cpu.TimedKernels
    kernels = timed.kernels
    marks: dict[str, float] = {}

    def stamp(name, f):
        def wrapped(*args):
            marks[name + "0"] = time.perf_counter()
            try:
                return f(*args)
            finally:
                marks[name + "1"] = time.perf_counter()
        return wrapped

    class Kernels:
        def __getattr__(self, name):
            return getattr(kernels, name)

        def forward(self, *args):
            if sweep is not None:
                sweep.sum()
            return stamp("kf", kernels.forward)(*args)

        def backward(self, *args):
            if sweep is not None:
                sweep.sum()
            return stamp("kb", kernels.backward)(*args)

    timed.kernels = Kernels()
    forward, backward, apply = module.Function.forward, module.Function.backward, module.Function.apply
    module.Function.forward = staticmethod(stamp("ff", forward))
    module.Function.backward = staticmethod(stamp("fb", backward))
    module.Function.apply = stamp("fa", apply)
    rnn_forward = module.RNN.forward
    module.RNN.forward = stamp("rf", rnn_forward)
    own = tc.ADAPTER[(cell, size, dtype)]
    rows = []
    gc.disable()
    try:
        for i in range(calls + 3):
            marks.clear()
            step()
            t_end = time.perf_counter()
            m = marks
            rows.append({
                "RNN.forward outside Function.apply": (m["rf1"] - m["rf0"]) - (m["fa1"] - m["fa0"]),
                "Function.apply outside Function.forward": (m["fa1"] - m["fa0"]) - (m["ff1"] - m["ff0"]),
                "Function.forward outside the kernels": (m["ff1"] - m["ff0"]) - (m["kf1"] - m["kf0"]),
                "autograd engine around Function.backward": (m["fb0"] - m["rf1"]) + (t_end - m["fb1"]),
                "Function.backward outside the kernels": (m["fb1"] - m["fb0"]) - (m["kb1"] - m["kb0"]),
            })
    finally:
        gc.enable()
        module.Function.forward, module.Function.backward = staticmethod(forward), staticmethod(backward)
        module.Function.apply, module.RNN.forward, timed.kernels = apply, rnn_forward, kernels
    rows = rows[3:]
    out = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    out["the adapter's own time (torch_cpu.py's measure)"] = statistics.median(a for a, _ in own[-calls:])
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cell", default="indrnn")
    ap.add_argument("--dtype", default="float32", choices=list(tc.DTYPES))
    ap.add_argument("--calls", type=int, default=30)
    args = ap.parse_args()
    torch.set_num_threads(1)
    T, B, I, H = tc.SIZES["medium"]
    print(f"{args.cell}, {args.dtype}, medium (T={T}, B={B}, I=H={H}), medians over {args.calls} calls:")
    # the ones of a call's backward, as torch_cpu.py's symrnn call: rnn(x, hx); out.backward(ones)
    for name, seconds in parts(args.cell, args.dtype, "medium", args.calls).items():
        print(f"  {name:48s} {seconds * 1e3:6.3f} ms")
    tc.SIZES["tiny"] = (2, 2, 4, 4)
    warm = parts(args.cell, args.dtype, "tiny", args.calls * 3)
    cold = parts(args.cell, args.dtype, "tiny", args.calls * 3, sweep=np.ones(8 * 2**20))
    key = "the adapter's own time (torch_cpu.py's measure)"
    print(f"tiny (T=2, B=2, I=H=4): the adapter's own time {warm[key] * 1e3:.3f} ms; with 64 MB read before each "
          f"kernel call (cold caches) {cold[key] * 1e3:.3f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
