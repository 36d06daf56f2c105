"""The driver: cell -> lower -> derive -> plan -> render -> write.

Each stage takes the previous stage's value and returns a new one:

    cell: Cell
      -> graph: StepGraph       (lower.lower: names resolved, sizes checked)
      -> derivation: Derivation (derive.derive: local partials, adjoints, tangents)
      -> plan: KernelPlan       (plan.plan: pre / loop / post, stages, stacked GEMMs)
      -> source: str            (render: a backend's statements in its Jinja template)

Rendering, the registry of backends and atomic writes are symrnn.render's; the names
it exports are importable from here too.
"""

from __future__ import annotations

import os
import types
from collections.abc import Iterable, Mapping
from pathlib import Path

from .cell import Cell
from .cells import builtin
from .derive import derive
from .errors import UserError
from .lower import lower
from .plan import KernelPlan, plan
from .render import (  # noqa: F401 (re-exported)
    BACKENDS, compile_pdf, generated_init, render_cuda, render_cupy, render_latex, render_markdown, render_numpy,
    write_atomic,
)

__all__ = ["build", "render_numpy", "render_cupy", "render_cuda", "render_latex", "render_markdown", "compile_pdf",
           "load_module", "generate", "write_atomic", "module_name", "BACKENDS"]


def build(cell: Cell | str) -> KernelPlan:
    """Cell (or built-in name) -> kernel plan: lower, derive, plan."""
    cell = builtin(cell) if isinstance(cell, str) else cell
    graph = lower(cell)  # Cell -> StepGraph
    derivation = derive(graph)  # StepGraph -> Derivation
    return plan(derivation)  # Derivation -> KernelPlan


def module_name(cell_name: str, backend: str = "numpy") -> str:
    return f"{cell_name}_{backend}"


def load_module(source: str, name: str) -> types.ModuleType:
    """Execute generated source as a fresh module (not registered in sys.modules)."""
    module = types.ModuleType(name)
    module.__file__ = f"<symrnn:{name}>"
    exec(compile(source, module.__file__, "exec"), module.__dict__)
    return module


def generate(cells: Iterable[Cell | str], out_dir: Path | str, backends: Iterable[str] = ("numpy",),
             commands: Mapping[str, str] | None = None) -> list[Path]:
    """Render every module (of every backend in ``backends``) in memory, then
    write them all (atomically, one by one).

    Nothing is written if any cell fails to render; an unwritable folder raises
    a UserError naming it.  ``commands`` gives, by cell name, the command that
    regenerates a module (written in its header; a spec file's cell needs it).
    """
    out_dir = Path(out_dir)
    backends = list(backends)
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        raise UserError(f"unknown backend '{unknown[0]}'; choose from {', '.join(BACKENDS)}")
    commands = commands or {}
    rendered: dict[str, str] = {}
    for cell in cells:
        kp = build(cell)
        for backend in backends:
            command = commands.get(kp.graph.cell)
            if command and backend != "numpy":
                command += f" --backend {backend}"
            rendered[module_name(kp.graph.cell, backend) + ".py"] = BACKENDS[backend].render(kp, command)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"output folder '{out_dir}' is a file, not a folder")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        if not os.access(out_dir, os.W_OK):
            raise PermissionError(f"'{out_dir}' is not writable")
        init = out_dir / "__init__.py"
        existing = set()
        if init.exists():
            existing = {p.stem for backend in BACKENDS for p in out_dir.glob(f"*_{backend}.py")}
        written = []
        for filename, text in rendered.items():
            path = out_dir / filename
            write_atomic(path, text)
            written.append(path)
        write_atomic(init, generated_init(existing | {Path(f).stem for f in rendered}))
        return written
    except OSError as exc:
        raise UserError(f"cannot write to output folder '{out_dir}': {exc.strerror or exc}") from None
