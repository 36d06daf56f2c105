"""A custom cell from an equations file: generated, checked and used.

    python examples/custom_cell.py [--spec examples/leaky_gate.toml] [--steps 300] [--out OUT]

1. reads the equations file (examples/leaky_gate.toml) and generates its NumPy module
   into OUT (the same as `symrnn generate --spec examples/leaky_gate.toml --out OUT`);
2. checks the generated gradients: finite differences and BPTT = RTRL (`symrnn check --spec ...`);
3. imports the module and trains it with its own loss_and_grads (Adam, in NumPy) to output
   the running mean of its input, a task that needs memory; prints the loss as it goes and
   saves a plot of the loss and of prediction vs target to OUT/custom_cell.png.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import numpy as np

from symrnn.gradcheck import check_module, report
from symrnn.pipeline import generate
from symrnn.spec import load_spec

HERE = Path(__file__).resolve().parent


def running_mean_task(rng, T: int, B: int):
    """x: (T, B, 1) noise; target: the mean of x so far."""
    x = rng.standard_normal((T, B, 1))
    target = np.cumsum(x, axis=0) / np.arange(1, T + 1)[:, None, None]
    return x, target


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
    ap.add_argument("--spec", default=str(HERE / "leaky_gate.toml"), help="the equations file")
    ap.add_argument("--steps", type=int, default=300, help="training steps")
    ap.add_argument("--hidden", type=int, default=16, help="n_hidden")
    ap.add_argument("--T", type=int, default=40, help="sequence length")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--out", default="custom_cell_out", help="folder for the module and the plot")
    args = ap.parse_args(argv)
    out = Path(args.out)

    # 1. equations file -> generated module
    cell = load_spec(args.spec)
    (path,) = generate([cell], out, commands={cell.name: f"symrnn generate --spec {args.spec}"})
    print(f"generated {path} from {args.spec}")
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    # 2. check its gradients
    results = check_module(module, seed=0)
    print(report(cell.name, results))
    if not all(r.ok for r in results):
        print("gradient check failed", file=sys.stderr)
        return 1

    # 3. train it
    rng = np.random.default_rng(0)
    params = module.init_params(n_in=1, n_hidden=args.hidden, n_out=1, seed=0)
    x_val, t_val = running_mean_task(np.random.default_rng(1), args.T, 8)
    losses, state = [], {}
    for step in range(args.steps):
        x, target = running_mean_task(rng, args.T, args.batch)
        loss, grads = module.loss_and_grads(params, x, target)
        adam(params, {k: grads[k] / args.batch for k in params}, state, args.lr)
        losses.append(float(loss) / args.batch)
        if step % max(1, args.steps // 10) == 0 or step == args.steps - 1:
            print(f"step {step:5d}  loss {losses[-1]:.5f}")
    y_val = module.forward(params, x_val)[0]["y"]

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.5))
    a.semilogy(losses)
    a.set(title=f"{cell.name}: training loss", xlabel="step", ylabel="loss per sequence")
    b.plot(t_val[:, 0, 0], label="target: running mean of x")
    b.plot(y_val[:, 0, 0], "--", label="prediction y")
    b.set(title="a held-out sequence", xlabel="t")
    b.legend()
    fig.tight_layout()
    fig.savefig(out / "custom_cell.png", dpi=100)
    print(f"first loss {losses[0]:.5f}, last loss {losses[-1]:.5f}; saved {out / 'custom_cell.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
