"""Seed 002's single sigmoid unit learns a sine wave, trained with its generated kernels.

    python examples/train_sine.py [--steps 2000] [--out OUT]

The cell (a = w x + v h^{t-1} + b, h = sigma(a), y = u h + d, L = mean over t of
(target - y)^2 / 2) is the built-in `single_sigmoid`; the example generates
its NumPy module into OUT/kernels and imports it (it depends on NumPy only).  The task: read
x^t = sin(w0 t) and predict the next value of the wave, sin(w0 (t + 1)), which
the unit can only do by remembering (through v) which way the wave is going.
Plain gradient descent with momentum, written here in NumPy; prints the loss and
saves a plot of the loss and of prediction vs target to OUT/train_sine.png.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import numpy as np

from symrnn.pipeline import generate


def generated_module(name: str, folder: Path):
    """Generate the NumPy module of a built-in cell into ``folder`` (as `symrnn generate
    {name} --out folder` does) and import it; it depends on NumPy only."""
    (path,) = generate([name], folder)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sine_task(T: int, phases: np.ndarray, w0: float = 0.3):
    t = np.arange(T)[:, None, None] + phases[None, :, None]
    return np.sin(w0 * t), np.sin(w0 * (t + 1))  # x, target: (T, B, 1)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--T", type=int, default=60, help="sequence length")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=0.5)
    ap.add_argument("--momentum", type=float, default=0.9)
    ap.add_argument("--out", default="train_sine_out")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cell = generated_module("single_sigmoid", out / "kernels")

    rng = np.random.default_rng(0)
    params = cell.init_params(n_in=1, n_hidden=1, n_out=1, seed=0)
    velocity = {k: np.zeros_like(v) for k, v in params.items()}
    losses = []
    for step in range(args.steps):
        x, target = sine_task(args.T, rng.uniform(0, 100, args.batch))
        loss, grads = cell.loss_and_grads(params, x, target)
        for k in params:  # the loss is summed over the batch: average it
            velocity[k] = args.momentum * velocity[k] - args.lr * grads[k] / args.batch
            params[k] = params[k] + velocity[k]
        losses.append(float(loss) / args.batch)
        if step % max(1, args.steps // 10) == 0 or step == args.steps - 1:
            shown = ", ".join(f"{k} = {float(v):+.3f}" for k, v in params.items())
            print(f"step {step:5d}  loss {losses[-1]:.5f}  ({shown})")

    x, target = sine_task(args.T, np.array([0.0]))
    y = cell.forward(params, x)[0]["y"]

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
    a.semilogy(losses)
    a.set(title="single sigmoid unit (seed 002): loss", xlabel="step", ylabel="mean over t of (target - y)^2 / 2")
    b.plot(x[:, 0, 0], ":", label="input x = sin")
    b.plot(target[:, 0, 0], label="target: the next value")
    b.plot(y[:, 0, 0], "--", label="prediction y")
    b.set(title="one sequence", xlabel="t")
    b.legend(loc="lower left")
    fig.tight_layout()
    fig.savefig(out / "train_sine.png", dpi=100)
    print(f"first loss {losses[0]:.5f}, last loss {losses[-1]:.5f}; saved {out / 'train_sine.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
