"""numba backend: a kernel plan -> a NumPy module whose time loops are compiled (numba).

The module has the CuPy module's structure (backends/cupy_backend.py emits it, the
kernels' lines in this backend's :data:`NUMBA` dialect): the input projection of every
step is one BLAS GEMM before the loop; the loop over time is ONE compiled function
(``_forward_loop0``, ``_backward_loop0``) that runs per step the recurrent GEMM
(the template's ``_gemm``: NumPy's own OpenBLAS called from compiled code) and a fused
elementwise kernel, a compiled loop over (row, unit) that the CUDA module runs as one
thread per element; weight gradients are one GEMM each after the loop.  A cell whose
recurrence has no GEMM (IndRNN, minGRU, seed 002's unit) runs its whole recurrence as
one compiled kernel looping over (t, batch row, unit), the units innermost.  Every number in a kernel is
printed as ``S(...)``, ``S`` the arrays' scalar type, so float32 stays float32.

Where a mask ``m = [t < length]`` (variable lengths) would go: in the step kernels'
stores of the states (``KernelBuilder.store`` of a state's location), the one place
where a step's new state is written.

Decisions, by measurement (benchmarks/custom_cpu.py, benchmarks/float32_math.py; the
figures in benchmarks/RESULTS.md):

* **No allocation per step.**  A step's product is ``np.dot(a, w, buffer)`` into a buffer
  made once before the compiled loop, a step's scratch array is made once; an adjoint
  carried to the next step (``d_h_next = d_h``) gets two buffers that swap
  (:func:`_preallocate`).
* **A step's product calls the OpenBLAS bundled with NumPy** (``_gemm``: its
  ``scipy_cblas_[sd]gemm64_`` by symbol, a numba ``ExternalFunction``; found in
  numpy.libs / .dylibs, else ``np.dot``).  numba's ``np.dot`` calls SciPy's OpenBLAS
  (scipy.linalg.cython_blas): 224 us against NumPy's 174 us for 32x256 @ 256x1024 float32,
  197 against 161 us for 32x1024 @ 1024x256, the same bits (benchmarks/RESULTS.md).
* **A time-loop kernel loops over (t, row, unit)** (:class:`Carried`): each step is one
  contiguous stretch of memory (B x units), its innermost loop over the units vectorized; a
  value carried from step to step (the adjoint from step t + 1, the prologue's ``var``) lives
  in an array over (row, unit) between steps.  Looping t innermost for each (row, unit)
  was strided and scalar (minGRU and IndRNN forward + backward at T=1000, B=8, H=64: 2.6x
  as long); looping (row, t, unit) vectorized, but the backward kernel (t descending, each
  step of a row 32 KB from the next) took 10x as long as (t, row, unit): minGRU's backward
  kernel at T=100, B=32, H=256 float32, 10.2 ms against 1.0 ms.  A kernel whose prologue
  holds anything else keeps the (row, unit, t) order.
* **exp and tanh are the module's own** (:data:`VECTORIZED`; the template's
  ``_exp_float32``, ``_tanh_float32``, ``_exp_float64``, ``_tanh_float64``): numba calls libm
  one number at a time (PyPI's llvmlite has no SVML), 5 of them per unit of an LSTM step
  cost 10x the step's arithmetic.  Pure arithmetic, inlined (``forceinline``) so that LLVM
  vectorizes the units' loop: float32 (Cody-Waite + Cephes' polynomial; Eigen's rational
  tanh) within 1 and 7 ulp; float64 (Cody-Waite + Cephes' rational exp; Cephes' tanh,
  ``1 - 2 / (exp(2x) + 1)`` beyond 0.625) within 2 ulp (benchmarks/float64_math.py: 1.58 and
  1.40 ulp on 1.2 million points each), which made the float64 modules 0.50-0.70x as long
  at T=50, B=16, H=32 (rnn_tanh_torch, lstm_torch, gru_torch, mgu) and 0.81-0.93x at
  T=100, B=32, H=256 (benchmarks/numba_ab.py).  exp's 2^n is built from its bits (a bit cast,
  ``_float_of_bits``), not by multiplying powers of two: the same bits
  (every 61st float32, 21 million float64), 1.8x (float32) and 2.5x (float64) the speed;
  float64 exp 4.1x and tanh 5.6x libm's (AMD EPYC).  sigmoid stays ``1 / (1 + exp(-a))``
  (ops.py: accurate relative to its value), through that exp.
* **x ** (k + 1/2) is sqrt(x) x^k** (:class:`NumbaPrinter`): numba's ``**`` calls libm's
  scalar pow (a layer norm's ``(var + eps) ** -0.5``: most of its backward kernels' time);
  within 2 ulp of pow (tests).
* **Indices are ``U(...)``** (np.uint64): numba checks a signed index for wraparound, a
  branch per access that stops LLVM from vectorizing.
* **The kernels' arrays are noalias** (numba's compiler flag ``noalias``, which njit does
  not offer: the template adds it to numba's CPU options, ``_noalias``): without it LLVM
  vectorizes a kernel's units' loop behind run-time checks that its arrays do not overlap, and
  takes that path only above a trip count it derives from the checks' cost (40 units for the
  layer-norm LSTM's gate kernel, 29 arrays: 6x slower at 32).  The module never hands a kernel
  two arrays that share memory (tests/numba_alias_check.py runs every kernel call of every
  module, and of the random cells, with the JIT off).  With it: 0.63x (layer_norm_lstm),
  0.75-0.81x (the LSTMs, GRU, RG-LRU) the time at T=50, B=16, H=32 float32, 0.89-0.98x at
  T=100, B=32, H=256 (benchmarks/numba_ab.py, with the two items above).  LLVM's limits on
  run-time alias checks stay raised (two LLVM options on import) for the compiled loops.
* **One thread.**  The kernels are serial loops (no ``parallel=True``/``prange``) and the
  products call BLAS as the process has it (OPENBLAS_NUM_THREADS: NumPy's OpenBLAS and
  SciPy's read it).  On this project's 2-core machine (shared: load average ~3 from
  other work), ``prange`` over the batch rows made the float32 LSTM forward + backward 3.6x
  (medium) and 10x (small) slower than the serial kernels, 5x (medium) with our own busy
  process on the other core; two BLAS threads made it 3.7x slower (medium).  A parallel
  launch per step costs more than a step's elementwise work (tens of microseconds) and
  waits for the slowest thread, which a busy core makes slow.  Use OPENBLAS_NUM_THREADS=1
  on a shared machine.
* **Compile time** (the first call, float32, empty cache: benchmarks/custom_cpu.py
  --first-call): most of it is LLVM optimizing each compiled loop's module, the kernels it
  calls linked in and optimized again, and numba typing and lowering the loop.  A step's
  reduction assigned to a slice (``X[t] = _mean_units(a)``) made numba compile a broadcasting
  assignment with its error message (string formatting: ~2 s of layer_norm_lstm's 14.8 s), an
  adjoint's ``X = sum(a); X = X / n`` two arrays and an array expression per step: a
  reduction in a loop writes into a buffer made before it (:func:`_reduce_into`,
  ``_<name>_units_to``); the kernels' flat views are made once before the loop, not per step
  and kernel (:func:`_flat_views`).  layer_norm_lstm 14.8 -> 9.4 s, the other cells 0.8-2.8 s
  (that day's machine; 12.5-16 s on later days' shared host).  No compiled function has numba's
  C wrapper, and a kernel or helper that only the compiled loops call has no Python wrapper
  (``HostPrinter.python_calls``: the template's ``_compiled(python=False)``): each wrapper is
  code numba generates, optimizes and emits, a kernel's unboxing each of its dozens of arrays;
  layer_norm_lstm's first call 0.83-0.96x as long (benchmarks/RESULTS.md).  A mean or sum over
  the units that Python code computes (the input side's, over every step) is NumPy's product
  with ones (``_host_mean_units``), not a compiled helper that numba compiled once per layout of
  its argument (a block's strided view, a C array): layer_norm_lstm's first call 10.6 -> 9.8 s
  (three interleaved pairs), the speed 0.96-1.01x (benchmarks/numba_ab.py).
  Not adopted: numba's IR inlining of the kernels into the loops (``inline="always"``) refuses
  a call of more than 30 arguments (Python passes them as a tuple); NUMBA_OPT=0 takes half the
  time but vectorizes nothing; NumPy's own reductions outside the loops compile 0.4 s less
  but took 1.07x (layer_norm_lstm) and 1.31x (elman_classifier) the time at the small size.
* **An elementwise parameter's gradient** (a sum over every step and row): a kernel adds the
  contribution it computes into an accumulator per unit as it runs (``Loc(kind="acc")``, row
  after row, step after step: deterministic), where the CuPy modules store it at every step
  and sum it after the loop (their threads would race).  The stored form cost layer_norm_lstm's
  backward 14 arrays of (T, B, n_hidden) (183 MB at T=50, B=64, H=512 float64: its peak 850 ->
  675 MB), fresh memory every call whose page faults cost this shared VM 0.9 -> 0.65 s a call
  (system time; 2.60 -> 2.07 s in all, benchmarks/RESULTS.md); the speed elsewhere 0.94-1.08x
  (benchmarks/numba_ab.py).  A contribution that is a stored product's adjoint (a bias's) is
  summed by the compiled ``_sum_rows``, row after row as NumPy sums a C array over axis 0 (the
  same bits): NumPy's axis-0 sum cost ~15 us a call at T=50, B=16, H=32 (indrnn small: 0.79x).
* rtrl_grads (a check, not a training path) is the NumPy module's.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import sympy
from sympy.printing.precedence import PRECEDENCE
from sympy.printing.pycode import PythonCodePrinter

from ..errors import CellError, InternalError
from ..naming import C_FIXED, PYTHON_FIXED
from ..ops import Op
from ..plan import KernelPlan
from ..printing import NumpyPrinter
from ..reductions import Reduce
from ..stmt import B_SYM, Assign, Attr, Call, Do, Elementwise, Helper, Index, Key, Loop, Ref, Reshape, Size, Text, reads_of, writes_of
from .cuda_kernels import Dialect, Kernel
from .python_printer import PythonPrinter

__all__ = ["NUMBA", "NumbaModule", "emit_numba", "numba_code"]

#: the leading arguments of every compiled loop (the sizes and the scalar type)
LOOP_ARGS = ("T", "B", "n_in", "n_hidden", "n_out", "dtype")

#: the compiled helpers that write a reduction over units into a buffer (:func:`_reduce_into`)
REDUCE_INTO = {f"_{name}_units_to": name for name in ("sum", "mean", "logsumexp")}

#: the ops' libm functions that the kernels call through the module's own (the template's
#: ``_exp``, ``_tanh``): pure arithmetic that LLVM vectorizes, float32 and float64 (numba's
#: libm calls are scalar: PyPI's llvmlite has no SVML), with the maximum errors the template
#: states (measured by benchmarks/float32_math.py, benchmarks/float64_math.py)
VECTORIZED = {"exp": "_exp", "tanh": "_tanh"}


class NumbaPrinter(PythonCodePrinter):
    """Per-unit expressions as numba-compiled Python over the scalar type ``S``: every
    number is ``S(...)`` (float32 math stays float32), every op its ``numba`` spelling."""

    def __init__(self, names=None):
        super().__init__({"strict": False})
        self._names = dict(names or {})

    def _print_Symbol(self, expr):
        return self._names.get(expr.name, expr.name)

    def _print(self, expr, **kwargs):
        if isinstance(expr, Op):
            spelling = type(expr).numba
            if not spelling:
                raise InternalError(f"op {type(expr).__name__} has no numba spelling")
            return spelling.format(x=self._print(expr.args[0]), one="S(1)", zero="S(0)", **VECTORIZED)
        return super()._print(expr, **kwargs)

    def _print_Function(self, expr):
        raise InternalError(f"no numba spelling for {expr}")

    def _print_Integer(self, expr):
        return f"S({expr.p})"

    def _print_Rational(self, expr):
        return f"(S({expr.p})/S({expr.q}))"

    def _print_Float(self, expr):
        return f"S({float(expr)!r})"

    def _print_Pow(self, expr, rational=False):
        base, exp = expr.args
        if exp.is_Integer and 1 <= exp <= 4:
            b = self.parenthesize(base, PRECEDENCE["Mul"], strict=True)
            return b if exp == 1 else "(" + "*".join([b] * int(exp)) + ")"
        if exp.is_Integer and exp < 0:
            inv = sympy.Pow(base, -exp, evaluate=False) if exp != -1 else base
            return f"S(1)/{self.parenthesize(inv, PRECEDENCE['Pow'], strict=True)}"
        halves = 2 * float(exp) if exp.is_Number else 0.5  # a Float exponent too (a spec's ** -0.5)
        if halves.is_integer() and int(halves) % 2 and abs(halves) <= 7:
            # x ** (k + 1/2) as sqrt(x) x^k: a vectorized square root (numba's ** is libm's
            # scalar pow; a layer norm's (var + eps) ** -0.5 was most of its kernel's time)
            k = abs(int(halves)) // 2
            root = f"np.sqrt({self._print(base)})"
            power = self._print_Pow(sympy.Pow(base, k, evaluate=False)) if k else ""
            magnitude = f"({root}*{power})" if k else root
            return magnitude if halves > 0 else f"(S(1)/{magnitude})"
        return f"{self.parenthesize(base, PRECEDENCE['Pow'], strict=True)}**{self.parenthesize(exp, PRECEDENCE['Pow'])}"


def numba_code(expr: sympy.Expr, names=None) -> str:
    """``expr`` as a numba kernel's Python over the scalar type ``S``.

    >>> import sympy
    >>> y = sympy.Symbol("y")
    >>> numba_code(1 - y**2)
    'S(1) - (y*y)'
    """
    return NumbaPrinter(names).doprint(expr)


class Carried(str):
    """A local's declaration that later lines assign again (a time-loop kernel's prologue:
    a value carried from step to step), with the local's name."""

    def __new__(cls, line: str, name: str):
        new = super().__new__(cls, line)
        new.name = name
        return new


