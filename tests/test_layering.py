"""The package's import layering, function-level imports included: a module imports only
modules of its own layer or of layers below it, and no module-level import closes a cycle.

    foundations -> cells -> ir -> front end -> derive -> plan -> schedule -> passes
    -> backends -> documents -> render -> pipeline -> tools -> cli

(documents, the derivation in LaTeX and Markdown and the claims language, sit beside the
code generators: they import neither the schedule, the passes nor a backend.)"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from conftest import ROOT

PACKAGE = ROOT / "symrnn"

LAYERS = [
    ("foundations", {"version", "errors", "escape", "ops", "reductions", "stmt", "naming", "printing", "cuda_printing", "gradcheck"}),
    ("cells", {"cell", "init"}),
    ("ir", {"ir"}),
    ("front end", {"lower", "spec", "cells", "specs"}),
    ("derive", {"derive"}),
    ("plan", {"plan"}),
    ("schedule", {"schedule"}),
    ("passes", {"passes"}),
    ("backends", {"backends"}),
    ("documents", {"document", "claims", "chainrule", "textbook", "latex"}),
    ("render", {"render"}),
    ("pipeline", {"pipeline"}),
    ("tools", {"truth", "verify", "notebook"}),
    ("cli", {"cli", "__main__", "__init__"}),
]
DOCUMENTS_DO_NOT_IMPORT = {"schedule", "passes", "backends"}


def _layer_of(module: str) -> int:
    top = module.split(".")[0]
    for i, (_, names) in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"symrnn.{module} is in no layer of tests/test_layering.py: add it")


def _imports(path: Path) -> list[tuple[str, bool]]:
    """(imported symrnn module relative to the package, at module level?) of one file."""
    return _imports_of(path.read_text(), list(path.relative_to(PACKAGE).with_suffix("").parts[:-1]))


def _imports_of(source: str, package: list[str]) -> list[tuple[str, bool]]:
    tree = ast.parse(source)
    top_level = {id(node) for node in tree.body}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - node.level + 1]
            if node.module:
                out.append((".".join(base + [node.module]), id(node) in top_level))
            else:
                out += [(".".join(base + [a.name]), id(node) in top_level) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("symrnn"):
            out.append((node.module.removeprefix("symrnn").lstrip(".") or "__init__", id(node) in top_level))
        elif isinstance(node, ast.Import):
            out += [(a.name.removeprefix("symrnn.").removeprefix("symrnn") or "__init__", id(node) in top_level)
                    for a in node.names if a.name.split(".")[0] == "symrnn"]
    return [(module or "__init__", top) for module, top in out]


def _module(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


FILES = sorted(PACKAGE.rglob("*.py"))


def _violations(me: str, imports: list[tuple[str, bool]]) -> list[str]:
    mine, out = _layer_of(me), []
    for target, _ in imports:
        theirs = _layer_of(target)
        if theirs > mine:
            out.append(f"symrnn.{me} ({LAYERS[mine][0]}) imports symrnn.{target} ({LAYERS[theirs][0]}), a layer above it")
        elif LAYERS[mine][0] == "documents" and target.split(".")[0] in DOCUMENTS_DO_NOT_IMPORT:
            out.append(f"symrnn.{me} (documents) imports symrnn.{target}")
    return out


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down(path):
    assert not _violations(_module(path), _imports(path))


def test_no_module_level_import_cycle():
    graph = {}
    for path in FILES:
        me = _module(path)
        graph[me] = {t for t, top in _imports(path) if top and t != me}
    known = set(graph)

    def resolve(name: str) -> str | None:  # "backends.numpy_backend.emit" -> the module it names
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name or None

    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for t in sorted(filter(None, map(resolve, graph[node]))):
            if state.get(t) == 1:
                raise AssertionError("import cycle: " + " -> ".join(trail[trail.index(t):] + [t]))
            if t not in state:
                visit(t, trail + [t])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])


def test_the_layering_test_catches_an_upward_import_also_inside_a_function():
    """derive used to import pipeline inside a method (Derivation.to_latex): caught."""
    late = "import sympy\n\ndef to_latex(self):\n    from .pipeline import render_latex\n    return render_latex(self)\n"
    imports = _imports_of(late, [])
    assert imports == [("pipeline", False)]
    assert _violations("derive", imports) == ["symrnn.derive (derive) imports symrnn.pipeline (pipeline), a layer above it"]
    assert _violations("latex", _imports_of("from .backends.numpy_backend import emit\n", [])) == [
        "symrnn.latex (documents) imports symrnn.backends.numpy_backend"]
    assert _violations("backends.cupy_backend", _imports_of("from ..schedule import schedule\n", ["backends"])) == []
