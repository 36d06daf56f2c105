"""The examples run (at a small size, in a scratch folder, as a user would run them),
print their progress, save their plot, and their loss goes down."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT

SMALL = {
    "custom_cell.py": ["--steps", "40", "--hidden", "8", "--T", "20", "--batch", "16"],
    "train_sine.py": ["--steps", "60"],
    "train_sequence.py": ["--steps", "40", "--hidden", "8", "--T", "30", "--batch", "16"],
    "train_classifier.py": ["--steps", "150"],
}
PLOTS = {"custom_cell.py": "custom_cell.png", "train_sine.py": "train_sine.png", "train_sequence.py": "train_sequence.png",
         "train_classifier.py": "train_classifier.png"}


@pytest.mark.parametrize("script", sorted(SMALL))
def test_example_runs_and_its_loss_decreases(script, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg"}
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / script), *SMALL[script], "--out", str(out)],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert len(re.findall(r"^step\s+\d+", proc.stdout, re.M)) >= 5, proc.stdout  # progress
    first, last = map(float, re.search(r"first loss ([\d.e+-]+), last loss ([\d.e+-]+)", proc.stdout).groups())
    assert last < 0.7 * first, (first, last)
    png = (out / PLOTS[script]).read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_classifier_example_beats_chance(tmp_path):
    """examples/train_classifier.py: the softmax cross-entropy readout names a sine's frequency
    (3 classes) far above chance after 150 steps."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg"}
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "train_classifier.py"), "--steps", "150",
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    accuracy = float(re.search(r"^held-out accuracy ([\d.]+)% on 500 sequences", proc.stdout, re.M).group(1))
    assert accuracy > 60, proc.stdout


def test_custom_cell_example_checks_its_gradients(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg"}
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "custom_cell.py"), "--steps", "2", "--out", str(tmp_path)],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "cell leaky_gate" in proc.stdout and " 0 failed" in proc.stdout
    for name in ("W_a", "u", "V", "x", "h0"):
        assert re.search(rf"^\s+FD\s+{name}\s.*ok$", proc.stdout, re.M), name
    module = (tmp_path / "leaky_gate_numpy.py").read_text()
    assert f"symrnn generate --spec {ROOT / 'examples' / 'leaky_gate.toml'}" in module.splitlines()[2]


def test_train_torch_example_learns_digits(tmp_path):
    """examples/train_torch.py at a small size: a spec-file cell as a torch layer (Adam, a
    DataLoader) on scikit-learn's digits; it shows a progress bar, states its test accuracy,
    which is far above chance (10%), and saves its plot."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg"}
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "train_torch.py"), "--epochs", "4", "--hidden", "16",
                           "--readout", "16", "--out", str(out)],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "training: 100%" in proc.stderr  # the progress bar
    assert len(re.findall(r"^epoch\s+\d+\s+loss", proc.stdout, re.M)) == 4, proc.stdout
    first, last = map(float, re.search(r"first loss ([\d.e+-]+), last loss ([\d.e+-]+)", proc.stdout).groups())
    assert last < 0.7 * first, (first, last)
    accuracy = float(re.search(r"^test accuracy ([\d.]+)% on 360 held-out digits", proc.stdout, re.M).group(1))
    assert accuracy > 40, proc.stdout
    assert sorted(p.name for p in out.glob("*.py")) == ["__init__.py", "leaky_gate_numpy.py", "leaky_gate_torch.py"]
    png = (out / "train_torch.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
