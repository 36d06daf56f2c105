#!/usr/bin/env python
"""A/B of two folders of generated torch modules on packed batches of varied lengths.

    git archive OLD generated | tar -x -C /tmp/old       # the old folder: generated/ of a commit
    python benchmarks/compare_packed.py /tmp/old/generated generated [--cells a,b] [--rounds N]

One forward + backward of ``RNN(H, H)`` (one layer, one direction) on a ``PackedSequence``
(``enforce_sorted=False``) of B = 32 sequences, T = 100, I = H = 256, lengths drawn uniformly
from [1, T] (one of T), float32, one thread (OPENBLAS_NUM_THREADS and torch), from both
folders, alternating within each round in one process, after a warm-up round; the loss is the
sum of the packed output and of h_n.  The table gives the median of each, new/old, and the
range of new/old over the rounds.  Written for the variable-lengths work (issue 13): the
kernels' own lengths (one call per layer) against the torch module's former per-length chunks.
"""

import argparse
import gc
import importlib.util
import os
import statistics
import sys
import time

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"

import torch  # noqa: E402
from torch.nn.utils.rnn import pack_padded_sequence  # noqa: E402

T, B, H = 100, 32, 256


def load(folder: str, cell: str):
    """``<cell>_torch`` of ``folder``, with the ``<cell>_numpy`` beside it (each folder's own)."""
    for name in [n for n in sys.modules if n.startswith(cell)]:
        del sys.modules[name]
    spec = importlib.util.spec_from_file_location(f"{cell}_torch", os.path.join(folder, f"{cell}_torch.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module._BACKENDS.clear()
    module._backend(torch.device("cpu"))  # binds this folder's kernels now
    for name in [n for n in sys.modules if n.startswith(cell)]:
        del sys.modules[name]
    return module


def run_once(net, x, lengths) -> float:
    x = x.clone().requires_grad_(True)
    t0 = time.perf_counter()
    out, h = net(pack_padded_sequence(x, lengths, enforce_sorted=False))
    h_n = h[0] if isinstance(h, tuple) else h
    (out.data.sum() + h_n.sum()).backward()
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--cells", default="lstm_torch,gru_torch,indrnn,mgu")
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print("| cell | old ms | new ms | new/old | per round (min-max) |")
    print("|---|---|---|---|---|")
    for cell in args.cells.split(","):
        nets = []
        for folder in (args.old, args.new):
            module = load(folder, cell)
            torch.manual_seed(1)
            nets.append(module.RNN(H, H))
        torch.manual_seed(0)
        x = torch.randn(T, B, H)
        lengths = torch.randint(1, T + 1, (B,))
        lengths[0] = T
        times = [[], []]
        gc.disable()
        try:
            for r in range(args.rounds + 1):
                for i in ((0, 1) if r % 2 else (1, 0)):
                    t = run_once(nets[i], x, lengths)
                    if r:  # the first round warms up
                        times[i].append(t)
        finally:
            gc.enable()
        old, new = (statistics.median(t) for t in times)
        ratios = sorted(b / a for a, b in zip(*times))
        print(f"| {cell} | {old * 1e3:.1f} | {new * 1e3:.1f} | {new / old:.2f} | {ratios[0]:.2f}-{ratios[-1]:.2f} |",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