class NumbaDialect(Dialect):
    """The kernels' lines as Python (numba compiles them)."""

    fixed = C_FIXED | PYTHON_FIXED | frozenset({"S", "U", "np", "numba", "carry_"})
    accumulates = True  # a kernel's loops are serial: row after row, unit after unit

    def code(self, expr, names):
        return numba_code(expr, names)

    def decl(self, name, code, note=""):
        return f"{name} = {code}" + (f"  # {note}" if note else "")

    def var(self, name, code, note=""):
        return Carried(self.decl(name, code, note), name)

    def assign(self, name, code):
        return f"{name} = {code}"

    def load(self, ptr, index):
        return f"{ptr}[U({index})]"

    def store(self, ptr, index, code):
        return f"{ptr}[U({index})] = {code}"

    def accumulate(self, ptr, index, code):
        return f"{ptr}[U({index})] += {code}"

    def zero(self):
        return "S(0)"

    def flag(self, name, code, note=""):
        return f"{name} = {code}" + (f"  # {note}" if note else "")

    def select(self, cond, a, b):
        return f"({a} if {cond} else {b})"


NUMBA = NumbaDialect()


@dataclass
class CompiledLoop:
    """A time loop of the module as one compiled function."""

    name: str
    args: list[str]
    returns: list[str]
    body: list[str]  # printed lines (inside the function)


