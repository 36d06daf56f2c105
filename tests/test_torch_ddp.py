"""DistributedDataParallel with the gloo backend trains a generated torch module in 2 processes
on localhost (tests/torch_ddp_worker.py, started here, each bounded in time): the gradients
after one step equal the single-process full-batch gradients, and 20 steps of Adam give the
same losses (the mean of the two processes' losses on their halves of the batch) and the
same parameters, float64, 1e-10 relative."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from conftest import ROOT
from torch_support import rel_err
from torch_ddp_worker import STEPS, make, named, train

WORLD = 2
TIMEOUT_S = 180
TOL = 1e-10


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """What each of the WORLD processes saved."""
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.fail("torch.distributed with gloo is not available in this torch build")
    tmp = tmp_path_factory.mktemp("ddp")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1",
           "OPENBLAS_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1"}
    outs = [tmp / f"rank{r}.pt" for r in range(WORLD)]
    procs = [subprocess.Popen([sys.executable, str(ROOT / "tests" / "torch_ddp_worker.py"), str(r), str(WORLD),
                               str(tmp / "rendezvous"), str(outs[r])], env=env, cwd=tmp,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(WORLD)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=TIMEOUT_S)[0])
    except subprocess.TimeoutExpired:
        pytest.fail(f"the DDP processes did not finish within {TIMEOUT_S} s")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for r, (p, log) in enumerate(zip(procs, logs)):
        assert p.returncode == 0, f"rank {r} exited with {p.returncode}:\n{log[-3000:]}"
    return [torch.load(out) for out in outs]


@pytest.fixture(scope="module")
def single():
    """One process, the whole batch: (gradients after the first backward, losses, final parameters)."""
    model, x, target = make()
    grads, losses = train(model, x, target)
    return grads, losses, {n: p.detach() for n, p in named(model)}


def test_ddp_gradients_equal_the_full_batch_gradients(ranks, single):
    grads = single[0]
    for r, saved in enumerate(ranks):
        assert list(saved["grads"]) == list(grads)
        bad = {n: e for n, g in grads.items() if not (e := rel_err(saved["grads"][n], g)) <= TOL}
        assert not bad, f"rank {r}: {bad}"


def test_ddp_training_gives_the_same_losses_and_parameters(ranks, single):
    _, losses, params = single
    assert len(losses) == STEPS and losses[-1] < losses[0]
    for step in range(STEPS):
        mean = sum(saved["losses"][step] for saved in ranks) / WORLD  # equal halves: the full batch's mean
        assert abs(mean - losses[step]) <= TOL * abs(losses[step]), (step, mean, losses[step])
    for r, saved in enumerate(ranks):
        bad = {n: e for n, p in params.items() if not (e := rel_err(saved["params"][n], p)) <= TOL}
        assert not bad, f"rank {r}: {bad}"
