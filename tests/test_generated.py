"""Committed generated modules are golden files; regeneration is byte-identical."""

from __future__ import annotations

import difflib
import os
import re
import subprocess
import sys

import pytest

from conftest import CELLS, ROOT, rendered
from symrnn.pipeline import generated_init, module_name


def test_generated_is_up_to_date(cell_name):
    path = ROOT / "generated" / f"{module_name(cell_name)}.py"
    fresh = rendered(cell_name)
    committed = path.read_text() if path.exists() else ""
    if committed != fresh:
        diff = "".join(difflib.unified_diff(committed.splitlines(True), fresh.splitlines(True), str(path), "fresh", n=1))
        pytest.fail(f"{path} is stale; run: symrnn generate --out generated\n{diff[:4000]}")


def test_generated_init_lists_every_module():
    names = [module_name(c, backend) for c in CELLS for backend in ("numpy", "cupy", "torch")]
    assert (ROOT / "generated" / "__init__.py").read_text() == generated_init(names)


@pytest.mark.parametrize("hashseed", ["0", "12345"])
def test_regeneration_is_byte_identical_under_any_hashseed(tmp_path, hashseed):
    # PYTHONPATH: this checkout's symrnn, even where another checkout is the installed one
    env = {**os.environ, "PYTHONHASHSEED": hashseed, "PYTHONPATH": str(ROOT)}
    subprocess.run([sys.executable, "-m", "symrnn.cli", "generate", "--backend", "all", "--out", str(tmp_path)], check=True, env=env,
                   capture_output=True, cwd=tmp_path)
    for path in sorted((ROOT / "generated").glob("*.py")):
        assert (tmp_path / path.name).read_bytes() == path.read_bytes(), path.name
    assert sorted(p.name for p in tmp_path.glob("*.py")) == sorted(p.name for p in (ROOT / "generated").glob("*.py"))


def _function(source: str, name: str) -> str:
    match = re.search(rf"^def {name}\(.*?(?=^def |\Z)", source, re.S | re.M)
    return match.group(0)


def _loop(body: str, header: str) -> str:
    """The lines of the loop that starts with ``header``."""
    lines = body.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip().startswith(header))
    indent = len(lines[start]) - len(lines[start].lstrip())
    out = []
    for line in lines[start + 1:]:
        if line.strip() and len(line) - len(line.lstrip()) <= indent:
            break
        out.append(line)
    return "\n".join(out)


@pytest.mark.parametrize("cell_name", ["elman", "lstm", "lstm_torch", "gru_torch", "rnn_tanh_torch", "elman_out"])
def test_kernel_plan_one_gemm_per_step(cell_name):
    """Input projection before the loop, one recurrent GEMM per step (forward and
    backward), weight gradients after the loop."""
    source = rendered(cell_name)
    forward, backward = _function(source, "forward"), _function(source, "backward")
    before_loop = forward.split("for t in range(T):")[0]
    assert re.search(r"\(x\.reshape\(-1, n_in\) @ \w+\.T\)\.reshape\(T, B, ", before_loop), "input projection is not one hoisted GEMM"
    assert _gemms(_loop(forward, "for t in range(T):")) == 1
    header = _backward_loop_header(backward)
    assert _gemms(_loop(backward, header)) == 1
    after = backward.split(header)[1]
    assert ".reshape(-1," in after and "x.reshape(-1, n_in)" in after


def _gemms(code: str) -> int:
    return code.count(" @ ") + code.count("np.matmul(") + code.count("np.dot(")


def _backward_loop_header(backward: str) -> str:
    return "for t in reversed(range(t0, t1)):" if "for t in reversed(range(t0, t1)):" in backward else "for t in reversed(range(T)):"


@pytest.mark.parametrize("cell_name", ["lstm_torch", "gru_torch", "lstm"])
def test_step_loops_hold_only_adjoint_work(cell_name):
    """Forward: the sigmoid gates of one step share one exp call, biases are added
    before the loop.  Backward: every derivative factor of stored values
    (1 - g**2, o*(1 - o), ...) is computed for a block of steps before the step loop;
    the loop multiplies adjoints by them."""
    source = rendered(cell_name)
    forward, backward = _function(source, "forward"), _function(source, "backward")
    step = "\n".join(line.split("#")[0] for line in _loop(forward, "for t in range(T):").splitlines())
    biases = set(re.findall(r"\b(?:bias_\w+|b_\w+)", step))
    assert biases == ({"bias_hh_l0_2"} if cell_name == "gru_torch" else set()), biases  # GRU: b_hn is inside r * (...)
    assert step.count("np.exp(") == 1, step  # every sigmoid gate
    assert step.count("np.tanh(") == (1 if cell_name == "gru_torch" else 2), step  # n (GRU); g and tanh(c) (LSTM)
    loop = _loop(backward, "for t in reversed(range(t0, t1)):")
    assert "1 - " not in loop and "**2" not in loop, loop
    coefficients = _loop(backward, "for t1 in range(T, 0, -_COEF_STEPS):").split("for t in reversed")[0]
    assert "[t0:t1]" in coefficients and "1 - " in coefficients


def test_gru_seed_form_has_two_stages():
    """The seeds' GRU multiplies r * h_prev: a second GEMM waits for r."""
    loop = _loop(_function(rendered("gru"), "forward"), "for t in range(T):")
    assert _gemms(loop) == 2


def test_header_and_docstring(cell_name):
    source = rendered(cell_name)
    assert source.startswith(f"# Generated by symrnn from the cell '{cell_name}'")
    assert f"symrnn generate {cell_name} --out generated" in source.splitlines()[2]
    assert "Equations of one time step" in source
    assert [line for line in source.splitlines() if re.match(r"\s*(import|from)\s", line)] == ["import numpy as np"]
