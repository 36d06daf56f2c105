"""The ``symrnn`` command.

    symrnn list                          built-in cells, one line each, with their source
    symrnn show [CELL ...]               the equations of cells
    symrnn generate [CELL ...] [--out DIR] [--backend numpy|cupy|all]
                                         write <cell>_numpy.py (and/or <cell>_cupy.py) modules (all cells by default)
    symrnn check [CELL ...]              finite differences and RTRL = BPTT, per parameter
    symrnn latex CELL ... [--format tex|md|pdf] [--form vector|unit] [-o FILE|DIR]   the derivation as a document
    symrnn verify CLAIMS.toml ...        check a hand-written derivation (docs/claims-format.md)
    symrnn --version                     symrnn 0.1.0

Every command that takes cells also takes ``--spec FILE`` (repeatable): a cell
from an equations file (``docs/spec-format.md``), with ``--set NAME=VALUE`` to
change one of its ``[constants]``.

Bad input (an unknown cell, a wrong spec file, an unwritable folder, a bad
option, standard output that cannot be written) prints one line
``symrnn: error: ...`` and exits with status 2; a failed check exits with 1.
Warnings (an unused parameter, a state that is not recurrent) print one line
``symrnn: warning: ...`` each and change nothing.  Ctrl-C (130) and SIGTERM
(143) stop with one line and remove the temporary file of a write in progress;
a reader that goes away (``symrnn list | head -1``) ends the command quietly (141).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import re
import signal
import sys
import time
import warnings

from .version import __version__
from .cells import BUILTIN, builtin
from .errors import UserError, suggest
from .escape import one_line, shown

EXIT_FAIL, EXIT_USAGE = 1, 2
#: killed by a signal: 128 + its number, as a shell reports it
EXIT_INTERRUPTED, EXIT_BROKEN_PIPE, EXIT_TERMINATED = 130, 141, 143


class OutputError(UserError):
    """Standard output cannot be written (a full disk, a device that takes nothing)."""


class Terminated(BaseException):
    """SIGTERM as an exception (like KeyboardInterrupt for SIGINT): the cleanup of a write
    in progress runs, and no temporary file is left behind."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse prints usage too)
        raise UserError(f"{message} (see '{self.prog} --help')")

    def _print_message(self, message, file=None):  # --help and --version: written as all output is
        if file is sys.stdout and message:
            _write(message)
        else:
            super()._print_message(message, file)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="symrnn", description="Recurrent-cell equations -> verified gradient kernels.")
    parser.add_argument("--version", action="version", version=f"symrnn {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    sub.add_parser("list", help="list the built-in cells")
    show = sub.add_parser("show", help="print a cell's equations")
    show.add_argument("cells", nargs="*", metavar="CELL", help="built-in cells to show")
    _spec_options(show)
    gen = sub.add_parser("generate", help="write NumPy (and CuPy) kernel modules")
    gen.add_argument("cells", nargs="*", metavar="CELL", help="cells to generate (default: all built-in cells)")
    gen.add_argument("--out", default="generated", help="output folder (default: generated)")
    from .render import BACKENDS

    written = [f"{b.name}{' (default)' if b.name == 'numpy' else ''}: {b.writes}" for b in BACKENDS.values()]
    gen.add_argument("--backend", choices=(*BACKENDS, "all"), default="numpy",
                     help="; ".join(written) + f"; all: {({2: 'both', 3: 'all three'}).get(len(BACKENDS), 'all of them')}")
    _spec_options(gen)
    latex = sub.add_parser("latex", help="export the derivation as LaTeX, Markdown or PDF")
    latex.add_argument("cells", nargs="*", metavar="CELL", help="cells to export (default: all built-in cells)")
    _spec_options(latex)
    latex.add_argument("--format", choices=("tex", "md", "pdf"), default="tex", help="tex (default), md or pdf (through pdflatex)")
    latex.add_argument("--time", choices=("super", "index"), default="super", help="write time as h^{t} (super) or h[t] (index)")
    latex.add_argument("--form", choices=("vector", "unit"), default="vector",
                       help="vector (default): the textbook form, W^T delta and the concatenation [h; x]; unit: per unit, "
                       "ds_l/du_ij with Kronecker deltas (seeds 000/001)")
    latex.add_argument("--rename", action="append", default=[], metavar="NAME=SHOWN",
                       help="write a name differently, e.g. --rename s=h (repeatable)")
    latex.add_argument("-o", "--output", help="output file, or an existing folder for <cell>.<format> (default: the current folder); '-' prints")
    verify = sub.add_parser("verify", help="check a hand-written derivation (a claims file, docs/claims-format.md)")
    verify.add_argument("claims", nargs="+", metavar="CLAIMS.toml", help="claims files")
    verify.add_argument("--format", choices=("text", "md"), default="text", help="text (default) or md (a Markdown report)")
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
    previous = _on_sigterm(_terminate)
    try:
        return _main(argv)
    finally:
        _on_sigterm(previous)


def _main(argv: list[str] | None) -> int:
    try:
        args = _parse(argv)
        code = _COMMANDS[args.command](args)
        _flush()
        return code
    except UserError as exc:
        if isinstance(exc, OutputError):
            _drop_stdout()
        print(f"symrnn: error: {one_line(str(exc))}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # the reader went away (symrnn list | head -1): stop quietly
        _drop_stdout()
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:
        print("symrnn: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Terminated:
        print("symrnn: terminated", file=sys.stderr)
        return EXIT_TERMINATED


def _parse(argv: list[str] | None) -> argparse.Namespace:
    """The arguments.  After --help or --version argparse exits: what it printed is flushed
    first, here, where a failure to write is handled."""
    try:
        return _parser().parse_args(argv)
    except SystemExit:
        _flush()
        raise


def _terminate(signum, frame):
    raise Terminated()


def _on_sigterm(handler):
    """Install ``handler`` for SIGTERM; the one it replaces (None off the main thread, where
    Python cannot install one)."""
    if handler is None:
        return None
    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:
        return None


# -- standard output: a failed write is one line, a closed pipe is silence ----------------
@contextlib.contextmanager
def _stdout():
    """Around a write to standard output: a failure (a full disk, /dev/full) becomes an
    OutputError; a closed pipe stays a BrokenPipeError."""
    try:
        yield
    except BrokenPipeError:
        raise
    except OSError as exc:
        raise OutputError(f"cannot write to standard output: {exc.strerror or exc}") from None


def _write(text: str) -> None:
    with _stdout():
        sys.stdout.write(text)


def _say(*lines: str) -> None:
    _write("".join(f"{line}\n" for line in lines))


def _flush() -> None:
    with _stdout():
        sys.stdout.flush()


def _drop_stdout() -> None:
    """Point standard output at the null device, so that the flush at exit has nothing to fail
    on (Python's recipe for SIGPIPE; no "Exception ignored" message)."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # not a real file (captured in tests)
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


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
    cells = [builtin(name) for name in BUILTIN]
    _say(*(f"{cell.name:{width}s}  [{cell.source}]  {cell.description}" for cell in cells))
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
    _say("\n\n".join(texts))
    return 0


def _backends(choice: str) -> tuple[str, ...]:
    """The backends ``--backend`` names: one (and those whose modules its module imports), or all."""
    from .render import BACKENDS

    chosen = tuple(BACKENDS) if choice == "all" else (choice,)
    return tuple(dict.fromkeys(name for b in chosen for name in (*BACKENDS[b].needs, b)))


def _generate(args) -> int:
    from .pipeline import generate

    if not args.out.strip():
        raise UserError("--out: the output folder's name is empty")
    selected = _selected(args)
    start = time.perf_counter()
    backends = _backends(args.backend)
    commands = {cell.name: f"symrnn generate {command}" for cell, command in selected if command}
    written = generate([cell for cell, _ in selected], args.out, backends, commands=commands)
    _say(*(f"wrote {path}" for path in written))
    _say(f"generated {len(written)} module(s) in {time.perf_counter() - start:.2f} s")
    return 0


def _check(args) -> int:
    from .gradcheck import check_module, report
    from .pipeline import build, load_module, module_name, render_numpy

    failed = 0
    for cell, _ in _selected(args):
        module = load_module(render_numpy(build(cell)), module_name(cell.name))
        _check_fits(cell.name, module)
        try:
            results = check_module(module, seed=args.seed)
        except MemoryError:
            raise UserError(f"check: cell '{cell.name}': out of memory while checking; {_SMALLER}") from None
        _say(report(cell.name, results))
        failed += sum(not r.ok for r in results)
    _say("all checks passed" if not failed else f"{failed} check(s) failed")
    return EXIT_FAIL if failed else 0


#: the random instance ``check`` runs (gradcheck's defaults): its sizes where the cell does
#: not fix them, T time steps, a batch of B
_CHECK_DIMS, _CHECK_T, _CHECK_B = {"n_in": 3, "n_hidden": 4, "n_out": 2}, 6, 3
#: the most entries (parameters, input, initial states) a check differentiates: finite
#: differences run the cell twice per entry, RTRL carries a tangent for each (at the limit an
#: Elman cell takes 15 s and 330 MB on 2 cores; a cell with free sizes has tens to hundreds)
MAX_CHECK_ENTRIES = 20_000
_SMALLER = ("check a copy of the cell with smaller sizes (its [cell] dims and shapes): the derived gradients "
            "are the same for every size")


def _check_fits(name: str, module) -> None:
    """Refuse, before allocating anything, a check instance over MAX_CHECK_ENTRIES entries."""
    from .lower import parse_size

    dims = {**_CHECK_DIMS, **module.FIXED_DIMS}
    shapes = module.param_shapes(dims["n_in"], dims["n_hidden"], dims["n_out"])
    states = sum(int(parse_size(size).subs(_dim_symbols(dims))) for size in module.STATES.values())
    entries = sum(math.prod(shape) for shape in shapes.values()) + _CHECK_T * _CHECK_B * dims["n_in"] + _CHECK_B * states
    if entries > MAX_CHECK_ENTRIES:
        fixed = module.FIXED_DIMS
        sizes = ", ".join(f"{k} = {v}" for k, v in (fixed or dims).items()) + (" fixed by the cell" if fixed else "")
        raise UserError(f"check: cell '{name}' is too big to check: with {sizes}, its parameters, input and initial "
                        f"states have {entries:,} entries, and check handles at most {MAX_CHECK_ENTRIES:,} (finite "
                        f"differences run the cell twice per entry); {_SMALLER}")


def _dim_symbols(dims: dict[str, int]) -> dict:
    from .cell import DIMS

    return {DIMS[k]: v for k, v in dims.items()}


def _latex(args) -> int:
    from pathlib import Path

    from .latex import Notation
    from .pipeline import build, compile_pdf, render_latex, render_markdown, write_atomic

    if args.output is not None and not args.output.strip():
        raise UserError("-o: the output file's name is empty")
    selected = _selected(args)
    rename = _renames(args.rename, [cell for cell, _ in selected])
    notation = Notation(time=args.time, rename=rename, form=args.form)
    render = render_markdown if args.format == "md" else render_latex
    out = " -o docs/derivations" if args.format == "md" else ""
    documents = {}  # all before writing
    for cell, command in selected:
        form = " --form unit" if args.form == "unit" else ""
        extra = {"command": f"symrnn latex {command} --format {args.format}{form}{out}"} if command else {}
        documents[cell.name] = render(build(cell), notation, **extra)
    if args.output == "-":
        if args.format == "pdf":
            raise UserError("--format pdf cannot be written to standard output; give -o FILE.pdf")
        _write("".join(documents.values()))
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
        _say(f"wrote {paths[name]}")
    return 0


_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")


def _renames(items: list[str], cells: list) -> tuple[tuple[str, str], ...]:
    """The --rename NAME=SHOWN pairs: NAME a name of the cells exported, no two names shown alike."""
    pairs: dict[str, str] = {}
    for item in items:
        old, sep, new = item.partition("=")
        if not sep or not _NAME.fullmatch(old) or not _NAME.fullmatch(new):
            raise UserError(f"--rename {shown(item)}: expected NAME=SHOWN, each of ASCII letters, digits and _, "
                            "starting with a letter, e.g. --rename s=h")
        if old in pairs:
            raise UserError(f"--rename {old}=...: '{old}' is renamed twice ({old}={pairs[old]} and {item})")
        pairs[old] = new
    names = [_names(cell) for cell in cells]
    for old, new in pairs.items():
        if any(_state_of(old, cell) for cell in cells):
            state = old[: -len("_prev")]
            raise UserError(f"--rename {old}={new}: '{old}' is state '{state}' at t-1, written with the state's name; "
                            f"rename the state: --rename {state}={new}")
        if not any(old in kinds for kinds in names):
            everything = {n for kinds in names for n in kinds}
            where = f"cell '{cells[0].name}' has no" if len(cells) == 1 else f"none of the {len(cells)} cells exported has a"
            listed = f"; its names: {', '.join(names[0])}" if len(cells) == 1 else ""
            raise UserError(f"--rename {old}={new}: {where} name '{old}'{suggest(old, everything)}{listed}")
    for cell, kinds in zip(cells, names):
        _unambiguous(cell, kinds, pairs)
    return tuple(pairs.items())


def _names(cell) -> dict[str, str]:
    """Every name of a cell a document shows -> what it is."""
    kinds = {name: "the input" for name in cell.inputs}
    for state in cell.states:
        kinds[state], kinds[f"{state}_prev"] = "a state", f"state '{state}' at t-1"
    kinds.update({name: "a parameter" for name in cell.params})
    kinds.update({name: "an equation" for name in cell.equations if name not in kinds})
    kinds.update({name: "a readout" for name in cell.readout})
    return kinds


def _state_of(name: str, cell) -> str | None:
    """The state whose value at t-1 ``name`` is (``h`` for ``h_prev``), or None."""
    state = name[: -len("_prev")] if name.endswith("_prev") else None
    return state if state in cell.states else None


def _unambiguous(cell, kinds: dict[str, str], pairs: dict[str, str]) -> None:
    """No two names of ``cell`` shown alike (a state at t-1 is shown through its state)."""
    def as_shown(name: str) -> str:
        state = _state_of(name, cell)
        return pairs.get(state, state) + "_prev" if state else pairs.get(name, name)

    def flag(name: str) -> str:  # the --rename that changes how ``name`` is shown
        key = _state_of(name, cell) or name
        return f"--rename {key}={pairs[key]}"

    seen: dict[str, str] = {}
    for name in kinds:
        shown_as = as_shown(name)
        other = seen.setdefault(shown_as, name)
        if other == name:
            continue
        if as_shown(other) != other and shown_as != name:
            raise UserError(f"{flag(other)} and {flag(name)}: two names of cell '{cell.name}' would be shown as "
                            f"{shown_as}; choose another name")
        renamed, kept = (name, other) if shown_as != name else (other, name)
        raise UserError(f"{flag(renamed)}: cell '{cell.name}' already has a name '{shown_as}' ({kinds[kept]}), so "
                        f"the document would show both as {shown_as}; choose another name")


def _verify(args) -> int:
    """Every claims file read and checked first (a UserError on the first bad one), then judged."""
    from .claims import load_claims
    from .verify import format_report, markdown_page, verify

    files = [load_claims(path) for path in args.claims]
    reports = [verify(claims) for claims in files]
    wrong = sum(r.wrong for r in reports)
    if args.format == "md":
        _write(markdown_page(reports, "symrnn verify --format md " + " ".join(args.claims)))
    else:
        _say("\n\n".join(format_report(r) for r in reports))
        _say("all claims are correct" if not wrong else f"{wrong} claim(s) are wrong")
    return EXIT_FAIL if wrong else 0


_COMMANDS = {"list": _list, "show": _show, "generate": _generate, "check": _check, "latex": _latex, "verify": _verify}

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