@dataclass
class NumbaModule:
    """The template's data."""

    kernels: list[dict] = field(default_factory=list)
    math: list[str] = field(default_factory=list)  # the module's own functions the kernels call (_exp, _tanh)
    loops: list[CompiledLoop] = field(default_factory=list)
    setup: list[str] = field(default_factory=list)
    stacks: list[str] = field(default_factory=list)
    forward: list[str] = field(default_factory=list)
    cache_names: list[str] = field(default_factory=list)
    outputs: list[tuple] = field(default_factory=list)
    backward: list[str] = field(default_factory=list)
    grads: list[tuple] = field(default_factory=list)
    finals: list[tuple] = field(default_factory=list)  # each state's array over the steps, the initial state first
    reductions: list[str] = field(default_factory=list)  # the reductions over units the module computes (their helpers)
    gemm: bool = False  # the compiled loops multiply through _gemm
    sum_rows: bool = False  # the module sums elementwise parameters' gradients through _sum_rows
    python_calls: list[str] = field(default_factory=list)  # the kernels and helpers that Python code calls
    compiled_calls: list[str] = field(default_factory=list)  # ... that compiled code calls
    host_calls: list[str] = field(default_factory=list)  # the reductions Python code computes with NumPy
    design: str = ""


class HostExpressionPrinter(NumpyPrinter):
    """NumPy expressions as numba compiles them: a reduction over units is the module's
    compiled helper ``_<name>_units`` (numba's np.mean and np.max take no axis)."""

    def __init__(self, names, used: set[str], called):
        super().__init__(names, "np")
        self.used = used  # the reductions printed (the module defines their helpers)
        self.called = called  # called(helper): a helper's call printed

    def _print(self, expr, **kwargs):
        if isinstance(expr, Reduce):
            self.used.add(type(expr).spec_name)
            return self.called(f"_{type(expr).spec_name}_units") + f"({self._print(expr.args[0])})"
        return super()._print(expr, **kwargs)


