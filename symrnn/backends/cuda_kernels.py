"""The fused elementwise kernels of the CuPy module, as plain data for the CUDA template.

A :class:`Kernel` is one ``__global__`` function (and the ``__host__ __device__``
function holding its math); a :class:`KernelBuilder` collects its pointer arguments,
loads and stores while a backend writes its body; a :class:`Loc` says where a kernel
finds a value: a Python array (a :class:`~symrnn.stmt.Ref` the module passes) and its
layout.  The C++ lines are printed by :mod:`symrnn.cuda_printing`; every C++ name
comes from the kernels' namer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import sympy

from ..cuda_printing import SCALAR, cuda_code, dim_code
from ..errors import InternalError
from ..ir import MatVecNode, Pointwise, Reduction
from ..naming import C_FIXED, Namer
from ..plan import KernelPlan
from ..stmt import Ref, Span

__all__ = ["BLOCK", "CUDA", "IN_GROUP", "Dialect", "Kernel", "KernelBuilder", "Loc", "design_note", "template_kernels"]

BLOCK = 256  # threads per block of every elementwise kernel

#: the rule of each node kind (ir.NODE_KINDS): whether its values live in a stacked GEMM's
#: output (a matrix-vector product) or in an array of their own
IN_GROUP = {MatVecNode: True, Pointwise: False, Reduction: False}


class Dialect:
    """How a kernel's lines are spelled: C++ over ``scalar_t`` (the CUDA kernels; this class).
    The numba backend (backends/numba_backend.py) spells the same kernels as Python lines;
    every line of a kernel comes from one of these methods."""

    fixed = C_FIXED  # the names a kernel's local may not take
    #: whether a kernel may add into an accumulator per unit (``Loc(kind="acc")``): a serial
    #: loop over the rows may; CUDA threads of one unit would race (they store every step instead)
    accumulates = False

    def code(self, expr: sympy.Expr, names: dict[str, str]) -> str:
        """An expression (symbols renamed through ``names``)."""
        return cuda_code(expr, names)

    def decl(self, name: str, code: str, note: str = "") -> str:
        """A local that is assigned once (``code`` may be ``{}``, a hole filled later)."""
        return f"const {SCALAR} {name} = {code};" + (f"  // {note}" if note else "")

    def var(self, name: str, code: str, note: str = "") -> str:
        """A local that later lines assign again."""
        return f"{SCALAR} {name} = {code};" + (f"  // {note}" if note else "")

    def assign(self, name: str, code: str) -> str:
        return f"{name} = {code};"

    def load(self, ptr: str, index: str) -> str:
        return f"{ptr}[{index}]"

    def store(self, ptr: str, index: str, code: str) -> str:
        return f"{ptr}[{index}] = {code};"

    def accumulate(self, ptr: str, index: str, code: str) -> str:
        raise InternalError("a CUDA kernel adds into no accumulator (its threads would race)")

    def zero(self) -> str:
        return f"{SCALAR}(0)"

    def flag(self, name: str, code: str, note: str = "") -> str:
        """A boolean local."""
        return f"const bool {name} = {code};" + (f"  // {note}" if note else "")

    def select(self, cond: str, a: str, b: str) -> str:
        """``a`` where ``cond`` holds, else ``b``."""
        return f"{cond} ? {a} : {b}"


CUDA = Dialect()


@dataclass
class Kernel:
    """One fused elementwise kernel: rows x units threads (time loop: batch x units)."""

    name: str
    doc: str
    units: str  # C expression of the units per row
    size: sympy.Expr  # the same as a size (the module passes it)
    mode: str  # "step" (one step, rows = B), "all" (every step, rows = T * B), "time" (loops over T)
    reverse: bool = False  # time mode: t runs from T - 1 down to 0
    params: list[tuple[str, str]] = field(default_factory=list)  # C pointer parameters: (qualifiers, name)
    py_args: list[Ref] = field(default_factory=list)  # the arrays passed for them
    prologue: list[str] = field(default_factory=list)  # before the time loop (time mode)
    body: list[str] = field(default_factory=list)  # per element (per step in time mode)
    epilogue: list[str] = field(default_factory=list)  # after the time loop (time mode)

    @property
    def restrict(self) -> bool:
        return self.mode != "time"


@dataclass(frozen=True)
class Loc:
    """Where a kernel finds a value: a Python array and its layout."""

    py: Ref
    kind: str = "row"  # "row": [row, ld] (rows = B or T * B), "vec": per unit, "scalar", "rowval": [row] (a reduction),
    #                    "acc": per unit, added into over every row and step (Dialect.accumulates)
    ld: sympy.Expr = sympy.Integer(1)
    off: sympy.Expr = sympy.Integer(0)
    seq: bool = False  # py holds every step (T, B, ld): one-step kernels read step ``step_`` of it
    shift: int = 0  # ... or step ``step_ + shift`` (a state's new value in its (T + 1, B, ld) array)


def pointer_stem(ref: Ref) -> str:
    """The C name of the pointer to an array: its Python name, with the integer ends of
    its slices (``h_seq[1:]`` -> ``h_seq_1``), without underscores at its ends (``unit_``
    -> ``unit``: C++ reserves names with a double underscore)."""
    parts = [ref.name.strip("_")]
    for item in ref.index:
        ends = (item.lo, item.hi) if isinstance(item, Span) else (item,)
        for end in ends:
            if end is None:
                continue
            if not (isinstance(end, sympy.Integer)):
                raise InternalError(f"a kernel is passed '{ref.name}' sliced by {end}, which has no C name")
            parts.append(str(abs(int(end))))
    return "_".join(parts)


class KernelBuilder:
    """Collects a kernel's pointer arguments, loads, statements and stores."""

    def __init__(self, kernel: Kernel, c: Namer, dialect: Dialect = CUDA):
        self.k = kernel
        self.dialect = dialect
        self.c = c  # the kernels' namer: a pointer never has the name of a local
        self.ptr_of: dict[Ref, str] = {}  # array -> C pointer name
        self.out: set[Ref] = set()
        self.loads: list[str] = []
        self.loaded: set[str] = set()
        self.stores: list[str] = []

    def ptr(self, py: Ref, out: bool) -> str:
        if py not in self.ptr_of:
            base = pointer_stem(py)
            key = ("ptr", py)  # the same array has the same pointer name in every kernel
            taken = self.c.taken(base) and self.c.owner(base) != key
            self.ptr_of[py] = self.c.get(key, base + "_ptr" if taken else base)
        if out:
            self.out.add(py)
        return self.ptr_of[py]

    def index(self, loc: Loc) -> str:
        if loc.kind == "scalar":
            return "0"
        off = "" if sympy.sympify(loc.off, strict=True) == 0 else f"{dim_code(loc.off)} + "
        if loc.kind in ("vec", "acc"):
            return f"{off}unit_"
        ld = dim_code(loc.ld)
        ld = ld if sympy.sympify(loc.ld, strict=True).is_Atom else f"({ld})"
        if self.k.mode == "time" or (loc.seq and self.k.mode == "step"):
            t = "t_" if self.k.mode == "time" else "step_"
            row = f"(({t} + {loc.shift}) * rows_ + row_)" if loc.shift else f"({t} * rows_ + row_)"
        else:
            row = "row_"
        if loc.kind == "rowval":  # one value per row: a reduction over units, the same at every unit
            return row
        return f"{row} * {ld} + {off}unit_"

    def load(self, local: str, loc: Loc) -> None:
        if local in self.loaded:
            return
        self.loaded.add(local)
        self.loads.append(self.dialect.decl(local, self.dialect.load(self.ptr(loc.py, False), self.index(loc))))

    def store(self, loc: Loc, code: str, comment: str = "") -> None:
        self.stores.append(self.store_line(loc, code) + comment)

    def store_line(self, loc: Loc, code: str) -> str:
        """A store as a line (``code`` may be ``{}``, a statement template's hole); into an
        accumulator (``loc.kind == "acc"``), an addition."""
        write = self.dialect.accumulate if loc.kind == "acc" else self.dialect.store
        return write(self.ptr(loc.py, True), self.index(loc), code)

    def finish(self) -> Kernel:
        k = self.k
        for py, name in self.ptr_of.items():
            const = "" if py in self.out else "const "
            restrict = " __restrict__" if k.restrict else ""
            k.params.append((f"{const}{{}}*{restrict}", name))
            k.py_args.append(py)
        return k


