"""The driver: cell -> lower -> derive -> plan -> render -> write.

Each stage takes the previous stage's value and returns a new one:

    cell: Cell
      -> graph: StepGraph       (lower.lower: names resolved, sizes checked)
      -> derivation: Derivation (derive.derive: local partials, adjoints, tangents)
      -> plan: KernelPlan       (plan.plan: pre / loop / post, stages, stacked GEMMs)
      -> source: str            (render_numpy: backend statements + Jinja template)
"""

from __future__ import annotations

import os
import re
import tempfile
import types
from collections.abc import Iterable, Mapping
from pathlib import Path

import jinja2

from .backends.numpy_backend import dim, emit
from .cell import Cell
from .cells import builtin
from .derive import derive
from .errors import InternalError, UserError
from .escape import c_comment, html_comment, md_text, py_comment, py_docstring, py_raw_block, tex_comment, tex_text
from .lower import lower
from .plan import KernelPlan, plan

__all__ = ["build", "render_numpy", "render_cupy", "render_cuda", "load_module", "generate", "write_atomic", "module_name", "BACKENDS"]

#: backend name -> renderer (KernelPlan -> module source)
BACKENDS = ("numpy", "cupy", "torch")


def _template_loader() -> jinja2.BaseLoader:
    """The templates of this source checkout if it is one, else the installed package's.

    (An editable install maps ``symrnn.templates`` to one checkout's ``templates/``;
    a second checkout or worktree run from its own folder must use its own.)"""
    checkout = Path(__file__).resolve().parent.parent
    if (checkout / "pyproject.toml").is_file() and (checkout / "templates" / "numpy_module.py.j2").is_file():
        return jinja2.FileSystemLoader(checkout / "templates")
    return jinja2.PackageLoader("symrnn.templates", "")


_ENV = jinja2.Environment(
    loader=_template_loader(),
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
    keep_trailing_newline=True,
    autoescape=False,
)


def build(cell: Cell | str) -> KernelPlan:
    """Cell (or built-in name) -> kernel plan: lower, derive, plan."""
    cell = builtin(cell) if isinstance(cell, str) else cell
    graph = lower(cell)  # Cell -> StepGraph
    derivation = derive(graph)  # StepGraph -> Derivation
    return plan(derivation)  # Derivation -> KernelPlan


def module_name(cell_name: str, backend: str = "numpy") -> str:
    return f"{cell_name}_{backend}"


def render_numpy(kernel_plan: KernelPlan, command: str | None = None) -> str:
    """KernelPlan -> source of the NumPy module."""
    g = kernel_plan.graph
    m = emit(kernel_plan)
    from .cells import BUILTIN

    command = command or (
        f"symrnn generate {g.cell} --out generated" if g.cell in BUILTIN else f"symrnn generate --spec <file of {g.cell}>"
    )
    loss = g.loss
    return _ENV.get_template("numpy_module.py.j2").render(
        cell=g.cell,
        source=py_comment(g.source or "user-defined"),
        command=py_comment(command),
        title=py_docstring(f"NumPy kernels for the '{g.cell}' cell: forward, BPTT backward and RTRL gradients."),
        equations=[py_docstring(line) for line in _equation_lines(g)],
        outputs_doc=", ".join(f'"{o}"' for o in g.outputs),
        initial_doc=", ".join(f'"{s.name}0"' for s in g.states),
        has_loss=loss is not None,
        param_shapes=[(p.name, _tuple([dim(s) for s in p.shape])) for p in g.params],
        param_shape_names=[(p.name, _tuple([f'"{dim(s)}"' for s in p.shape])) for p in g.params],
        fixed_dims=[(k, v) for k, v in g.dims if v is not None],
        states=[(s.name, dim(s.size)) for s in g.states],
        state_shapes=[(s.name, dim(s.size)) for s in g.states],
        outputs=list(g.outputs),
        outputs_code=m.outputs,
        dim_sources=_dim_sources(kernel_plan),
        forward_setup=m.forward_setup,
        backward_setup=m.backward_setup,
        rtrl_bind=m.rtrl_bind,
        stacks=m.stacks,
        forward_pre=m.forward_pre,
        forward_alloc=m.forward_alloc,
        forward_loop=m.forward_loop,
        forward_post=m.forward_post,
        cache_names=m.cache_names,
        backward_seed=m.backward_seed,
        backward_carry=m.backward_carry,
        backward_post=m.backward_post,
        backward_coefs=m.backward_coefs,
        backward_loop=m.backward_loop,
        backward_after=m.backward_after,
        backward_pre=m.backward_pre,
        backward_weights=m.backward_weights,
        grads=m.grads,
        rtrl_setup=m.rtrl_setup,
        rtrl_loop=m.rtrl_loop,
        rtrl_grads=m.rtrl_grads,
        loss_value=m.loss_value,
        loss_grad=m.loss_grad,
        loss_scale=m.loss_scale,
        loss_doc=(f"{loss.reduction} over time of the per-step loss, summed over the batch") if loss else "",
        loss_mean=loss is not None and loss.reduction == "mean",
        quiet_overflow=_uses_op(g, "sigmoid"),
        target_of=loss.target_of if loss else "",
        contract=_contract(g),
    )