#: the reductions over the units that Python code computes through NumPy (``_host_mean_units``)
HOST_REDUCTIONS = frozenset({"_mean_units", "_sum_units"})


class HostPrinter(PythonPrinter):
    """The module's statements over NumPy; a kernel launch is a call of the compiled kernel
    on its arrays' flat views; a product is ``np.dot`` (BLAS, also inside compiled code)."""

    def __init__(self):
        super().__init__("np")
        self.reductions: set[str] = set()  # the reductions over units printed (their helpers)
        self.gemm = False  # a product into a buffer printed (the module defines _gemm)
        self.flat: dict[str, str] = {}  # array -> its flat view made before the compiled loop being printed
        self.sum_rows = False  # a sum over the rows printed (the module defines _sum_rows)
        self.compiled = False  # printing a compiled loop's body
        self.python_calls: set[str] = set()  # the kernels and helpers called outside compiled code
        self.compiled_calls: set[str] = set()  # ... and those compiled code calls
        self.host_calls: set[str] = set()  # the reductions Python code computes with NumPy (HOST_REDUCTIONS)

    def called(self, name: str) -> str:
        """``name``, a compiled kernel or helper, as a call being printed: noted where Python calls it,
        and noted where compiled code does.  A mean or sum over the units that Python code computes
        (the input side's, every step at once) is the module's NumPy helper ``_host_<name>`` (a product
        with ones, BLAS), not compiled: numba compiled ``_mean_units`` once for each layout of its
        argument (a block's strided view, a C array), 0.4 s each of layer_norm_lstm's first call."""
        if not self.compiled:
            if name in HOST_REDUCTIONS:
                self.host_calls.add(name)
                return "_host" + name
            self.python_calls.add(name)
        else:
            self.compiled_calls.add(name)
        return name

    def value(self, v):
        if isinstance(v, Elementwise):
            return HostExpressionPrinter({k: self.value(ref) for k, ref in v.refs}, self.reductions, self.called).doprint(v.expr)
        if isinstance(v, Call) and v.func == "sum" and dict(v.kwargs) == {"axis": Text("-1"), "keepdims": Text("True")}:
            self.reductions.add("sum")  # an adjoint's sum over units: the module's compiled helper
            return self.called("_sum_units") + f"({self.value(v.args[0])})"
        if isinstance(v, Helper) and v.func == "_launch":
            key, _dtype, rows, _units, steps, step, _dims, *arrays = v.args
            if not isinstance(key, Key):
                raise InternalError(f"a launch of {key!r}")
            flat = [self.flat[a.name] if isinstance(a, Ref) and not a.index and not a.T and a.name in self.flat
                    else f"{self.value(a)}.reshape(-1)" for a in arrays]
            return self.called(key.name) + f"({', '.join([self.value(rows), self.value(steps), self.value(step), 'n_in, n_hidden, n_out', *flat])})"
        if isinstance(v, Call) and v.func == "sum" and dict(v.kwargs) == {"axis": Text("0")} and len(v.args) == 1 \
                and isinstance(v.args[0], Reshape):  # an elementwise parameter's gradient: a sum over every (step, row)
            self.sum_rows = True
            return self.called("_sum_rows") + f"({self.value(v.args[0])})"
        if isinstance(v, Helper) and v.func in REDUCE_INTO:  # a reduction into its buffer (_reduce_into)
            self.reductions.add(REDUCE_INTO[v.func])
            self.called(v.func)
        if isinstance(v, Call) and v.func == "matmul" and len(v.args) == 3:  # a step's product into its buffer
            self.gemm = True
            return f"_gemm({self.arguments(v)})"
        if isinstance(v, Call) and v.func == "matmul":
            return f"np.dot({self.arguments(v)})"
        return super().value(v)

    def stmt(self, s, indent: int = 0) -> list[str]:
        if isinstance(s, Loop) and s.reverse:  # numba has no reversed(range(...))
            stop = self.value(s.stop)
            return [f"{' ' * indent}for {s.var} in range({stop} - 1, -1, -1):", *self.lines(s.body, indent + 4)]
        return super().stmt(s, indent)


