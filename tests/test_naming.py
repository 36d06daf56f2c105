"""The namer's fixed names are complete: every name a module template (or the CUDA
template) uses itself is one the namer never gives to a generated value."""

from __future__ import annotations

import ast
import builtins
import re

import pytest

from conftest import CELLS
from symrnn.backends.cupy_backend import emit_cupy
from symrnn.backends.numpy_backend import emit
from symrnn.naming import C_FIXED, PYTHON_FIXED, PYTHON_TEMPLATE
from symrnn.pipeline import build, render_cuda, render_cupy, render_numpy

#: the functions that hold generated statements; the others hold only template code
HOLDERS = {"forward", "backward", "_rtrl"}


def template_names(source: str, generated: frozenset[str]) -> set[str]:
    """Module-level names, and every name used in the functions holding generated code,
    that the namer did not give out: the template's own."""
    tree = ast.parse(source)
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
        if isinstance(node, ast.FunctionDef) and node.name in HOLDERS:
            names |= {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
            names |= {a.arg for a in ast.walk(node) if isinstance(a, ast.arg)}
    return names - generated - set(dir(builtins))


@pytest.mark.parametrize("cell", CELLS)
def test_every_template_name_of_the_python_modules_is_fixed(cell):
    plan = build(cell)
    own = template_names(render_numpy(plan), emit(plan).generated_names)
    own |= template_names(render_cupy(plan), emit_cupy(plan).generated_names)
    assert own <= PYTHON_TEMPLATE, sorted(own - PYTHON_TEMPLATE)
    assert PYTHON_TEMPLATE <= PYTHON_FIXED


@pytest.mark.parametrize("cell", CELLS)
def test_every_template_name_of_the_cuda_source_is_fixed(cell):
    plan = build(cell)
    code = re.sub(r"//[^\n]*|#[^\n]*", "", render_cuda(plan))  # comments and preprocessor lines
    words = set(re.findall(r"(?<![.\w])[A-Za-z_]\w*", code))
    kernels = {k.name for k in emit_cupy(plan).kernels}
    own = {w for w in words if not any(w.startswith(k) for k in kernels)} - emit_cupy(plan).generated_c_names
    own -= {"__host__", "__device__", "__global__", "__restrict__", "x", "extern", "C"}  # "C" in extern "C"; x: ops' argument
    assert own <= C_FIXED, sorted(own - C_FIXED)
