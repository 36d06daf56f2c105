"""A derivation as rendered mathematics in a notebook: ``symrnn.derivation("lstm")``.

>>> doc = derivation("single_sigmoid")
>>> doc
<derivation of cell 'single_sigmoid' (vector form, time as h^t): 10 numbered equations>
>>> r"\\sigma'\\left({a^{t}}\\right)" in doc._repr_latex_()
True

In Jupyter the object displays as the whole document (``_repr_markdown_``: Markdown with
``$$`` blocks, which the notebook renders with MathJax) or, where a front end prefers LaTeX,
as its equations (``_repr_latex_``: one display of every numbered equation).  ``doc.tex``,
``doc.markdown`` and ``doc.pdf(path)`` give the files ``symrnn latex`` writes.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from .cell import Cell

__all__ = ["derivation", "DerivationDocument"]


@dataclass(frozen=True)
class DerivationDocument:
    """The derivation document of one cell, in one notation."""

    plan: object
    notation: object

    @property
    def cell(self) -> str:
        return self.plan.graph.cell

    @cached_property
    def data(self) -> dict:
        from .latex import document_data
        from .textbook import vector_document_data

        if self.notation.form_for(self.plan.graph) == "unit":
            return document_data(self.plan, self.notation)
        return vector_document_data(self.plan, self.notation)

    @cached_property
    def tex(self) -> str:
        """The standalone LaTeX document (as ``symrnn latex``)."""
        from .pipeline import render_latex

        return render_latex(self.plan, self.notation)

    @cached_property
    def markdown(self) -> str:
        """The Markdown document with $$ blocks (as ``symrnn latex --format md``)."""
        from .pipeline import render_markdown

        return render_markdown(self.plan, self.notation)

    def pdf(self, path) -> Path:
        """Compile the document with pdflatex into ``path``."""
        from .pipeline import compile_pdf

        return compile_pdf(self.tex, Path(path))

    def equations(self) -> list[str]:
        """Every numbered equation, as one LaTeX line each (lhs = rhs)."""
        return [f"{lhs} = {rhs}" for lhs, rhs in self.sides()]

    def sides(self) -> list[tuple[str, str]]:
        """Every numbered equation as (lhs, rhs), LaTeX."""
        d = self.data
        if self.notation.form == "unit":
            out = [(e.lhs, e.rhs) for e in d["forward"]]
            out += [(e["lhs"], " ".join(e["lines"])) for e in d["adjoints"]]
            return out + [(s["lhs"], " ".join(s["lines"])) for s in d["sensitivities"] if s["lines"]]
        return [(e["lhs"], " ".join(e["lines"])) for group in ("forward", "adjoints", "generic", "sensitivities")
                for e in d[group]]

    def _repr_markdown_(self) -> str:
        return self.markdown

    def _repr_latex_(self) -> str:
        rows = r" \\ ".join(f"{lhs} &= {rhs}" for lhs, rhs in self.sides())
        return rf"$$\begin{{aligned}} {rows} \end{{aligned}}$$"

    def __repr__(self) -> str:
        time = "h[t]" if self.notation.time == "index" else "h^t"
        return (f"<derivation of cell '{self.cell}' ({self.notation.form} form, time as {time}): "
                f"{len(self.equations())} numbered equations>")


def derivation(cell: Cell | str, *, form: str = "vector", time: str = "super",
               rename: dict[str, str] | None = None) -> DerivationDocument:
    """The derivation of a cell (a built-in name, a :class:`Cell`, or a spec file's cell from
    :func:`symrnn.load_spec`), displayed as mathematics in a notebook.

    ``form``: ``"vector"`` (the textbook form) or ``"unit"`` (per unit); ``time``: ``"super"``
    (h^t) or ``"index"`` (h[t]); ``rename``: names written differently, e.g. ``{"s": "h"}``."""
    from .errors import UserError
    from .latex import Notation
    from .pipeline import build

    if form not in ("vector", "unit"):
        raise UserError(f"form must be 'vector' or 'unit', got {form!r}")
    if time not in ("super", "index"):
        raise UserError(f"time must be 'super' or 'index', got {time!r}")
    notation = Notation(time=time, rename=tuple((rename or {}).items()), form=form)
    return DerivationDocument(build(cell), notation)
