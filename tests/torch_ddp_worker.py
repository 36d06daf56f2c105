"""One process of the DistributedDataParallel test (tests/test_torch_ddp.py), and the model and
data both sides use.

    python tests/torch_ddp_worker.py RANK WORLD_SIZE INIT_FILE OUT_FILE

Joins a gloo process group (file:// rendezvous, localhost), wraps the model in
DistributedDataParallel, trains it STEPS steps with Adam on its share of the batch, and saves
the gradients after the first backward, the loss of every step and the final parameters.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

BATCH, T, N_IN, N_HIDDEN, STEPS = 8, 7, 3, 5, 20


class Model(torch.nn.Module):
    """Two layers of the generated lstm_torch RNN, both directions, and a linear head on the mean over time."""

    def __init__(self):
        super().__init__()
        from generated import lstm_torch_torch

        self.rnn = lstm_torch_torch.RNN(N_IN, N_HIDDEN, num_layers=2, bidirectional=True, dtype=torch.float64)
        self.head = torch.nn.Linear(2 * N_HIDDEN, 1, dtype=torch.float64)

    def forward(self, x):
        output, _ = self.rnn(x)
        return self.head(output.mean(dim=0))


def make(seed: int = 0):
    """The model (its initial parameters from ``seed``), and the whole batch (x, target)."""
    torch.manual_seed(seed)
    model = Model()
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(T, BATCH, N_IN, generator=g, dtype=torch.float64)
    target = x.sum(dim=(0, 2)).tanh()[:, None]  # (BATCH, 1)
    return model, x, target


def train(model, x, target, steps: int = STEPS):
    """Adam on the mean squared error; -> (gradients after the first backward, losses)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    first, losses = None, []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), target)
        loss.backward()
        if first is None:
            first = {name: p.grad.clone() for name, p in named(model)}
        losses.append(loss.item())
        optimizer.step()
    return first, losses


def named(model):
    """Parameters by name, without DistributedDataParallel's "module." prefix."""
    inner = model.module if hasattr(model, "module") else model
    return list(inner.named_parameters())


def main(rank: int, world: int, init_file: str, out_file: str) -> int:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model, x, target = make()
        share = BATCH // world
        rows = slice(rank * share, (rank + 1) * share)
        ddp = DistributedDataParallel(model)
        first, losses = train(ddp, x[:, rows], target[rows])
        torch.save({"grads": first, "losses": losses, "params": {n: p.detach().clone() for n, p in named(ddp)}}, out_file)
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]))