def emit_numba(plan: KernelPlan) -> NumbaModule:
    """The kernels, compiled loops and statements of the numba module for ``plan``."""
    from .cupy_backend import design_note, emit_kernels

    _check_ops(plan)
    cm, names = emit_kernels(plan, NUMBA, "numba")
    printer = HostPrinter()
    m = NumbaModule(design=design_note(plan, gemm="BLAS", per="a loop over"))
    m.kernels = [_kernel(k) for k in cm.kernels]
    m.math = sorted(own for name, own in VECTORIZED.items() if any("{" + name + "}" in op.numba for op in cm.ops))
    m.setup, m.stacks = printer.lines(cm.setup), printer.lines(cm.stacks)
    after_forward = [Do(Helper("_", tuple(ref for _, ref in cm.outputs + cm.finals) + tuple(Ref(n) for n in cm.cache_names)))]
    bound = set().union(*(writes_of(s) for s in cm.setup + cm.stacks))
    m.forward = _hoist_loops(cm.forward, "forward", after_forward, m.loops, printer, bound, names)
    after_backward = [Do(Helper("_", tuple(ref for _, ref in cm.grads)))]
    bound |= set(cm.cache_names)
    m.backward = _hoist_loops(cm.backward, "backward", after_backward, m.loops, printer, bound, names)
    m.cache_names = cm.cache_names
    m.outputs = [(k, printer.value(v)) for k, v in cm.outputs]
    m.grads = [(k, printer.value(v)) for k, v in cm.grads]
    m.finals = [(k, printer.value(v)) for k, v in cm.finals]
    m.reductions = sorted(printer.reductions)
    m.gemm = printer.gemm
    m.sum_rows = printer.sum_rows
    m.python_calls = sorted(printer.python_calls)
    m.compiled_calls = sorted(printer.compiled_calls)
    m.host_calls = sorted(printer.host_calls)
    for k in m.kernels:
        k["python"] = k["name"] in printer.python_calls
    return m


