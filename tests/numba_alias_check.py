"""Every kernel call of generated numba modules, checked for arrays that share memory.

    NUMBA_DISABLE_JIT=1 python tests/numba_alias_check.py [--sizes n_in,n_hidden,n_out] MODULE.py...

The kernels are compiled with noalias (their array arguments do not overlap, LLVM is told), so
the module must never hand one kernel two arrays that share memory.  With numba's JIT off the
kernels run as Python: each is wrapped to test every pair of its array arguments
(np.shares_memory) over forward and backward on a small random problem, without and with
lengths and reverse.  Prints one JSON list: [module, kernel, i, j] for each overlap found.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from symrnn.gradcheck import random_problem  # noqa: E402


def check(path: Path, sizes) -> list:
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    overlaps, calls = set(), 0

    def watched(name, kernel):
        def call(*args):
            nonlocal calls
            calls += 1
            arrays = [(i, a) for i, a in enumerate(args) if isinstance(a, np.ndarray)]
            for (i, a), (j, b) in itertools.combinations(arrays, 2):
                if np.shares_memory(a, b):
                    overlaps.add((path.name, name, i, j))
            return kernel(*args)
        return call

    for name in module.KERNELS:
        setattr(module, name, watched(name, getattr(module, name)))  # the loops look them up by name
    n_in, n_hidden, n_out = sizes
    for lengths, reverse in ((None, False), ([3, 1], False), ([2, 3], True)):
        pr = random_problem(module, T=3, B=2, seed=0, n_in=n_in, n_hidden=n_hidden, n_out=n_out)
        outputs, cache = module.forward(pr.params, pr.x, pr.state0, lengths=lengths, reverse=reverse)
        module.backward(pr.params, cache, pr.grad_outputs)
    if not calls:
        raise SystemExit(f"{path.name}: no kernel was called")
    return sorted(overlaps)


def main() -> None:
    if os.environ.get("NUMBA_DISABLE_JIT") != "1":
        sys.exit("run with NUMBA_DISABLE_JIT=1 (the kernels must run as Python to be checked)")
    ap = argparse.ArgumentParser()
    ap.add_argument("modules", nargs="+", type=Path)
    ap.add_argument("--sizes", default="3,3,3")
    args = ap.parse_args()
    sizes = tuple(int(s) for s in args.sizes.split(","))
    print(json.dumps([list(o) for path in args.modules for o in check(path, sizes)]))


if __name__ == "__main__":
    main()