def template_kernels(kernels: list[Kernel]) -> list[dict]:
    """Kernels as plain data for templates/cuda_kernels.cu.j2 (signatures per dtype)."""
    out = []
    for k in kernels:
        names = [name for _, name in k.params]

        def signature(ctype: str) -> list[str]:
            return [f"{quals.format(ctype)} {name}" for quals, name in k.params]

        out.append({
            "name": k.name,
            "doc": k.doc,
            "units": k.units,
            "mode": k.mode,
            "loop": "steps_ - 1; t_ >= 0; --t_" if k.reverse else "0; t_ < steps_; ++t_",
            "params": signature(SCALAR),
            "prologue": k.prologue,
            "body": k.body,
            "epilogue": k.epilogue,
            "call": ", ".join(names),
            "typed": [(ctype, suffix, signature(ctype)) for ctype, suffix in (("float", "f32"), ("double", "f64"))],
        })
    return out


def design_note(plan: KernelPlan, gemm: str = "cuBLAS", per: str = "one thread per") -> str:
    """One sentence on how the kernels are laid out for this cell."""
    loop = plan.loop.stages
    if not loop:
        return "no recurrence; the readout runs over every step at once."
    if not any(s.groups for s in loop):
        return ("the recurrence is elementwise, so forward and backward are each one kernel that loops "
                f"over time, {per} (batch, unit).")
    gemms = sum(len(s.groups) for s in loop)
    return (f"per step, {gemms} recurrent GEMM(s) ({gemm}) and {len(loop)} fused kernel(s) for all gates and "
            "state updates; backward, per step, the same number of fused adjoint kernels and GEMMs W^T delta; "
            "input projections and weight gradients are one GEMM each over every step.")