def _check_ops(plan: KernelPlan) -> None:
    """Refuse (CellError) a cell with an op this backend cannot spell."""
    g = plan.graph
    exprs = [n.expr for n in g.nodes if getattr(n, "expr", None) is not None]
    exprs += [p for _, terms in plan.derivation.partials.items() for _, p in terms]
    for expr in exprs:
        for a in sympy.preorder_traversal(expr):
            if isinstance(a, Op) and not type(a).numba:
                raise CellError(g.cell, "numba backend",
                                f"op '{type(a).__name__}' has no numba spelling yet; use the NumPy backend for this cell")


def _kernel(k: Kernel) -> dict:
    """A kernel as the template's data: its arguments and its lines."""
    if not k.params:
        raise InternalError(f"kernel {k.name} has no arrays")
    names = [name for _, name in k.params]
    # a time-loop kernel loops over (t, row, unit), the units' loop innermost (contiguous: it
    # vectorizes), its values carried from step to step in an array over (row, unit), where its
    # prologue only declares such values (else over (row, unit, t), each unit's values in locals)
    carried = [line.name for line in k.prologue] if all(isinstance(line, Carried) for line in k.prologue) else None
    return {"name": k.name, "doc": k.doc, "units": k.units, "mode": k.mode, "reverse": k.reverse,
            "args": names, "scalar_of": names[0], "prologue": k.prologue, "body": k.body, "epilogue": k.epilogue,
            "carried": carried}


def _hoist_loops(stmts: list, section: str, after: list, loops: list[CompiledLoop], printer: HostPrinter,
                 bound: set[str], names) -> list[str]:
    """Print ``stmts``; each top-level time loop becomes a compiled function of the
    arrays it reads (defined before it, or ``bound``: the parameters, stacked weights,
    the cache) that returns what later statements read."""
    out: list[str] = []
    defined = {"x", "p", "state0", "lengths", "cache", "grad_outputs", *LOOP_ARGS, *bound}
    for i, s in enumerate(stmts):
        if not isinstance(s, Loop):
            out.extend(printer.stmt(s))
            defined |= writes_of(s)
            continue
        s, weights = _contiguous_weights(s, names)
        for w, ref in weights:
            out.append(printer.stmt(Assign(w, Call("ascontiguousarray", (ref,)), "a contiguous operand for every step's product"))[0])
            defined.add(w.name)
        later = set().union(*(reads_of(x) for x in stmts[i + 1:] + after))
        name = f"_{section}_loop{sum(1 for lp in loops if lp.name.startswith(f'_{section}'))}"
        args = [*LOOP_ARGS, *sorted((reads_of(s) & defined) - set(LOOP_ARGS) - {s.var})]
        returns = sorted((writes_of(s) - {s.var}) & later)
        s, allocations = _preallocate(s, stmts[:i], names)
        s, buffers = _reduce_into(s)
        flat, printer.flat = _flat_views(s, names), {}
        printer.compiled = True  # the compiled function's lines
        lines = printer.lines([*allocations, *buffers])
        if flat:
            lines += ["# the arrays' flat views that the kernels index, made once (not per step and kernel)",
                      *(f"{view} = {array}.reshape(-1)" for array, view in flat.items())]
        printer.flat = flat
        lines += printer.lines([s])
        printer.flat, printer.compiled = {}, False
        loops.append(CompiledLoop(name, args, returns, lines))
        call = f"{name}({', '.join(args)})"
        out.append(f"{', '.join(returns)}{',' if len(returns) == 1 else ''} = {call}" if returns else call)
        defined |= writes_of(s)
    return out


