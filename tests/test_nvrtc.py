"""The CUDA source of every built-in cell compiles with NVRTC, the run-time compiler that
``cupy.RawModule`` uses on the GPU, through CuPy's own bindings (cupy_backends.cuda.libs.nvrtc):
for compute_80 (PTX) and sm_90 (a cubin), with the options the CuPy modules give RawModule.

NVRTC needs no GPU and no driver, but CuPy (cupy-cuda13x) and the NVRTC library
(nvidia-cuda-nvrtc) are large downloads, so CI's install does not bring them: without them these
tests skip (with SYMRNN_REQUIRE_NVRTC=1, as .ci/gpu sets, they fail).  nvcc compiles the same
sources on every CI run (tests/test_cupy_backend.py).
"""

from __future__ import annotations

import os

import pytest

from cupy_support import cuda_source, fresh_cupy_module

TARGETS = ("compute_80", "sm_90")


@pytest.fixture(scope="module")
def nvrtc():
    try:
        from cupy_backends.cuda.libs import nvrtc

        nvrtc.getVersion()  # loads libnvrtc
    except Exception as exc:  # ImportError, or the library is not found
        reason = f"CuPy's NVRTC bindings and libnvrtc are needed ({type(exc).__name__}: {exc})"
        if os.environ.get("SYMRNN_REQUIRE_NVRTC"):
            pytest.fail(reason + " and SYMRNN_REQUIRE_NVRTC is set")
        pytest.skip(reason)
    return nvrtc


@pytest.mark.parametrize("target", TARGETS)
def test_cuda_source_compiles_with_nvrtc(nvrtc, cell_name, target):
    source = cuda_source(cell_name)
    program = nvrtc.createProgram(source, f"{cell_name}.cu", [], [])
    try:
        try:
            nvrtc.compileProgram(program, ["-std=c++17", f"--gpu-architecture={target}"])
        except Exception as exc:
            pytest.fail(f"NVRTC ({target}) failed for {cell_name}: {exc}\n{nvrtc.getProgramLog(program)[-4000:]}")
        log = nvrtc.getProgramLog(program)
        assert "warning" not in log.lower(), log
        binary = nvrtc.getPTX(program) if target.startswith("compute_") else nvrtc.getCUBIN(program)
    finally:
        nvrtc.destroyProgram(program)
    if target.startswith("sm_"):
        assert binary.startswith(b"\x7fELF")
    for name in fresh_cupy_module(cell_name).KERNELS:  # every kernel, in both dtypes
        for suffix in ("_f32", "_f64"):
            assert (name + suffix).encode() in binary, (name, suffix)
