"""A cell from an equations file as a layer of a torch model, trained on handwritten digits.

    python examples/train_torch.py [--spec examples/leaky_gate.toml] [--epochs 25] [--hidden 64] [--out OUT]

1. generates the cell's NumPy kernels and its torch module into OUT (the same as
   `symrnn generate --spec FILE --backend torch --out OUT`);
2. builds a torch model: the cell's RNN, both directions, reads each 8x8 image of scikit-learn's
   digits (1,797 handwritten digits that scikit-learn ships) as a sequence of its 8 rows; a linear
   layer classifies the mean over time of its outputs (the cell's readout, y = V h + b_y);
3. trains it with torch.optim.Adam and a DataLoader, with a progress bar, printing each epoch's
   loss and accuracy on the held-out test images (a fifth of them, never trained on);
4. saves a plot of the loss and the test accuracy to OUT/train_torch.png and states the test
   accuracy reached.

Forward and backward of the cell are symrnn's generated, checked kernels; everything else is torch.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import numpy as np
import torch

from symrnn.pipeline import generate
from symrnn.spec import load_spec

HERE = Path(__file__).resolve().parent


def digits(seed: int = 0):
    """scikit-learn's digits as (T=8, N, 8) row sequences in [0, 1], split 80/20 (stratified)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    images = (data.images / 16.0).astype(np.float32)  # (N, 8, 8): 8 rows of 8 pixels
    x_train, x_test, y_train, y_test = train_test_split(images, data.target, test_size=0.2, random_state=seed,
                                                        stratify=data.target)
    return (torch.from_numpy(x_train), torch.from_numpy(y_train).long(),
            torch.from_numpy(x_test), torch.from_numpy(y_test).long())


class Classifier(torch.nn.Module):
    """The cell's layer over the rows of an image, then a linear layer on the mean of its outputs."""

    def __init__(self, cell_module, hidden: int, readout: int, classes: int = 10):
        super().__init__()
        self.rnn = cell_module.RNN(8, hidden, output_size=readout, bidirectional=True, batch_first=True)
        self.head = torch.nn.Linear(2 * readout, classes)

    def forward(self, images):  # (B, 8 rows, 8 pixels)
        output, _ = self.rnn(images)  # (B, 8, 2 * readout)
        return self.head(output.mean(dim=1))


def load(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def accuracy(model, x, y) -> float:
    with torch.no_grad():
        return float((model(x).argmax(dim=1) == y).float().mean())


def main(argv=None) -> int:
    from tqdm import tqdm

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spec", default=str(HERE / "leaky_gate.toml"), help="the equations file")
    ap.add_argument("--epochs", type=int, default=25)
    ap.add_argument("--hidden", type=int, default=64, help="n_hidden")
    ap.add_argument("--readout", type=int, default=32, help="n_out, the size of the cell's readout")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="train_torch_out", help="folder for the modules and the plot")
    args = ap.parse_args(argv)
    out = Path(args.out)
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)  # the cell's kernels run in NumPy; torch's part is small

    # 1. equations file -> NumPy kernels and torch module
    cell = load_spec(args.spec)
    paths = generate([cell], out, backends=("numpy", "torch"),
                     commands={cell.name: f"symrnn generate --spec {args.spec}"})
    print("generated " + ", ".join(str(p) for p in paths) + f" from {args.spec}")
    cell_module = load(out / f"{cell.name}_torch.py")

    # 2. data and model
    x_train, y_train, x_test, y_test = digits(args.seed)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x_train, y_train), batch_size=args.batch,
                                         shuffle=True, generator=torch.Generator().manual_seed(args.seed))
    model = Classifier(cell_module, args.hidden, args.readout)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    print(f"{len(x_train)} training and {len(x_test)} test images; model: {model}")

    # 3. training
    losses, accuracies = [], []
    start = time.perf_counter()
    with tqdm(total=args.epochs * len(loader), desc="training", unit="batch", file=sys.stderr) as bar:
        for epoch in range(1, args.epochs + 1):
            model.train()
            for images, labels in loader:
                optimizer.zero_grad()
                loss = torch.nn.functional.cross_entropy(model(images), labels)
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
                bar.set_postfix(loss=f"{loss.item():.3f}")
                bar.update()
            model.eval()
            accuracies.append(accuracy(model, x_test, y_test))
            epoch_loss = float(np.mean(losses[-len(loader):]))
            print(f"epoch {epoch:3d}  loss {epoch_loss:.4f}  test accuracy {100 * accuracies[-1]:.1f}%", flush=True)
    seconds = time.perf_counter() - start
    print(f"first loss {losses[0]:.4f}, last loss {float(np.mean(losses[-len(loader):])):.4f}")
    print(f"test accuracy {100 * accuracies[-1]:.1f}% on {len(x_test)} held-out digits after {args.epochs} epochs "
          f"({seconds:.1f} s of training, cell '{cell.name}' from {Path(args.spec).name})")

    # 4. plot
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(np.arange(1, len(losses) + 1) / len(loader), losses, lw=0.8)
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy (training batch)", yscale="log",
                title=f"cell '{cell.name}' as a torch layer")
    ax_acc.plot(np.arange(1, len(accuracies) + 1), [100 * a for a in accuracies], marker="o", ms=3)
    ax_acc.set(xlabel="epoch", ylabel="test accuracy (%)", title=f"digits: {100 * accuracies[-1]:.1f}% held out")
    ax_acc.grid(alpha=0.3)
    fig.tight_layout()
    png = out / "train_torch.png"
    fig.savefig(png, dpi=120)
    print(f"saved {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