def render_cuda(kernel_plan: KernelPlan, command: str | None = None) -> str:
    """KernelPlan -> the CUDA C++ source of the cell's fused kernels (embedded in the CuPy module)."""
    from .backends.cupy_backend import emit_cupy, template_kernels
    from .cuda_printing import op_helpers

    g = kernel_plan.graph
    m = emit_cupy(kernel_plan)
    return _ENV.get_template("cuda_kernels.cu.j2").render(
        cell=g.cell,
        source=c_comment(g.source or "user-defined"),
        command=c_comment(command or _command(g.cell, "cupy")),
        ops=op_helpers(m.ops),
        kernels=template_kernels(m.kernels),
    )


def render_cupy(kernel_plan: KernelPlan, command: str | None = None) -> str:
    """KernelPlan -> source of the CuPy module (its CUDA source inside)."""
    from .backends.cupy_backend import BLOCK, design_note, emit_cupy
    from .backends.numpy_backend import emit_loss

    g = kernel_plan.graph
    m = emit_cupy(kernel_plan)
    command = command or _command(g.cell, "cupy")
    loss = g.loss
    numpy_parts = emit_loss(kernel_plan) if loss is not None else None
    return _ENV.get_template("cupy_module.py.j2").render(
        cell=g.cell,
        source=py_comment(g.source or "user-defined"),
        command=py_comment(command),
        title=py_docstring(f"CuPy kernels for the '{g.cell}' cell: forward and BPTT backward as fused CUDA kernels."),
        equations=[py_docstring(line) for line in _equation_lines(g)],
        outputs_doc=", ".join(f'"{o}"' for o in g.outputs),
        initial_doc=", ".join(f'"{s.name}0"' for s in g.states),
        has_loss=loss is not None,
        kernel_count=len(m.kernels),
        design=design_note(kernel_plan),
        kernels=m.kernels,
        block_size=BLOCK,
        param_shapes=[(p.name, _tuple([dim(s) for s in p.shape])) for p in g.params],
        param_shape_names=[(p.name, _tuple([f'"{dim(s)}"' for s in p.shape])) for p in g.params],
        fixed_dims=[(k, v) for k, v in g.dims if v is not None],
        states=[(s.name, dim(s.size)) for s in g.states],
        state_shapes=[(s.name, dim(s.size)) for s in g.states],
        outputs=list(g.outputs),
        outputs_code=m.outputs,
        dim_sources=_dim_sources(kernel_plan),
        setup=m.setup,
        stacks=m.stacks,
        forward=m.forward,
        cache_names=m.cache_names,
        backward=m.backward,
        grads=m.grads,
        loss_value=numpy_parts.loss_value.replace("np.", "cp.") if numpy_parts else "",
        loss_grad=numpy_parts.loss_grad.replace("np.", "cp.") if numpy_parts else "",
        loss_scale=numpy_parts.loss_scale if numpy_parts else "",
        loss_doc=(f"{loss.reduction} over time of the per-step loss, summed over the batch") if loss else "",
        loss_mean=loss is not None and loss.reduction == "mean",
        target_of=loss.target_of if loss else "",
        cuda_source=py_raw_block("\n" + render_cuda(kernel_plan, command)),
        contract=_contract(g),
    )


def _command(cell: str, backend: str) -> str:
    from .cells import BUILTIN

    flag = "" if backend == "numpy" else f" --backend {backend}"
    return f"symrnn generate {cell}{flag} --out generated" if cell in BUILTIN else f"symrnn generate{flag} --spec <file of {cell}>"


