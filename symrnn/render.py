"""Rendering: Jinja templates (the package's own, StrictUndefined) filled from each
backend's statements and the cell's contract, atomic writes, and the registry of backends.

Every backend hands its template the :class:`ModuleHeader` (what every generated module
states about its cell: names, shapes, equations, the loss, the contract of inits and
sizes) and its own sections; :data:`BACKENDS` is the one list of backends, which the CLI,
``generate``, ``generated/__init__.py`` and the tests read.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from pathlib import Path

import jinja2

from .backends.numpy_backend import loss_code
from .backends.python_printer import dim
from .errors import InternalError, UserError
from .ir import MatVecNode
from .escape import c_comment, html_comment, md_text, py_comment, py_docstring, py_raw_block, tex_comment, tex_text
from .plan import KernelPlan

__all__ = ["BACKENDS", "Backend", "ModuleHeader", "compile_pdf", "generated_init", "module_header", "render_cuda",
           "render_cupy", "render_latex", "render_markdown", "render_numba", "render_numpy", "render_torch", "write_atomic"]


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


@dataclass(frozen=True)
class ModuleHeader:
    """What every generated module states about its cell (escaped for where it goes)."""

    cell: str
    source: str
    command: str
    title: str
    equations: tuple[str, ...]
    outputs_doc: str
    initial_doc: str
    has_loss: bool
    param_shapes: tuple
    param_shape_names: tuple
    fixed_dims: tuple
    states: tuple
    state_shapes: tuple
    outputs: tuple[str, ...]
    dim_sources: tuple
    loss_value: str
    loss_grad: str
    loss_scale: str
    loss_doc: str
    loss_mean: bool
    target_of: str
    contract: dict

    def fields(self) -> dict:
        """The header as the template's variables."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def module_header(kernel_plan: KernelPlan, backend: str, title: str, command: str | None, lib: str = "np") -> ModuleHeader:
    """The header of ``backend``'s module for ``kernel_plan`` (``lib``: the array library
    its loss is written over)."""
    g = kernel_plan.graph
    loss = g.loss
    loss_value, loss_grad, loss_scale = loss_code(kernel_plan, lib) if loss is not None else ("", "", "")
    return ModuleHeader(
        cell=g.cell,
        source=py_comment(g.source or "user-defined"),
        command=py_comment(command or _command(g.cell, backend)),
        title=py_docstring(title),
        equations=tuple(py_docstring(line) for line in _equation_lines(g)),
        outputs_doc=", ".join(f'"{o}"' for o in g.outputs),
        initial_doc=", ".join(f'"{s.name}0"' for s in g.states),
        has_loss=loss is not None,
        param_shapes=tuple((p.name, _tuple([dim(s) for s in p.shape])) for p in g.params),
        param_shape_names=tuple((p.name, _tuple([f'"{dim(s)}"' for s in p.shape])) for p in g.params),
        fixed_dims=tuple((k, v) for k, v in g.dims if v is not None),
        states=tuple((s.name, dim(s.size)) for s in g.states),
        state_shapes=tuple((s.name, dim(s.size)) for s in g.states),
        outputs=tuple(g.outputs),
        dim_sources=tuple(_dim_sources(kernel_plan)),
        loss_value=loss_value,
        loss_grad=loss_grad,
        loss_scale=loss_scale,
        loss_doc=(f"{loss.reduction} over time of the per-step loss, summed over the batch") if loss else "",
        loss_mean=loss is not None and loss.reduction == "mean",
        target_of=loss.target_of if loss else "",
        contract=_contract(g),
    )


def render_numpy(kernel_plan: KernelPlan, command: str | None = None, passes=None) -> str:
    """KernelPlan -> source of the NumPy module (``passes``: the optimisations to run,
    symrnn.passes; default all)."""
    from .backends.numpy_backend import emit
    from .passes import ALL

    g = kernel_plan.graph
    m = emit(kernel_plan, ALL if passes is None else passes)
    header = module_header(kernel_plan, "numpy", f"NumPy kernels for the '{g.cell}' cell: forward, BPTT backward and RTRL gradients.",
                           command)
    sections = ("forward_setup", "backward_setup", "rtrl_bind", "stacks", "forward_pre", "forward_alloc", "forward_loop",
                "forward_post", "cache_names", "backward_seed", "backward_carry", "backward_post", "backward_coefs",
                "backward_loop", "backward_after", "backward_pre", "backward_weights", "grads", "rtrl_setup", "rtrl_loop",
                "rtrl_carry", "rtrl_cot", "rtrl_grads", "forward_hold", "finals")
    return _ENV.get_template("numpy_module.py.j2").render(
        **header.fields(), outputs_code=m.outputs, quiet_overflow=_uses_op(g, "sigmoid"),
        transposed_products=any(t for n in g.nodes if isinstance(n, MatVecNode) for _, _, t in g.weight_terms(n)),
        unit_helpers=m.helpers,
        coef_steps=m.coef_steps,
        **{name: getattr(m, name) for name in sections},
    )


def render_cuda(kernel_plan: KernelPlan, command: str | None = None, module=None) -> str:
    """KernelPlan -> the CUDA C++ source of the cell's fused kernels (embedded in the CuPy module;
    ``module``: its emitted kernels, when the caller has them)."""
    from .backends.cupy_backend import emit_cupy, template_kernels
    from .cuda_printing import op_helpers

    g = kernel_plan.graph
    m = module or emit_cupy(kernel_plan)
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

    g = kernel_plan.graph
    m = emit_cupy(kernel_plan)
    header = module_header(kernel_plan, "cupy", f"CuPy kernels for the '{g.cell}' cell: forward and BPTT backward as fused CUDA kernels.",
                           command, "cp")
    return _ENV.get_template("cupy_module.py.j2").render(
        **header.fields(), outputs_code=m.outputs,
        kernel_count=len(m.kernels), design=design_note(kernel_plan), kernels=m.kernels, block_size=BLOCK,
        setup=m.setup, stacks=m.stacks, forward=m.forward, cache_names=m.cache_names, backward=m.backward, grads=m.grads,
        finals=m.finals,
        cuda_source=py_raw_block("\n" + render_cuda(kernel_plan, command, m)),
    )


