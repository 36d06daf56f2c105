"""The symrnn command: output, one-line errors with exit status 2, atomic writes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

import symrnn.pipeline
from conftest import CELLS, ROOT
from symrnn.cli import main
from symrnn.errors import CellError
from symrnn.gradcheck import Result
from symrnn.render import BACKENDS


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_list(capsys):
    code, out, _ = run(capsys, "list")
    assert code == 0
    lines = out.strip().splitlines()
    assert [line.split()[0] for line in lines] == CELLS
    assert "[seed 002]" in out and "[PyTorch nn.LSTM]" in out


def test_show(capsys):
    code, out, _ = run(capsys, "show", "lstm")
    assert code == 0
    assert "c = c_prev*f + g*i" in out and "W_f @ [h_prev; x]" in out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["show", "lstmm"], "unknown cell 'lstmm' (did you mean 'lstm'?); built-in cells: elman,"),
        (["generate", "nope"], "unknown cell 'nope'"),
        (["check", "nope"], "unknown cell 'nope'"),
        (["generate", "--bogus"], "unrecognized arguments: --bogus"),
        (["generate", "--backend", "opencl"], "invalid choice: 'opencl'"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["check", "--seed", "x"], "invalid int value: 'x'"),
        ([], "the following arguments are required"),
    ],
)
def test_bad_input_is_one_line_with_status_2(capsys, argv, message):
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("symrnn: error: ")
    assert message in err


def test_generate_writes_what_is_committed(tmp_path, capsys):
    code, out, _ = run(capsys, "generate", "--backend", "all", "--out", str(tmp_path))
    assert code == 0 and f"generated {len(BACKENDS) * len(CELLS)} module(s)" in out
    for path in (ROOT / "generated").glob("*.py"):
        assert (tmp_path / path.name).read_bytes() == path.read_bytes()


def test_generate_backend_choice(tmp_path, capsys):
    code, out, _ = run(capsys, "generate", "elman", "--backend", "cupy", "--out", str(tmp_path))
    assert code == 0 and "generated 1 module(s)" in out
    assert sorted(p.name for p in tmp_path.glob("*.py")) == ["__init__.py", "elman_cupy.py"]
    code, out, _ = run(capsys, "generate", "elman", "--out", str(tmp_path))  # default: numpy, the list keeps cupy
    assert code == 0 and sorted(p.name for p in tmp_path.glob("*.py")) == ["__init__.py", "elman_cupy.py", "elman_numpy.py"]
    assert '"elman_cupy",' in (tmp_path / "__init__.py").read_text()


def test_generate_torch_writes_the_numpy_module_it_runs(tmp_path, capsys):
    code, out, _ = run(capsys, "generate", "mgu", "--backend", "torch", "--out", str(tmp_path))
    assert code == 0 and "generated 2 module(s)" in out
    assert sorted(p.name for p in tmp_path.glob("*.py")) == ["__init__.py", "mgu_numpy.py", "mgu_torch.py"]
    assert (tmp_path / "mgu_torch.py").read_text().splitlines()[2] == "#     symrnn generate mgu --backend torch --out generated"


def test_generate_into_a_file_is_a_user_error(tmp_path, capsys):
    blocker = tmp_path / "afile"
    blocker.write_text("keep me")
    for out_dir in (blocker, blocker / "sub"):
        code, _, err = run(capsys, "generate", "elman", "--out", str(out_dir))
        assert code == 2 and str(blocker) in err and err.count("\n") == 1
    assert blocker.read_text() == "keep me"


def test_failed_generation_writes_nothing(tmp_path, capsys, monkeypatch):
    import dataclasses

    from symrnn.render import BACKENDS

    real = BACKENDS["numpy"].render

    def failing(plan, *args, **kwargs):
        if plan.graph.cell == "gru":
            raise CellError("gru", "equation 'h'", "simulated failure")
        return real(plan, *args, **kwargs)

    monkeypatch.setitem(BACKENDS, "numpy", dataclasses.replace(BACKENDS["numpy"], render=failing))
    code, _, err = run(capsys, "generate", "elman", "gru", "--out", str(tmp_path / "out"))
    assert code == 2 and "simulated failure" in err
    assert not (tmp_path / "out").exists()


def test_interrupted_write_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "elman_numpy.py"
    target.write_text("the user's file")

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(Exception, match="No space left"):
        symrnn.pipeline.generate(["elman"], tmp_path)
    assert target.read_text() == "the user's file"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elman_numpy.py"]


def test_check_passes_and_reports_every_parameter(capsys):
    code, out, _ = run(capsys, "check", "single_sigmoid")
    assert code == 0 and "all checks passed" in out
    for name in ("w", "v", "b", "u", "d", "x", "h0"):
        assert f" {name} " in out


def test_check_failure_exits_1(capsys, monkeypatch):
    import symrnn.gradcheck

    monkeypatch.setattr(symrnn.gradcheck, "check_module", lambda module, seed=0: [Result("FD", "W", (2, 2), 1.0, 1e-6)])
    code, out, _ = run(capsys, "check", "elman")
    assert code == 1 and "FAIL" in out and "1 check(s) failed" in out


def test_console_script_has_no_traceback(tmp_path):
    exe = shutil.which("symrnn") or ""
    cmd = [exe] if exe else [sys.executable, "-m", "symrnn"]
    proc = subprocess.run([*cmd, "generate", "lstn", "--out", str(tmp_path)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1
    assert "did you mean 'lstm'" in proc.stderr
    assert list(tmp_path.iterdir()) == []