def _contract(g) -> dict:
    """StepGraph -> what the module says about its input and how it draws parameters and
    initial states (``INPUT_SIZE``, ``PARAM_INITS``, ``STATE_INITS``, ``init_params``,
    ``init_state0``), as plain strings for the templates.

    A parameter without a declared init is drawn as PyTorch draws it,
    ``rng.uniform(-bound, bound, shape)`` with bound = 1/sqrt(n_hidden), in declaration
    order: the generator is called in the same sequence as before inits could be declared."""
    params = [(p.name, (p.init.code(f'shapes["{p.name}"]') if p.init else f'rng.uniform(-bound, bound, shapes["{p.name}"])')
               + ".astype(dtype)") for p in g.params]
    states = [(s.name, s.init.code(f"(batch, {dim(s.size)})") + ".astype(dtype)" if s.init
               else f"np.zeros((batch, {dim(s.size)}), dtype)") for s in g.states]
    declared = [(p.name, p.init.text) for p in g.params if p.init]
    declared_states = [(s.name, s.init.text) for s in g.states if s.init]
    for _, text in declared + declared_states:  # printed inside "...": numbers, dimensions, operators only
        if not re.fullmatch(r"[\w .+\-*/(),]*", text):
            raise InternalError(f"init text {text!r} holds a character it cannot hold")
    listed = ", ".join(f"{name} ~ {text}" for name, text in declared)
    if not declared:
        init_doc = "Parameters drawn uniformly from [-1/sqrt(n_hidden), 1/sqrt(n_hidden)] (as PyTorch does)."
    elif len(declared) == len(params):
        init_doc = f"Parameters drawn as the cell declares them: {listed}."
    else:
        init_doc = (f"Parameters drawn as the cell declares them ({listed}); the others uniformly from "
                    "[-1/sqrt(n_hidden), 1/sqrt(n_hidden)] (as PyTorch does).")
    zero = "zero (where forward starts a state that state0 leaves out)"
    if declared_states:
        others = f"; the others {zero}" if len(declared_states) < len(states) else ""
        state0_doc = ("Initial states for forward, (batch, size) each, drawn as the cell declares them: "
                      + ", ".join(f"{name} ~ {text}" for name, text in declared_states) + others + ".")
    else:
        state0_doc = f"Initial states for forward, (batch, size) each, all {zero}: the cell declares no initializer."
    return {
        "input_size": dim(g.input.size),
        "param_inits": params,
        "state_inits": states,
        "declared_params": declared,
        "declared_states": declared_states,
        "uses_bound": any(p.init is None for p in g.params),
        "uses_rng": any(s.init is not None and s.init.kind != "constant" for s in g.states),
        "init_doc": py_docstring(init_doc),
        "state0_doc": py_docstring(state0_doc),
    }


def _uses_op(g, name: str) -> bool:
    """Whether a node of the step graph applies op ``name``."""
    from .ir import Pointwise

    return any(isinstance(n, Pointwise) and n.op is not None and n.op.__name__ == name for n in g.nodes)


def _tuple(items: list[str]) -> str:
    return "(" + ", ".join(items) + ("," if len(items) == 1 else "") + ")"


def _equation_lines(g) -> list[str]:
    from .cell import _plain

    lines = [f"{lhs} = {_plain(rhs)}" for lhs, rhs in g.equations]
    if g.loss is not None:
        lines.append(f"L^t = {_plain(g.loss.expr)}    (L = {g.loss.reduction} over t)")
    return lines


def _dim_sources(kernel_plan: KernelPlan) -> list[tuple[str, str]]:
    """Code reading n_hidden and n_out off the parameters' shapes."""
    import sympy

    from .cell import DIMS

    g = kernel_plan.graph
    out = []
    for name in ("n_hidden", "n_out"):
        fixed = dict(g.dims)[name]
        if fixed is not None:
            out.append((name, str(fixed)))
            continue
        source = None
        for p in g.params:
            for axis, size in enumerate(p.shape):
                coeff = sympy.simplify(size / DIMS[name])
                if coeff.is_Integer and coeff > 0:
                    source = f'_dim_of(p, "{p.name}", {axis}' + (f", {coeff})" if coeff != 1 else ")")
                    break
            if source:
                break
        out.append((name, source or ("n_hidden" if name == "n_out" else "None")))
    return out


def load_module(source: str, name: str) -> types.ModuleType:
    """Execute generated source as a fresh module (not registered in sys.modules)."""
    module = types.ModuleType(name)
    module.__file__ = f"<symrnn:{name}>"
    exec(compile(source, module.__file__, "exec"), module.__dict__)
    return module


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    _replace(Path(path), text.encode("utf-8"))


