#!/usr/bin/env python
"""Does a fused CPU path pay?  The generated NumPy module against the generated CuPy
module run on the CPU: its CUDA source compiled for the host with g++ (-O3 -march=native
-ffast-math, linked with glibc's libmvec, so the per-element loops are vectorized with
SIMD tanh/exp) under the NumPy stand-in for CuPy that the tests use (tests/host_cupy.py,
with its per-launch argument checks off).  Per step the fused path runs one C call for
all the elementwise work of forward, one for backward; the NumPy module runs a few
vectorized ufunc calls.  GEMMs are NumPy's (OpenBLAS) in both, with the CuPy module's
layout (W^T as a view, a fresh product array per step) on the fused side.

    python benchmarks/fused_cpu.py [--write]

Forward + backward ({"h": ones}), the PyTorch-convention cells, the sizes of
benchmarks/rnn_cpu.py, float32 and float64; the two alternate within each of 9 rounds
and the table gives the minimum of each (robust to a shared machine).  ``--write`` puts
the table into benchmarks/RESULTS.md (its own section).
"""

import argparse
import datetime
import importlib.util
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import host_cupy  # noqa: E402  (the tests' NumPy stand-in for CuPy)

CELLS = ("rnn_tanh_torch", "lstm_torch", "gru_torch")
SIZES = {"small": (50, 16, 32, 32), "medium": (100, 32, 256, 256), "large": (50, 64, 512, 512)}
FLAGS = ("-O3", "-march=native", "-ffast-math")
LIBS = ("-lmvec",) if sys.platform.startswith("linux") else ()  # glibc's vector math (tanh, exp)
BEGIN, END = "<!-- fused-cpu:begin -->", "<!-- fused-cpu:end -->"


def load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def measure(rounds: int = 9) -> tuple[list[str], dict[str, list[float]]]:
    """The table rows, and fused / NumPy per size."""
    rows = ["| cell | size (T,B,I=H) | dtype | NumPy module ms | fused host C ms | fused / NumPy |", "|---|---|---|---|---|---|"]
    print("\n".join(rows), flush=True)
    ratios: dict[str, list[float]] = {size: [] for size in SIZES}
    with tempfile.TemporaryDirectory(prefix="symrnn-fused-") as tmp:
        cp = host_cupy.host_cupy(Path(tmp), FLAGS, LIBS, checked=False)
        for cell in CELLS:
            numpy_module = load(ROOT / "generated" / f"{cell}_numpy.py", f"{cell}_numpy")
            fused = load(ROOT / "generated" / f"{cell}_cupy.py", f"{cell}_cupy")
            fused.cp = cp  # the module's CuPy binding, as its _cupy() would set it
            for size, (T, B, I, H) in SIZES.items():
                for dtype in (np.float32, np.float64):
                    params = numpy_module.init_params(I, H, dtype=dtype)
                    x = np.random.default_rng(0).standard_normal((T, B, I)).astype(dtype)
                    ones = {"h": np.ones((T, B, H), dtype)}
                    runs = []
                    for module in (numpy_module, fused):
                        def run(module=module):
                            outputs, cache = module.forward(params, x)
                            return outputs, module.backward(params, cache, ones)
                        runs.append(run)
                    (_, grads_a), (_, grads_b) = runs[0](), runs[1]()  # warm-up, and the same numbers
                    tol = 1e-4 if dtype == np.float32 else 1e-10
                    for k in grads_a:
                        err = np.linalg.norm(grads_a[k] - grads_b[k]) / max(np.linalg.norm(grads_a[k]), 1e-300)
                        assert err < tol, f"{cell} {size} {np.dtype(dtype).name}: gradient {k} differs by {err:.1e}"
                    best = [float("inf")] * 2
                    for _ in range(rounds):
                        for i, run in enumerate(runs):
                            start = time.perf_counter()
                            run()
                            best[i] = min(best[i], time.perf_counter() - start)
                    ratios[size].append(best[1] / best[0])
                    rows.append(f"| {cell} | {size} ({T},{B},{H}) | {np.dtype(dtype).name} | {best[0] * 1e3:.2f} | "
                                f"{best[1] * 1e3:.2f} | {best[1] / best[0]:.2f} |")
                    print(rows[-1], flush=True)
    return rows, ratios


def summary(ratios: dict[str, list[float]]) -> str:
    return "fused / NumPy: " + "; ".join(f"{size} {min(r):.2f} to {max(r):.2f}" for size, r in ratios.items()) + "."


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--write", action="store_true", help="write the table into benchmarks/RESULTS.md")
    args = ap.parse_args()
    rows, ratios = measure()
    print(summary(ratios))
    if args.write:
        import numpy
        when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        section = "\n".join([
            BEGIN,
            "## Fused CPU path: the CUDA per-element code compiled for the host",
            "",
            f"`python benchmarks/fused_cpu.py --write` ({when}; {platform.processor() or platform.machine()}, "
            f"Python {platform.python_version()}, NumPy {numpy.__version__}, g++ {' '.join(FLAGS + LIBS)}). "
            "Minimum over 9 alternating rounds. The fused side is the CuPy module's CUDA source compiled for the "
            "host: one vectorized C call per step for all the elementwise work (SIMD tanh/exp from libmvec), "
            "NumPy's GEMMs in the CuPy module's layout, and the Python orchestration of the CuPy module "
            "(argument packing per launch, a fresh product array per step).",
            "",
            *rows,
            "",
            summary(ratios),
            END,
        ])
        path = ROOT / "benchmarks" / "RESULTS.md"
        text = path.read_text()
        if BEGIN in text:
            text = text[:text.index(BEGIN)] + section + text[text.index(END) + len(END):]
        else:
            gpu = text.find("\n## GPU: ")
            text = (text[:gpu] + "\n" + section + "\n" + text[gpu:]) if gpu >= 0 else text + "\n" + section + "\n"
        path.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
