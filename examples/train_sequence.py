"""An LSTM trained with its generated kernels on a small real sequence task: predict
the next value of a noisy sum of sines.

    python examples/train_sequence.py [--steps 400] [--hidden 16] [--out OUT]

The cell is the built-in `lstm_forget_bias` (an equations file shipped with symrnn:
an LSTM whose forget gate gets +1 before the sigmoid, with a linear readout
y = V h + b_y and the loss mean over t of (y - target)^2 / 2); the example generates
its NumPy module into OUT/kernels and imports it (it depends on NumPy only).  The data are made
here: each sequence is a sum of two sines with random frequencies, phases and
amplitudes, plus noise; the target at t is the clean signal at t + 1.  Adam, in NumPy.
Prints the loss (and the loss of the naive forecast "the next value is this one")
and saves a plot of the loss and of prediction vs target to OUT/train_sequence.png.
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


def make_batch(rng, T: int, B: int, noise: float = 0.1):
    """x: (T + 1) noisy samples of a sum of two sines per sequence; target: the clean next value."""
    t = np.arange(T + 1)[:, None]
    freq = rng.uniform(0.1, 0.4, (2, B))
    phase = rng.uniform(0, 2 * np.pi, (2, B))
    amp = rng.uniform(0.3, 0.7, (2, B))
    clean = (amp[0] * np.sin(freq[0] * t + phase[0]) + amp[1] * np.sin(freq[1] * t + phase[1]))[..., None]
    noisy = clean + noise * rng.standard_normal(clean.shape)
    return noisy[:-1], clean[1:]


def adam(params, grads, state, lr, b1=0.9, b2=0.999, eps=1e-8):
    state["t"] = state.get("t", 0) + 1
    for k in params:
        m = state.setdefault(("m", k), np.zeros_like(params[k]))
        v = state.setdefault(("v", k), np.zeros_like(params[k]))
        m[...] = b1 * m + (1 - b1) * grads[k]
        v[...] = b2 * v + (1 - b2) * grads[k] ** 2
        params[k] = params[k] - lr * (m / (1 - b1 ** state["t"])) / (np.sqrt(v / (1 - b2 ** state["t"])) + eps)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--hidden", type=int, default=16, help="n_hidden")
    ap.add_argument("--T", type=int, default=60, help="sequence length")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--out", default="train_sequence_out")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cell = generated_module("lstm_forget_bias", out / "kernels")

    rng = np.random.default_rng(0)
    params = cell.init_params(n_in=1, n_hidden=args.hidden, n_out=1, seed=0)
    x_val, t_val = make_batch(np.random.default_rng(1), args.T, 64)
    naive = float(np.mean((x_val - t_val) ** 2) / 2)
    losses, val, state = [], [], {}
    for step in range(args.steps):
        x, target = make_batch(rng, args.T, args.batch)
        loss, grads = cell.loss_and_grads(params, x, target)  # summed over the batch
        adam(params, {k: g / args.batch for k, g in grads.items() if k in params}, state, args.lr)
        losses.append(float(loss) / args.batch)
        if step % max(1, args.steps // 10) == 0 or step == args.steps - 1:
            val.append((step, float(cell.loss_and_grads(params, x_val, t_val)[0]) / x_val.shape[1]))
            print(f"step {step:5d}  train loss {losses[-1]:.5f}  held-out {val[-1][1]:.5f}  (naive forecast {naive:.5f})")
    y_val = cell.forward(params, x_val)[0]["y"]

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
    a.semilogy(losses, label="train")
    a.semilogy(*zip(*val), "o-", label="held-out")
    a.axhline(naive, color="gray", ls=":", label="naive forecast")
    a.set(title="lstm_forget_bias: loss", xlabel="step", ylabel="mean over t of (y - target)^2 / 2")
    a.legend()
    b.plot(x_val[:, 0, 0], ":", label="input (noisy)")
    b.plot(t_val[:, 0, 0], label="target: clean next value")
    b.plot(y_val[:, 0, 0], "--", label="prediction y")
    b.set(title="a held-out sequence", xlabel="t")
    b.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "train_sequence.png", dpi=100)
    print(f"first loss {losses[0]:.5f}, last loss {losses[-1]:.5f}; saved {out / 'train_sequence.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