def render_numba(kernel_plan: KernelPlan, command: str | None = None) -> str:
    """KernelPlan -> source of the numba module (NumPy arrays; its time loops compiled)."""
    from .backends.numba_backend import emit_numba

    g = kernel_plan.graph
    m = emit_numba(kernel_plan)
    header = module_header(kernel_plan, "numba", f"Compiled CPU kernels (numba) for the '{g.cell}' cell: forward and BPTT backward.",
                           command)
    return _ENV.get_template("numba_module.py.j2").render(
        **header.fields(), outputs_code=m.outputs, design=m.design, kernels=m.kernels, loops=m.loops, math=m.math,
        setup=m.setup, stacks=m.stacks, forward=m.forward, cache_names=m.cache_names, backward=m.backward, grads=m.grads,
        finals=m.finals, reductions=m.reductions, gemm=m.gemm, sum_rows=m.sum_rows, python_calls=m.python_calls, compiled_calls=m.compiled_calls, host_calls=m.host_calls,
    )


def render_torch(kernel_plan: KernelPlan, command: str | None = None) -> str:
    """KernelPlan -> source of the torch module (depends on torch and the cell's _numpy/_cupy modules)."""
    from .backends.torch_backend import torch_fields

    g = kernel_plan.graph
    return _ENV.get_template("torch_module.py.j2").render(
        cell=g.cell,
        source=py_comment(g.source or "user-defined"),
        command=py_comment(command or _command(g.cell, "torch")),
        title=py_docstring(f"PyTorch layers of the '{g.cell}' cell: its generated kernels behind torch.autograd."),
        equations=[py_docstring(line) for line in _equation_lines(g)],
        **torch_fields(kernel_plan),
    )


# -- the registry of backends ------------------------------------------------------------------
@dataclass(frozen=True)
class Backend:
    """A backend: ``symrnn generate --backend <name>`` writes ``<cell>_<name>.py``."""

    name: str
    render: Callable[..., str]  # (KernelPlan, command) -> the module's source
    writes: str  # what its module is, for --help
    depends: str  # what its module imports, for generated/__init__.py
    needs: tuple[str, ...] = ()  # the other backends whose modules its module imports


BACKENDS: dict[str, Backend] = {b.name: b for b in (
    Backend("numpy", render_numpy, "<cell>_numpy.py", "NumPy only"),
    Backend("cupy", render_cupy, "<cell>_cupy.py (fused CUDA kernels)", "NumPy and CuPy"),
    Backend("numba", render_numba, "<cell>_numba.py (compiled CPU kernels) and the <cell>_numpy.py its rtrl_grads is",
            "NumPy and numba (rtrl_grads: the cell's *_numpy module)", needs=("numpy",)),
    Backend("torch", render_torch, "<cell>_torch.py (torch.autograd.Function and nn.Module) and the <cell>_numpy.py it runs",
            "torch and the cell's *_numpy (and *_cupy) module", needs=("numpy",)),
)}


def _command(cell: str, backend: str) -> str:
    from .cells import BUILTIN

    flag = "" if backend == "numpy" else f" --backend {backend}"
    return f"symrnn generate {cell}{flag} --out generated" if cell in BUILTIN else f"symrnn generate{flag} --spec <file of {cell}>"


#: the characters an init's text may hold (numbers, dimensions, operators), printed inside "..."
_INIT_TEXT = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_ .+-*/(),")


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
        if not set(text) <= _INIT_TEXT:
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
    from .version import __version__

    mods = sorted(names)
    depends = ", ".join(f"*_{b.name} {'depend ' if i == 0 else ''}on {b.depends}" for i, b in enumerate(BACKENDS.values()))
    lines = [
        "# Generated by symrnn. Do not edit. Regenerate with: symrnn generate --backend all --out generated",
        f'"""Generated kernel modules (symrnn {__version__}): {depends}."""',
        "",
        "MODULES = (",
        *[f'    "{m}",' for m in mods],
        ")",
        "",
    ]
    return "\n".join(lines)


def render_latex(kernel_plan: KernelPlan, notation=None, command: str | None = None) -> str:
    """KernelPlan -> a standalone LaTeX document of the cell's derivation."""
    return _render_document(kernel_plan, notation, "tex", command)


def render_markdown(kernel_plan: KernelPlan, notation=None, command: str | None = None) -> str:
    """KernelPlan -> the derivation as Markdown with $$ math blocks (renders on code-hosting sites)."""
    return _render_document(kernel_plan, notation, "md", command)


def _render_document(kernel_plan: KernelPlan, notation, fmt: str, command: str | None = None) -> str:
    from .cells import BUILTIN
    from .latex import Notation, document_data

    notation = notation or Notation()
    if notation.form_for(kernel_plan.graph) == "unit":
        data, template = document_data(kernel_plan, notation), f"derivation.{fmt}.j2"
    else:
        from .textbook import vector_document_data

        data, template = vector_document_data(kernel_plan, notation), f"textbook.{fmt}.j2"
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
    return _ENV.get_template(template).render(**data, **text)


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
