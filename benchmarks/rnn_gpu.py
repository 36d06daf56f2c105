#!/usr/bin/env python
"""GPU benchmark: symrnn's generated CuPy LSTM and GRU against torch's cuDNN nn.LSTM / nn.GRU.

    python benchmarks/rnn_gpu.py [--rounds N] [--tf32] [--write]
    python benchmarks/rnn_gpu.py --record-tests PYTEST_LOG      (used by .ci/gpu)

Not a test: it times, on the first CUDA device, in float32 and at the sizes below
(I = H), the median over rounds of

* one forward, and one forward + backward (every parameter gradient, x, h0 and c0;
  grad_outputs {"h": ones}) of ``generated/lstm_torch_cupy.py`` and ``gru_torch_cupy.py``;
* the same with ``torch.nn.LSTM`` / ``nn.GRU`` on cuDNN, same weights, ``x``, ``h0``
  (and ``c0``) requiring grad, ``out.backward(ones)``;

each sample between two device synchronizations, implementations alternating within
every round, one warm-up round discarded.  It also reports the largest relative
difference between the two libraries' gradients (they compute the same function).
Both sides run in strict float32 unless ``--tf32`` (then cuDNN may use TF32 tensor
cores and CuPy's GEMMs too, CUPY_TF32=1).

``--write`` replaces this run's block of the GPU section of benchmarks/RESULTS.md
(device, versions, table); ``--record-tests`` writes the block that records the
``pytest -m gpu`` run whose output is in PYTEST_LOG.  Needs CuPy, torch with CUDA
and a GPU; installs nothing.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "RESULTS.md"
SIZES = ((100, 64, 512), (50, 256, 1024))  # (T, B, H), I = H
CELLS = (("lstm_torch", "LSTM"), ("gru_torch", "GRU"))


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def block(text: str, key: str, body: str) -> str:
    """``text`` with the block between the markers of ``key`` replaced by ``body``."""
    begin, end = f"<!-- gpu:{key}:begin -->", f"<!-- gpu:{key}:end -->"
    if begin not in text or end not in text:
        raise SystemExit(f"{RESULTS} has no '{begin}' ... '{end}' block; restore its GPU section")
    head, rest = text.split(begin, 1)
    return head + begin + "\n" + body.rstrip("\n") + "\n" + end + rest.split(end, 1)[1]


def environment(cp, torch=None) -> list[str]:
    props = cp.cuda.runtime.getDeviceProperties(0)
    name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    lines = [
        f"- **Date:** {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        f"- **Device:** {name} (compute capability {props['major']}.{props['minor']}, "
        f"{props['totalGlobalMem'] / 2**30:.0f} GiB), driver {cp.cuda.runtime.driverGetVersion()}, "
        f"CUDA runtime {cp.cuda.runtime.runtimeGetVersion()}",
        f"- **CuPy** {cp.__version__}, **NumPy** {__import__('numpy').__version__}, "
        f"**Python** {platform.python_version()}",
    ]
    if torch is not None:
        lines.append(f"- **torch** {torch.__version__} (CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()})")
    return lines


def record_tests(log_path: Path) -> None:
    import cupy as cp

    text = log_path.read_text(errors="replace")
    summary = [line for line in text.splitlines() if re.search(r"\b(passed|failed|error)\b", line)]
    body = [
        "Last run of the GPU tests (`bash .ci/gpu`): CuPy vs NumPy module for every built-in cell "
        "(float64 1e-10, float32 1e-4), finite differences in float64, bit-identical reruns; torch CUDA "
        "tensors through the CuPy modules vs nn.LSTM / nn.GRU (cuDNN); every CUDA source through NVRTC.",
        "",
        *environment(cp),
        f"- **Result:** `{summary[-1].strip(' =') if summary else 'no summary line in the log'}`",
    ]
    RESULTS.write_text(block(RESULTS.read_text(), "tests", "\n".join(body)))
    log(f"recorded the GPU test run in {RESULTS}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--tf32", action="store_true", help="allow TF32 in cuDNN and CuPy (default: strict float32)")
    ap.add_argument("--write", action="store_true", help="write this run's table into benchmarks/RESULTS.md")
    ap.add_argument("--record-tests", type=Path, metavar="PYTEST_LOG")
    args = ap.parse_args()
    if args.tf32:
        os.environ["CUPY_TF32"] = "1"  # read when cupy is imported
    if args.record_tests:
        record_tests(args.record_tests)
        return 0

    import cupy as cp
    import numpy as np
    import torch

    if not torch.cuda.is_available() or not torch.backends.cudnn.is_available():
        raise SystemExit("torch has no CUDA device or no cuDNN here")
    torch.backends.cudnn.enabled = True
    torch.backends.cudnn.allow_tf32 = args.tf32
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    sys.path.insert(0, str(ROOT))
    import importlib

    def sync():
        cp.cuda.runtime.deviceSynchronize()
        torch.cuda.synchronize()

    rows = []
    for cell, torch_name in CELLS:
        module = importlib.import_module(f"generated.{cell}_cupy")
        for T, B, H in SIZES:
            log(f"{cell} T={T} B={B} H={H}")
            params = module.init_params(H, H, seed=0, dtype=np.float32)
            rng = np.random.default_rng(1)
            x_np = rng.standard_normal((T, B, H)).astype(np.float32)
            states = ("h", "c") if "c" in module.STATES else ("h",)
            s0_np = {s: (0.5 * rng.standard_normal((B, H))).astype(np.float32) for s in states}
            x, state0 = cp.asarray(x_np), {s: cp.asarray(v) for s, v in s0_np.items()}
            go = {"h": cp.ones((T, B, H), np.float32)}

            ref = getattr(torch.nn, torch_name)(H, H).cuda()
            with torch.no_grad():
                for name, p in ref.named_parameters():
                    p.copy_(torch.as_tensor(cp.asnumpy(params[name]), device="cuda"))
            tx = torch.as_tensor(x_np, device="cuda").requires_grad_()
            ts0 = [torch.as_tensor(s0_np[s][None], device="cuda").requires_grad_() for s in states]
            hx = tuple(ts0) if len(ts0) == 2 else ts0[0]
            tgo = torch.ones((T, B, H), device="cuda")

            def cupy_fwd():
                return module.forward(params, x, state0)

            def cupy_fwd_bwd():
                out, cache = module.forward(params, x, state0)
                return module.backward(params, cache, go)

            def torch_fwd():
                return ref(tx, hx)

            def torch_fwd_bwd():
                for t in [tx, *ts0, *ref.parameters()]:
                    t.grad = None
                out, _ = ref(tx, hx)
                out.backward(tgo)

            impls = {"cupy fwd": cupy_fwd, "cudnn fwd": torch_fwd, "cupy fwd+bwd": cupy_fwd_bwd, "cudnn fwd+bwd": torch_fwd_bwd}
            times = {k: [] for k in impls}
            for r in range(args.rounds + 1):
                keys = list(impls)[r % len(impls):] + list(impls)[:r % len(impls)]
                for k in keys:
                    sync()
                    t0 = time.perf_counter()
                    impls[k]()
                    sync()
                    if r:  # round 0: warm-up (NVRTC compile, cuDNN plans, memory pools)
                        times[k].append(time.perf_counter() - t0)
            med = {k: 1e3 * statistics.median(v) for k, v in times.items()}
            grads = cupy_fwd_bwd()
            torch_fwd_bwd()
            pairs = [(grads[n], p.grad) for n, p in ref.named_parameters()] + [(grads["x"], tx.grad)]
            pairs += [(grads[f"{s}0"], t.grad[0]) for s, t in zip(states, ts0)]
            diff = max(float(cp.abs(a - cp.asarray(b)).max() / max(float(cp.abs(cp.asarray(b)).max()), 1e-30)) for a, b in pairs)
            rows.append((cell, T, B, H, med["cupy fwd"], med["cudnn fwd"], med["cupy fwd+bwd"], med["cudnn fwd+bwd"], diff))

    mode = "tf32" if args.tf32 else "fp32"
    table = [
        "| cell | T | B | I=H | CuPy fwd (ms) | cuDNN fwd (ms) | CuPy fwd+bwd (ms) | cuDNN fwd+bwd (ms) | CuPy / cuDNN (fwd+bwd) | max rel. diff of gradients |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for cell, T, B, H, cf, tf, cfb, tfb, diff in rows:
        table.append(f"| {cell} | {T} | {B} | {H} | {cf:.2f} | {tf:.2f} | {cfb:.2f} | {tfb:.2f} | {cfb / tfb:.2f}x | {diff:.1e} |")
    print("\n".join(table))
    if args.write:
        body = [
            f"`python benchmarks/rnn_gpu.py{' --tf32' if args.tf32 else ''} --write` -- float32"
            + (" with TF32 allowed in cuDNN and CuPy" if args.tf32 else " (TF32 off in both)")
            + f", median of {args.rounds} rounds after one warm-up round.",
            "",
            *environment(cp, torch),
            "",
            *table,
        ]
        RESULTS.write_text(block(RESULTS.read_text(), f"bench-{mode}", "\n".join(body)))
        log(f"wrote the {mode} table into {RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
