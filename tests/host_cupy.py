"""A NumPy stand-in for the parts of CuPy that generated CuPy modules use.

``RawModule`` compiles the module's CUDA source for the host with the C++
compiler (the ``__global__`` wrappers are left out by ``#ifdef __CUDACC__``;
the source's host drivers call the same ``__host__ __device__`` element
functions for every (row, unit)) and loads it with ctypes.  A generated module
run against this stand-in executes all of its own orchestration (GEMMs,
buffers, launches, reductions) on the CPU, with the CUDA math compiled from
the very source the GPU gets.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import types
from pathlib import Path

import numpy as np

CXX = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
_LIBS: dict[str, ctypes.CDLL] = {}


def compile_host(code: str, build_dir: Path, optimize: tuple[str, ...] = ("-O1",),
                 libs: tuple[str, ...] = ()) -> ctypes.CDLL:
    """The CUDA source compiled as C++17 for the host, as a shared library (cached by
    content and flags; the tests compile with -O1, benchmarks/fused_cpu.py with -O3 and
    vectorized math).  ``libs`` are linked after the source (e.g. ``-lmvec``)."""
    key = hashlib.sha256((code + " ".join(optimize + libs)).encode()).hexdigest()[:16]
    if key not in _LIBS:
        if CXX is None:
            raise RuntimeError("no C++ compiler (g++) found; install g++ (Debian: apt-get install g++)")
        src, lib = build_dir / f"k{key}.cpp", build_dir / f"k{key}.so"
        src.write_text(code)
        proc = subprocess.run([CXX, "-std=c++17", *optimize, "-Wall", "-Werror", "-Wno-unused-variable",
                               "-Wno-unused-but-set-variable", "-shared", "-fPIC", "-o", str(lib), str(src), *libs],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"host compile of the CUDA source failed:\n{proc.stderr[-4000:]}")
        _LIBS[key] = ctypes.CDLL(str(lib))
    return _LIBS[key]


class _Streams:
    """The stand-in's current device and stream: ``cuda.Device(i)`` and ``cuda.ExternalStream(ptr)``
    set them inside a ``with``; every launch records the stream it ran on (``launches``)."""

    def __init__(self):
        self.device, self.stream, self.launches = None, 0, []

    def context(self, attr):
        streams = self

        class _Context:
            def __init__(self, value, *args):
                self.value = value

            def __enter__(self):
                self.previous = getattr(streams, attr)
                setattr(streams, attr, self.value)
                return self

            def __exit__(self, *exc):
                setattr(streams, attr, self.previous)
                return False

        return _Context


class _HostFunction:
    def __init__(self, fn, name: str, checked: bool = True, streams: _Streams | None = None):
        self.fn, self.name, self.checked, self.streams = fn, name, checked, streams
        self.calls = 0

    def __call__(self, grid, block, args):
        if self.streams is not None:
            self.streams.launches.append((self.name, self.streams.device, self.streams.stream))
        if not self.checked:  # benchmarks: no argument checks, pointers passed as plain ints
            if self.fn.argtypes is None:
                self.fn.argtypes = [ctypes.c_longlong] * 6 + [ctypes.c_void_p] * (len(args) - 6)
            self.fn(*[int(a) for a in args[:6]], *[a.ctypes.data for a in args[6:]])
            return
        rows = int(args[0])
        c_args = [ctypes.c_longlong(int(a)) for a in args[:6]]  # rows, steps, step, n_in, n_hidden, n_out
        for a in args[6:]:
            if not isinstance(a, np.ndarray):
                raise TypeError(f"{self.name}: argument {a!r} is not an array")
            if not a.flags["C_CONTIGUOUS"]:
                raise ValueError(f"{self.name}: a kernel argument is not C-contiguous (a GPU kernel would read it wrongly)")
            if a.dtype == np.int64:  # every row's length (``const long long*``)
                if a.shape != (rows,):
                    raise ValueError(f"{self.name}: lengths of shape {a.shape} for {rows} rows")
            elif a.dtype not in (np.float32, np.float64) or (a.dtype == np.float32) != self.name.endswith("_f32"):
                raise TypeError(f"{self.name}: argument of dtype {a.dtype}")
            c_args.append(ctypes.c_void_p(a.ctypes.data))
        if grid[0] * block[0] < rows:  # at least one thread per row (units are checked by the driver's loop)
            raise ValueError(f"{self.name}: launch of {grid[0]} x {block[0]} threads for {rows} rows")
        self.calls += 1
        self.fn(*c_args)


class _HostModule:
    def __init__(self, build_dir: Path, code: str, options=(), optimize=("-O1",), libs=(), checked=True, streams=None,
                 **kwargs):
        self.lib = compile_host(code, build_dir, optimize, libs)
        self.checked, self.streams = checked, streams

    def get_function(self, name: str) -> _HostFunction:
        return _HostFunction(getattr(self.lib, name), name, self.checked, self.streams)


def host_cupy(build_dir: Path, optimize: tuple[str, ...] = ("-O1",), libs: tuple[str, ...] = (),
              checked: bool = True) -> types.ModuleType:
    """A ``cupy`` module object backed by NumPy and the host-compiled kernels (``checked``:
    every launch's arguments are checked as a GPU would need them; the tests keep it on)."""
    m = types.ModuleType("cupy")
    for name in ("asarray", "ascontiguousarray", "array", "empty", "empty_like", "zeros", "zeros_like",
                 "matmul", "sum", "concatenate", "ones_like", "float32", "float64", "ndarray", "array_equal",
                 "arange", "from_dlpack", "full", "where", "take_along_axis", "mean", "max", "log", "exp", "broadcast_to"):
        setattr(m, name, getattr(np, name))
    streams = _Streams()
    m.cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=lambda: 1),
                                   Device=streams.context("device"), ExternalStream=streams.context("stream"))
    m.streams = streams  # the stand-in's own: where each launch ran
    m.RawModule = lambda **kw: _HostModule(build_dir, optimize=optimize, libs=libs, checked=checked, streams=streams, **kw)
    m.asnumpy = np.asarray
    return m
