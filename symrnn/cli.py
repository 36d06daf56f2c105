"""The ``symrnn`` command.

    symrnn list                          built-in cells, one line each, with their source
    symrnn show [CELL ...]               the equations of cells
    symrnn generate [CELL ...] [--out DIR] [--backend numpy|cupy|all]
                                         write <cell>_numpy.py (and/or <cell>_cupy.py) modules (all cells by default)
    symrnn check [CELL ...]              finite differences and RTRL = BPTT, per parameter
    symrnn latex CELL ... [--format tex|md|pdf] [-o FILE|DIR]   the derivation as a document

Every command that takes cells also takes ``--spec FILE`` (repeatable): a cell
from an equations file (``docs/spec-format.md``), with ``--set NAME=VALUE`` to
change one of its ``[constants]``.

Bad input (an unknown cell, a wrong spec file, an unwritable folder, a bad
option) prints one line ``symrnn: error: ...`` and exits with status 2; a failed
check exits with 1.  Warnings (an unused parameter, a state that is not
recurrent) print one line ``symrnn: warning: ...`` each and change nothing.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings

from .cells import BUILTIN, builtin
from .errors import UserError
from .escape import one_line

EXIT_FAIL, EXIT_USAGE = 1, 2


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse prints usage too)
        raise UserError(f"{message} (see '{self.prog} --help')")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="symrnn", description="Recurrent-cell equations -> verified gradient kernels.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    sub.add_parser("list", help="list the built-in cells")
    show = sub.add_parser("show", help="print a cell's equations")
    show.add_argument("cells", nargs="*", metavar="CELL", help="built-in cells to show")
    _spec_options(show)
    gen = sub.add_parser("generate", help="write NumPy (and CuPy) kernel modules")
    gen.add_argument("cells", nargs="*", metavar="CELL", help="cells to generate (default: all built-in cells)")
    gen.add_argument("--out", default="generated", help="output folder (default: generated)")
    gen.add_argument("--backend", choices=("numpy", "cupy", "all"), default="numpy",
                     help="numpy (default): <cell>_numpy.py; cupy: <cell>_cupy.py (fused CUDA kernels); all: both")
    _spec_options(gen)
    latex = sub.add_parser("latex", help="export the derivation as LaTeX, Markdown or PDF")
    latex.add_argument("cells", nargs="*", metavar="CELL", help="cells to export (default: all built-in cells)")
    _spec_options(latex)
    latex.add_argument("--format", choices=("tex", "md", "pdf"), default="tex", help="tex (default), md or pdf (through pdflatex)")
    latex.add_argument("--time", choices=("super", "index"), default="super", help="write time as h^{t} (super) or h[t] (index)")
    latex.add_argument("--rename", action="append", default=[], metavar="NAME=SHOWN",
                       help="write a name differently, e.g. --rename s=h (repeatable)")
    latex.add_argument("-o", "--output", help="output file, or an existing folder for <cell>.<format> (default: the current folder); '-' prints")
    check = sub.add_parser("check", help="check gradients: finite differences and RTRL = BPTT")
    check.add_argument("cells", nargs="*", metavar="CELL", help="cells to check (default: all built-in cells)")
    check.add_argument("--seed", type=int, default=0, help="seed of the random instance (default: 0)")
    _spec_options(check)
    return parser


def _spec_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--spec", action="append", default=[], metavar="FILE",
                        help="a cell from an equations file (TOML, see docs/spec-format.md); repeatable")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", dest="constants",
                        help="set a [constants] entry of the --spec files, e.g. --set forget_bias=2.0; repeatable")


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
        return _COMMANDS[args.command](args)
    except UserError as exc:
        print(f"symrnn: error: {one_line(str(exc))}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("symrnn: interrupted", file=sys.stderr)
        return 130


def _selected(args, default_all: bool = True) -> list[tuple]:
    """(cell, command or None) for the named built-in cells and every --spec file, all
    read and checked before any work (a UserError on the first bad one); each warning
    of a spec file is printed on one line."""
    from .spec import SpecWarning, load_spec

    constants = _constants(args.constants)
    if constants and not args.spec:
        raise UserError("--set changes the [constants] of --spec files; give --spec FILE")
    names = args.cells or ([] if args.spec or not default_all else list(BUILTIN))
    selected = [(builtin(n), None) for n in names]  # raises UserError on an unknown name
    for path in args.spec:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", SpecWarning)
            cell = load_spec(path, constants)
        for w in caught:
            if issubclass(w.category, SpecWarning):
                print(f"symrnn: warning: {one_line(str(w.message))}", file=sys.stderr)
            else:  # pragma: no cover - not ours: pass it on
                warnings.showwarning(w.message, w.category, w.filename, w.lineno)
        sets = "".join(f" --set {k}={v}" for k, v in constants.items())
        selected.append((cell, f"--spec {path}{sets}"))
    seen: dict[str, str] = {}
    for cell, command in selected:
        origin = command or "built-in"
        if cell.name in seen:
            raise UserError(f"two cells are named '{cell.name}' ({seen[cell.name]} and {origin}); "
                            "rename one ([cell] name = ...)")
        seen[cell.name] = origin
    return selected


def _constants(items: list[str]) -> dict[str, float]:
    out: dict[str, float] = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            number = int(value) if value.strip().lstrip("+-").isdigit() else float(value)
        except ValueError:
            number = None
        if not sep or not name.isidentifier() or number is None:
            raise UserError(f"--set '{item}': expected NAME=NUMBER, e.g. --set forget_bias=2.0")
        out[name] = number
    return out


def _list(args) -> int:
    width = max(len(n) for n in BUILTIN)
    for name in BUILTIN:
        cell = builtin(name)
        print(f"{name:{width}s}  [{cell.source}]  {cell.description}")
    return 0


def _show(args) -> int:
    selected = _selected(args, default_all=False)
    if not selected:
        raise UserError("show: name a cell (symrnn list shows them) or give --spec FILE")
    from .cells import SPEC_CELLS, spec_path

    texts = []
    for cell, command in selected:
        where = f"\n  spec file: {spec_path(cell.name)} (copy it to start a variant)" if not command and cell.name in SPEC_CELLS else ""
        texts.append(cell.equations_text() + where)
    print("\n\n".join(texts))
    return 0


def _generate(args) -> int:
    from .pipeline import generate

    if not args.out.strip():
        raise UserError("--out: the output folder's name is empty")
    selected = _selected(args)
    start = time.perf_counter()
    backends = ("numpy", "cupy") if args.backend == "all" else (args.backend,)
    commands = {cell.name: f"symrnn generate {command}" for cell, command in selected if command}
    written = generate([cell for cell, _ in selected], args.out, backends, commands=commands)
    for path in written:
        print(f"wrote {path}")
    print(f"generated {len(written)} module(s) in {time.perf_counter() - start:.2f} s")
    return 0


def _check(args) -> int:
    from .gradcheck import check_module, report
    from .pipeline import build, load_module, module_name, render_numpy

    failed = 0
    for cell, _ in _selected(args):
        module = load_module(render_numpy(build(cell)), module_name(cell.name))
        results = check_module(module, seed=args.seed)
        print(report(cell.name, results))
        failed += sum(not r.ok for r in results)
    print("all checks passed" if not failed else f"{failed} check(s) failed")
    return EXIT_FAIL if failed else 0


def _latex(args) -> int:
    from pathlib import Path

    from .latex import Notation
    from .pipeline import build, compile_pdf, render_latex, render_markdown, write_atomic

    if args.output is not None and not args.output.strip():
        raise UserError("-o: the output file's name is empty")
    selected = _selected(args)
    rename = []
    for item in args.rename:
        old, sep, new = item.partition("=")
        if not sep or not old.isidentifier() or not new.isidentifier():
            raise UserError(f"--rename '{item}': expected NAME=SHOWN, e.g. --rename s=h")
        rename.append((old, new))
    notation = Notation(time=args.time, rename=tuple(rename))
    render = render_markdown if args.format == "md" else render_latex
    out = " -o docs/derivations" if args.format == "md" else ""
    documents = {}  # all before writing
    for cell, command in selected:
        extra = {"command": f"symrnn latex {command} --format {args.format}{out}"} if command else {}
        documents[cell.name] = render(build(cell), notation, **extra)
    if args.output == "-":
        if args.format == "pdf":
            raise UserError("--format pdf cannot be written to standard output; give -o FILE.pdf")
        sys.stdout.write("".join(documents.values()))
        return 0
    target = Path(args.output or ".")
    if target.is_dir():
        paths = {name: target / f"{name}.{args.format}" for name in documents}
    elif len(documents) > 1:
        raise UserError(f"-o '{target}' must be an existing folder when several cells are exported")
    elif not target.parent.is_dir():
        raise UserError(f"cannot write '{target}': folder '{target.parent}' does not exist")
    else:
        paths = {next(iter(documents)): target}
    for name, text in documents.items():
        try:
            if args.format == "pdf":
                compile_pdf(text, paths[name])
            else:
                write_atomic(paths[name], text)
        except OSError as exc:
            raise UserError(f"cannot write '{paths[name]}': {exc.strerror or exc}") from None
        print(f"wrote {paths[name]}")
    return 0


_COMMANDS = {"list": _list, "show": _show, "generate": _generate, "check": _check, "latex": _latex}

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