def _contiguous_weights(loop: Loop, names) -> tuple[Loop, list[tuple[Ref, Ref]]]:
    """The loop with each per-step product's weight (a transposed view, or a block of a
    parameter) replaced by a contiguous copy made before it: BLAS multiplies by it
    faster, and numba's np.dot needs C or F order (new names from the module's namer)."""
    made: dict[Ref, Ref] = {}

    def visit(s):
        if isinstance(s, Loop):
            return replace(s, body=tuple(visit(b) for b in s.body))
        if isinstance(s, Assign) and isinstance(s.value, Call) and s.value.func == "matmul":
            a, w = s.value.args
            if isinstance(w, Ref) and (w.T or w.index):
                if w not in made:
                    made[w] = Ref(names.fresh(f"{w.name}_T" if w.T else f"{w.name}_block"))
                return replace(s, value=replace(s.value, args=(a, made[w])))
        return s

    new = visit(loop)
    return new, [(ref, w) for w, ref in made.items()]


def _preallocate(loop: Loop, before: list, names) -> tuple[Loop, list]:
    """The loop with its per-step arrays allocated once, before it: a step's product
    ``X = np.dot(a, w)`` becomes ``np.dot(a, w, X)`` into a buffer, a step's ``X = np.empty(..)``
    goes.  An array the next step still reads (``X_next = X`` earlier in the body: the
    adjoint carried from step t + 1) gets a second buffer, and the two swap each step; its
    first buffer is the one made for it just before the loop (``before``: the statements
    there), which nothing else holds.  Returns (loop, the allocations)."""
    body = list(loop.body)
    allocations: list = []
    for j, s in enumerate(loop.body):
        if not (isinstance(s, Assign) and isinstance(s.dst, Ref) and not s.dst.index and isinstance(s.value, Call)):
            continue
        x, value = s.dst, s.value
        if value.func == "matmul" and len(value.args) == 2:
            a, w = value.args
            if not (isinstance(a, Ref) and isinstance(w, Ref) and not w.index and not w.T and a.index == (_t_loop(loop),)):
                continue
            shape = (Size(B_SYM), Index(Attr(w, "shape"), (sympy.Integer(1),)))
        elif value.func == "empty":
            shape = value.args[0]
        else:
            continue
        others = [b for k, b in enumerate(loop.body) if k != j]
        if any(x.name in writes_of(b) for b in others) or x.name in reads_of(s):
            continue
        aliases = [k for k, b in enumerate(loop.body[:j]) if x.name in reads_of(b)]
        if any(not (isinstance(loop.body[k], Assign) and loop.body[k].value == Ref(x.name)) for k in aliases):
            continue  # read before this step's value in some other way: left as it is
        if aliases:  # carried to the next step: two buffers, swapped
            if not _fresh_before(x.name, before):
                continue
            spare = Ref(names.fresh(f"{x.name}_spare"))
            allocations.append(Assign(spare, Call("empty", (shape, Text("dtype"))), "the second buffer of " + x.name))
            steps = [Assign((x, spare), (spare, x), "this step's buffer; the other holds step t + 1's")]
        else:
            allocations.append(Assign(x, Call("empty", (shape, Text("dtype"))), "one buffer for every step"))
            steps = []
        if value.func == "matmul":
            steps.append(Do(Call("matmul", (*value.args, x)), out=x, comment=s.comment))
        body[j] = tuple(steps)
    flat = [b for item in body for b in (item if isinstance(item, tuple) else (item,))]
    return replace(loop, body=tuple(flat)), allocations


