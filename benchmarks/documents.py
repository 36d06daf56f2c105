#!/usr/bin/env python
"""The time to print a derivation document: the cells with reductions, per unit and in the textbook form.

    OPENBLAS_NUM_THREADS=1 python benchmarks/documents.py [--rounds N] [--write]

Until issue 15's follow-up, a cell with a reduction over units (mean, sum, logsumexp) was
documented in the unit form only (latex.Notation.form_for); layer_norm_lstm's document took
~26 s there (SymPy's LaTeX printer sorting long sums over units).  Now it is written in the
textbook form.  This script prints each cell's Markdown document in both forms
(``Notation(form="unit")`` is the old path, still available as ``--form unit``), the order
alternating from round to round, on a plan built once (derivation excluded; each
document is printed from a fresh derivation, as the CLI does), and reports the median over the rounds, the per-round range, and
the ratio textbook / unit (the median of the per-round ratios).

``--write`` replaces this script's section of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import rnn_cpu  # noqa: E402  (machine_info)
import sympy  # noqa: E402

from symrnn.latex import Notation  # noqa: E402
from symrnn.pipeline import build  # noqa: E402
from symrnn.render import render_markdown  # noqa: E402

RESULTS = ROOT / "benchmarks" / "RESULTS.md"
BEGIN, END = "<!-- documents.py: begin -->", "<!-- documents.py: end -->"
CELLS = ("layer_norm_lstm", "elman_classifier")
FORMS = ("unit", "vector")


def run(rounds: int) -> dict:
    times = {(c, f): [] for c in CELLS for f in FORMS}
    for k in range(rounds):
        for cell in CELLS:
            for form in (FORMS if k % 2 == 0 else FORMS[::-1]):
                plan = build(cell)  # a fresh derivation: nothing cached from the other form
                t = time.perf_counter()
                render_markdown(plan, Notation(form=form))
                times[cell, form].append(time.perf_counter() - t)
    return times


def table(times: dict) -> str:
    lines = ["| cell | unit form, s (median, range) | textbook form, s (median, range) | textbook / unit (median, range) |",
             "|---|---|---|---|"]
    for cell in CELLS:
        u, v = times[cell, "unit"], times[cell, "vector"]
        r = [b / a for a, b in zip(u, v)]
        lines.append(f"| {cell} | {statistics.median(u):.2f} ({min(u):.2f}-{max(u):.2f}) | "
                     f"{statistics.median(v):.2f} ({min(v):.2f}-{max(v):.2f}) | "
                     f"{statistics.median(r):.3f} ({min(r):.3f}-{max(r):.3f}) |")
    return "\n".join(lines)


def section(times: dict, rounds: int) -> str:
    info = rnn_cpu.machine_info()
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return f"""{BEGIN}
## Derivation documents of cells with reductions: unit form vs textbook form

`OPENBLAS_NUM_THREADS=1 python benchmarks/documents.py --write` ({when}; {info['cpu']}, {info['cores']} cores,
Python {info['python']}, SymPy {sympy.__version__}). One Markdown document per cell and form, {rounds} rounds,
the order of the forms alternating; medians, per-round ranges, and the median of the per-round ratios.
The machine is shared: the ratios are what count.  The unit form was these cells' only form before;
`symrnn latex` now writes the textbook form (`--form unit` still gives the other).

{table(times)}
{END}"""


def write(text: str) -> None:
    old = RESULTS.read_text() if RESULTS.exists() else ""
    if BEGIN in old and END in old:
        new = old[:old.index(BEGIN)] + text + old[old.index(END) + len(END):]
    else:
        new = old.rstrip("\n") + "\n\n" + text + "\n"
    RESULTS.write_text(new)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3, help="rounds (default 3)")
    ap.add_argument("--write", action="store_true", help="replace this script's section of benchmarks/RESULTS.md")
    args = ap.parse_args(argv)
    times = run(args.rounds)
    print(table(times))
    if args.write:
        write(section(times, args.rounds))
        print(f"wrote {RESULTS}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
