"""Shared fixtures: the built-in cells and their modules, rendered in memory."""

from __future__ import annotations

from pathlib import Path

import pytest

from symrnn.cells import builtin_names
from symrnn.pipeline import build, load_module, module_name, render_numpy

ROOT = Path(__file__).resolve().parents[1]
CELLS = builtin_names()

_SOURCES: dict[str, str] = {}


def rendered(name: str) -> str:
    """The NumPy module source of a built-in cell (rendered once per session)."""
    if name not in _SOURCES:
        _SOURCES[name] = render_numpy(build(name))
    return _SOURCES[name]


@pytest.fixture(params=CELLS)
def cell_name(request) -> str:
    return request.param


@pytest.fixture
def module(cell_name):
    """The freshly rendered module of each built-in cell."""
    return load_module(rendered(cell_name), module_name(cell_name))


@pytest.fixture
def root() -> Path:
    return ROOT
