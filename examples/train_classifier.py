"""An Elman network classifies sequences with a softmax cross-entropy loss, trained with its generated kernels.

    python examples/train_classifier.py [--steps 400] [--out OUT]

The cell is the built-in `elman_classifier` (symrnn/specs/elman_classifier.toml): h = tanh(W x +
U h_prev + b), logits z = V h + c, log p = z - logsumexp(z), L = -sum_t sum_k target_k log p_k.
The task: a sequence is a noisy sine wave of one of K frequencies (its class); the network
reads it and names the frequency at the last step.  The target is one-hot at the last step and
all zeros before it (a zero row adds nothing to the loss), so only the final answer is scored.
The example generates the cell's NumPy module into OUT/kernels and imports it (it depends on
NumPy only); Adam, written here in NumPy; prints the loss and the held-out accuracy and saves
a plot of the loss and of the class probabilities over one sequence to OUT/train_classifier.png.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import numpy as np

from symrnn.pipeline import generate

FREQUENCIES = (0.2, 0.6, 1.2)  # one class per frequency (radians per step)


def generated_module(name: str, folder: Path):
    """Generate the NumPy module of a built-in cell into ``folder`` and import it."""
    (path,) = generate([name], folder)
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def task(rng, T: int, B: int):
    """x (T, B, 1): noisy sines of random class and phase; target (T, B, K): one-hot at the last step."""
    labels = rng.integers(0, len(FREQUENCIES), B)
    w = np.asarray(FREQUENCIES)[labels]
    t = np.arange(T)[:, None]
    x = np.sin(w[None, :] * t + rng.uniform(0, 2 * np.pi, B)[None, :]) + 0.2 * rng.standard_normal((T, B))
    target = np.zeros((T, B, len(FREQUENCIES)))
    target[-1, np.arange(B), labels] = 1.0
    return x[:, :, None], target, labels


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--T", type=int, default=20, help="sequence length")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=16)
    ap.add_argument("--lr", type=float, default=0.03)
    ap.add_argument("--out", default="train_classifier_out")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cell = generated_module("elman_classifier", out / "kernels")

    rng = np.random.default_rng(0)
    params = cell.init_params(n_in=1, n_hidden=args.hidden, n_out=len(FREQUENCIES), seed=0)
    m = {k: np.zeros_like(v) for k, v in params.items()}
    v = {k: np.zeros_like(p) for k, p in params.items()}
    losses = []
    for step in range(args.steps):
        x, target, _ = task(rng, args.T, args.batch)
        loss, grads = cell.loss_and_grads(params, x, target)
        for k in params:  # Adam on the loss averaged over the batch
            g = grads[k] / args.batch
            m[k] = 0.9 * m[k] + 0.1 * g
            v[k] = 0.999 * v[k] + 0.001 * g * g
            params[k] = params[k] - args.lr * (m[k] / (1 - 0.9 ** (step + 1))) / (np.sqrt(v[k] / (1 - 0.999 ** (step + 1))) + 1e-8)
        losses.append(float(loss) / args.batch)
        if step % max(1, args.steps // 10) == 0 or step == args.steps - 1:
            print(f"step {step:5d}  loss {losses[-1]:.4f}")

    x, target, labels = task(np.random.default_rng(1), args.T, 500)
    logp = cell.forward(params, x)[0]["logp"]
    accuracy = float(np.mean(np.argmax(logp[-1], axis=-1) == labels))
    print(f"held-out accuracy {100 * accuracy:.1f}% on 500 sequences (chance {100 / len(FREQUENCIES):.0f}%)")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
    a.plot(losses)
    a.set(title="elman_classifier: cross-entropy at the last step", xlabel="step", ylabel="loss per sequence")
    probs = np.exp(logp[:, 0, :])
    for k, w in enumerate(FREQUENCIES):
        b.plot(probs[:, k], label=f"p(class {k}: w = {w})" + (" (true)" if k == labels[0] else ""))
    b.plot(0.5 + 0.2 * x[:, 0, 0], ":", color="gray", label="input (scaled)")
    b.set(title="one held-out sequence", xlabel="t", ylim=(0, 1.05))
    b.legend(loc="upper left", fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "train_classifier.png", dpi=100)
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])  # one batch's loss is noisy: 5 steps each
    print(f"first loss {first:.5f}, last loss {last:.5f} (means over 5 steps); saved {out / 'train_classifier.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