def _reduce_into(loop: Loop) -> tuple[Loop, list]:
    """The loop with each step's reduction over units written into a buffer by the module's
    compiled helper (``_mean_units_to(a, out)``, ``_sum_units_to(a, out, divisor)``) instead
    of an array made per step and assigned: ``X[t] = mean(a)`` (numba compiles a broadcasting
    assignment with its error message: seconds of compilation), ``X = sum(a); X = X / n``
    (two arrays per step; X's buffer is made before the loop: its only other readers are
    kernels, after it).  Returns (loop, the buffers' allocations)."""
    t = _t_loop(loop)
    body = list(loop.body)
    out: list = []
    buffers: list = []
    j = 0
    while j < len(body):
        s = body[j]
        if (isinstance(s, Assign) and isinstance(s.dst, Ref) and s.dst.index == (t,) and not s.dst.T
                and isinstance(s.value, Elementwise) and isinstance(s.value.expr, Reduce)
                and isinstance(s.value.expr.args[0], sympy.Symbol) and f"_{type(s.value.expr).spec_name}_units_to" in REDUCE_INTO):
            refs = dict(s.value.refs)
            a = refs.get(s.value.expr.args[0].name)
            if isinstance(a, Ref):
                name = type(s.value.expr).spec_name
                args = (a, s.dst, Text("1")) if name == "sum" else (a, s.dst)  # the sum's divisor: 1
                out.append(Do(Helper(f"_{name}_units_to", args), out=s.dst, comment=s.comment))
                j += 1
                continue
        if (isinstance(s, Assign) and isinstance(s.dst, Ref) and not s.dst.index and not s.dst.T
                and isinstance(s.value, Call) and s.value.func == "sum" and len(s.value.args) == 1
                and isinstance(s.value.args[0], Ref) and dict(s.value.kwargs) == {"axis": Text("-1"), "keepdims": Text("True")}):
            x = s.dst
            divisor = _divided(body[j + 1], x) if j + 1 < len(body) else None
            rest = body[:j] + body[j + (2 if divisor is not None else 1):]
            only_kernels = all(x.name not in writes_of(b) and (x.name not in reads_of(b) or _is_launch(b)) for b in rest)
            if only_kernels and not any(x.name in reads_of(b) for b in body[:j]):
                buffers.append(Assign(x, Call("empty", ((Size(B_SYM), Size(sympy.Integer(1))), Text("dtype"))), "one buffer for every step"))
                out.append(Do(Helper("_sum_units_to", (s.value.args[0], x, divisor if divisor is not None else Text("1"))), out=x,
                              comment=s.comment))
                j += 2 if divisor is not None else 1
                continue
        out.append(s)
        j += 1
    return replace(loop, body=tuple(out)), buffers


def _divided(s, x: Ref):
    """The divisor of ``s`` where it is ``x = x / n`` (n a size), else None."""
    if not (isinstance(s, Assign) and s.dst == x and isinstance(s.value, Elementwise)):
        return None
    refs = dict(s.value.refs)
    mine = [k for k, v in refs.items() if v == x]
    if len(mine) != 1:
        return None
    num, den = sympy.fraction(s.value.expr)
    if num != sympy.Symbol(mine[0]) or den == 1 or not den.is_Symbol or den.name in refs:
        return None
    return Size(den)


def _is_launch(s) -> bool:
    return isinstance(s, Do) and isinstance(s.call, Helper) and s.call.func == "_launch"


def _flat_views(loop: Loop, names) -> dict[str, str]:
    """{array: its flat view's name} for the arrays the loop's kernels are passed whole and
    that no statement of the loop binds again (a swapped buffer keeps ``.reshape(-1)`` per
    step): made once before the loop instead of per step and kernel."""
    rebound = set()
    for s in loop.body:
        if isinstance(s, Assign):
            dsts = s.dst if isinstance(s.dst, tuple) else (s.dst,)
            rebound |= {d.name for d in dsts if isinstance(d, Ref)}
    arrays = set()
    for s in loop.body:
        if _is_launch(s):
            arrays |= {a.name for a in s.call.args[7:] if isinstance(a, Ref) and not a.index and not a.T}
    return {name: names.fresh(f"{name}_flat") for name in sorted(arrays - rebound)}


def _t_loop(loop: Loop):
    """The loop's variable as an index item (``h_seq[t]``)."""
    return sympy.Symbol(loop.var)


def _fresh_before(name: str, before: list) -> bool:
    """``name`` is made (np.zeros/np.empty) by the last statement before the loop that
    touches it: an array of its own, which the loop may reuse as a buffer."""
    for s in reversed(before):
        if name in writes_of(s) or name in reads_of(s):
            return (isinstance(s, Assign) and s.dst == Ref(name) and isinstance(s.value, Call)
                    and s.value.func in ("zeros", "empty"))
    return False