def _replace(path: Path, data: bytes) -> None:
    """Put ``data`` at ``path`` atomically: a temporary file beside it, then a rename.
    On any failure the temporary file is removed and ``path`` is left as it was."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        _usual_mode(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _usual_mode(path: str) -> None:
    """Give a temporary file the mode a plain open() would (mkstemp makes it 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def generated_init(names: Iterable[str]) -> str:
    from . import __version__

    mods = sorted(names)
    lines = [
        "# Generated by symrnn. Do not edit. Regenerate with: symrnn generate --backend all --out generated",
        f'"""Generated kernel modules (symrnn {__version__}): *_numpy depend on NumPy only, *_cupy on NumPy and CuPy, '
        '*_torch on torch and the cell\'s *_numpy (and *_cupy) module."""',
        "",
        "MODULES = (",
        *[f'    "{m}",' for m in mods],
        ")",
        "",
    ]
    return "\n".join(lines)


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
    from .torch_render import render_torch

    renderers = {"numpy": render_numpy, "cupy": render_cupy, "torch": render_torch}
    commands = commands or {}
    rendered: dict[str, str] = {}
    for cell in cells:
        kp = build(cell)
        for backend in backends:
            command = commands.get(kp.graph.cell)
            if command and backend != "numpy":
                command += f" --backend {backend}"
            rendered[module_name(kp.graph.cell, backend) + ".py"] = renderers[backend](kp, command)
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


def render_latex(kernel_plan: KernelPlan, notation=None, command: str | None = None) -> str:
    """KernelPlan -> a standalone LaTeX document of the cell's derivation."""
    return _render_document(kernel_plan, notation, "tex", command)


def render_markdown(kernel_plan: KernelPlan, notation=None, command: str | None = None) -> str:
    """KernelPlan -> the derivation as Markdown with $$ math blocks (renders on code-hosting sites)."""
    return _render_document(kernel_plan, notation, "md", command)


def _render_document(kernel_plan: KernelPlan, notation, fmt: str, command: str | None = None) -> str:
    from .cells import BUILTIN
    from .latex import Notation, document_data

    data = document_data(kernel_plan, notation or Notation())
    g = kernel_plan.graph
    out = " -o docs/derivations" if fmt == "md" else ""
    command = command or (
        f"symrnn latex {g.cell} --format {fmt}{out}" if g.cell in BUILTIN else f"symrnn latex --spec <file of {g.cell}>"
    )
    source = g.source or "user-defined"
    if fmt == "tex":
        text = dict(command=tex_comment(command), source_comment=tex_comment(source), source_text=tex_text(source),
                    cell_text=tex_text(g.cell))
    else:
        text = dict(command=html_comment(command), source_comment=html_comment(source), source_text=md_text(source))
    return _ENV.get_template(f"derivation.{fmt}.j2").render(**data, **text)


def compile_pdf(tex: str, out: Path, timeout: float = 120.0) -> Path:
    """Compile ``tex`` with pdflatex in a scratch folder; move the PDF to ``out`` atomically.

    pdflatex runs confined: no shell escape, reading and writing only inside the
    scratch folder (kpathsea's paranoid ``openin_any``/``openout_any``), no terminal
    input, and a time limit.  A failure raises a UserError with the first error lines
    of pdflatex's log; ``out`` is then left as it was."""
    import shutil
    import subprocess

    exe = shutil.which("pdflatex")
    if exe is None:
        raise UserError("pdflatex is not installed (Debian: apt-get install texlive-latex-base texlive-latex-recommended)")
    out = Path(out)
    env = {**os.environ, "openin_any": "p", "openout_any": "p", "shell_escape": "f"}
    with tempfile.TemporaryDirectory(prefix="symrnn-latex-") as tmp:
        src = Path(tmp) / "derivation.tex"
        src.write_text(tex, encoding="utf-8")
        for _ in range(2):  # twice, for the equation references
            try:
                proc = subprocess.run([exe, "-no-shell-escape", "-interaction=nonstopmode", "-halt-on-error", src.name],
                                      cwd=tmp, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                      errors="replace", timeout=timeout)
            except subprocess.TimeoutExpired:
                raise UserError(f"pdflatex did not finish within {timeout:.0f} s; nothing was written") from None
            if proc.returncode != 0:
                log = (Path(tmp) / "derivation.log")
                text = log.read_text(errors="replace") if log.exists() else proc.stdout
                errors = [line for line in text.splitlines() if line.startswith("!")][:3]
                raise UserError(f"pdflatex failed: {' | '.join(errors) or 'see its log'}")
        _replace(out, (Path(tmp) / "derivation.pdf").read_bytes())
    return out
