"""One namer owns every name a generated module uses.

The user's names (inputs, states, parameters, equations) keep their spelling in
the generated code wherever they can.  Every other name a backend prints (a
value over all steps, an adjoint, a tangent, a buffer, a temporary) is asked
for by *what it is*, ``namer("seq", "h")`` or ``namer("adj", "h")``, and gets
its readable spelling (``h_seq``, ``d_h``) unless something else already has
it: a user's name, the template's own names, the language's keywords and
built-ins, or another generated name.  Then it gets a numbered one (``d_h_1``).
Asking again for the same thing gives the same name; two different things never
get the same name.  So a paper's ``W_T``, ``common``, ``h0``, ``B`` or ``d_x``
works as any other name does, and no list of reserved names is needed.

>>> n = Namer(PYTHON_FIXED, ["h", "d_h", "T"])
>>> n.value("h"), n.value("T"), n("adj", "h"), n("adj", "h"), n("seq", "h")
('h', 'T_1', 'd_h_1', 'd_h_1', 'h_seq')
>>> n.kind("d_h_1"), n.kind("h")
('adj', 'value')
"""

from __future__ import annotations

import builtins
import keyword
from collections.abc import Iterable, Iterator, Mapping

import sympy

from .errors import InternalError
from .ops import OPS

__all__ = ["Namer", "PYTHON_FIXED", "C_FIXED", "PATTERNS"]

#: what each kind of generated name is called, from the spellings of its parts
PATTERNS: dict[str, str] = {
    "value": "{0}",  # a value at one step (its own name)
    "seq": "{0}_seq",  # a value over every step
    "adj": "d_{0}",  # the adjoint of a value at one step (or a parameter's gradient)
    "adj_seq": "d_{0}_seq",  # ... over every step
    "adj_next": "d_{0}_next",  # a state's adjoint carried from step t + 1
    "adj_part": "d_{0}_{1}",  # stage {1}'s contribution to the adjoint of {0}
    "adj_from": "d_{0}_from{1}",  # ... within its own region
    "adj_via": "d_{0}_from_{1}",  # W^T delta of GEMM {1}, the operand {0}'s share
    "adj_sum": "d_{0}_sum",  # the sum over units of a reduction's adjoint
    "adj_out": "d_{0}_out",  # the adjoint of an output, read by a kernel
    "adj_loop": "d_{0}_loop",
    "adj_stage_seq": "d_{0}_{1}_seq",  # stage {1}'s contribution, stored over every step
    "adj_stage_acc": "d_{0}_{1}_acc",  # stage {1}'s contribution to a parameter's gradient, summed as it runs
    "adj_stage": "d_{0}_{1}",
    "adj_post_seq": "d_{0}_from_{1}_seq",
    "adj_post": "d_{0}_from_{1}",
    "adj_via_seq": "d_{0}_from_{1}_seq",
    "next": "{0}_next",  # an adjoint array (or kernel local) carried from step t + 1
    "grad0": "d_{0}0",  # the gradient of an initial state (CuPy module)
    "group": "{0}",  # a stacked GEMM's output at one step (its plan name)
    "gseq": "{0}_seq",  # ... over every step
    "gstep": "{0}_step",  # ... a one-step buffer
    "gadj_seq": "d_{0}_seq",  # the adjoint of a GEMM's output, over every step
    "offset0": "o_{0}0",  # the first RTRL direction of an initial state
    "tangent": "J_{0}",  # a value's RTRL tangent
    "offset": "o_{0}",  # the first RTRL direction of a parameter, initial state or the input
    "sum": "{0}_sum",
    "step": "{0}_step",
    "transpose": "{0}_T",
    "ptr": "{0}",  # a kernel's pointer argument (CUDA)
}

#: names the NumPy and CuPy module templates define at module level, or use in the
#: functions that hold generated statements (forward, backward, _rtrl); other
#: functions (``_loss(y, target)``, ...) hold none (tests/test_naming.py keeps this complete)
PYTHON_TEMPLATE = frozenset("""
    np cp CELL CUDA_SOURCE FIXED_DIMS KERNELS OUTPUTS LOSS_TARGET PARAM_SHAPES STATES INPUT_SIZE PARAM_INITS STATE_INITS
    _BLOCK _COEF_STEPS _FUNCTIONS _MODULE CupyUnavailable param_shapes input_size init_params init_state0 forward
    backward loss_and_grads rtrl_loss_and_grads rtrl_grads
    _rtrl _loss _loss_grad _check_target _check_steps _check_grad_outputs _check_same_params _same_bits _real _read_only _add_diagonal
    _add_matrix _add_matrix_t _seed _dims _dim_of _as_input _prepare _cupy
    _launch params x state0 p n_in n_hidden n_out dims dtype T B t t0 t1 outputs cache grad_outputs K G cot
    cotangent dW_stack
    final_states final steps lengths reverse grad_final order hold grads extra _steps _in_steps _out_steps _seeds_in_steps
    _final_states _check_grad_final _outputs_in_steps _masked_sum _ONES _ones _sum_units _mean_units _sum_rows _sum_rows_by _host_mean_units _host_sum_units
""".split())

#: Python's keywords and built-ins, and the templates' names
PYTHON_FIXED = frozenset(keyword.kwlist) | frozenset(dir(builtins)) | PYTHON_TEMPLATE

_C_KEYWORDS = """
    alignas alignof and and_eq asm auto bitand bitor bool break case catch char char8_t char16_t char32_t class
    compl concept const consteval constexpr constinit const_cast continue co_await co_return co_yield decltype
    default delete do double dynamic_cast else enum explicit export extern false float for friend goto if inline
    int long mutable namespace new noexcept not not_eq nullptr operator or or_eq private protected public register
    reinterpret_cast requires restrict return short signed sizeof static static_assert static_cast struct switch
    template this thread_local throw true try typedef typeid typename union unsigned using virtual void volatile
    wchar_t while xor xor_eq NULL size_t int64_t
""".split()
_C_MATH = """
    abs acos acosh asin asinh atan atan2 atanh cbrt ceil copysign cos cosh erf erfc exp exp2 expm1 fabs fdim floor
    fma fmax fmin fmod frexp hypot ilogb isfinite isinf isnan ldexp lgamma llrint llround log log10 log1p log2 logb
    lrint lround max min modf nan nearbyint nextafter pow remainder remquo rint round scalbln scalbn signbit sin
    sinh sqrt tan tanh tgamma trunc
""".split()
_CUDA = "threadIdx blockIdx blockDim gridDim warpSize printf malloc free".split()
#: names of the CUDA template (indices and sizes of a kernel) and the ops' helpers
C_TEMPLATE = frozenset("scalar_t row_ unit_ rows_ units_ steps_ step_ t_ i_ n_in n_hidden n_out lengths_ active_".split()) | {
    f"op_{name}" for name in OPS
}
#: C++'s keywords, the math functions (with their float and long double forms), CUDA's built-ins, the template's names
C_FIXED = (frozenset(_C_KEYWORDS) | {f + s for f in _C_MATH for s in ("", "f", "l")} | frozenset(_CUDA)
           | C_TEMPLATE)


class Namer:
    """The names of one generated module (or of one kernel source): see the module docstring.

    ``fixed``: names nothing generated may take; ``values``: the names of the step
    graph's values, each printed as itself where it can be; ``spellings``: how a value
    reads inside the names made from it, where not as itself (the input reads ``x``)."""

    def __init__(self, fixed: Iterable[str], values: Iterable[str], spellings: Mapping[str, str] | None = None):
        self._taken: set[str] = set(fixed)
        self._scoped: set[str] = set()  # names of one scope each (numbered(scoped=True)): no other name takes them
        self._names: dict[tuple, str] = {}
        self._kinds: dict[str, tuple] = {}
        self._spelling = dict(spellings or {})
        values = list(values)
        for name in values:  # first every value that can keep its own spelling, then the others
            if name not in self._taken:
                self._claim(("value", name), name)
        for name in values:
            if ("value", name) not in self._names:
                self._claim(("value", name), name)
        self._taken |= set(values)  # a graph name is a SymPy symbol: no generated name may equal one

    def _claim(self, key: tuple, preferred: str) -> str:
        if not preferred.isidentifier():
            raise InternalError(f"generated name {preferred!r} is not an identifier")
        name, k = preferred, 1
        while name in self._taken or name in self._scoped:
            name, k = f"{preferred}_{k}", k + 1
        self._taken.add(name)
        self._names[key] = name
        self._kinds[name] = key
        return name

    def spelling(self, part) -> str:
        """How a part of a generated name reads: a value by its own spelling, anything
        else (a stage number, a name already generated) as it is."""
        return self._spelling.get(part, str(part)) if isinstance(part, str) else str(part)

    def __call__(self, kind: str, *parts) -> str:
        """The name of ``kind`` of ``parts`` (the same one every time it is asked for)."""
        key = (kind, *parts)
        if key not in self._names:
            if kind == "value":
                raise InternalError(f"'{parts[0]}' is not a value of the step graph")
            self._claim(key, PATTERNS[kind].format(*(self.spelling(p) for p in parts)))
        return self._names[key]

    def get(self, key: tuple, preferred: str) -> str:
        """The name of ``key``, spelled ``preferred`` where it is free (for names whose
        spelling is not their key's, e.g. a stacked weight named by its operand)."""
        if key not in self._names:
            self._claim(key, preferred)
        return self._names[key]

    def value(self, name: str) -> str:
        """The name of a value of the step graph at one step."""
        return self("value", name)

    def fresh(self, stem: str) -> str:
        """A new name: ``stem``, or ``stem_1``, ... (never the same twice)."""
        key = ("fresh", stem, len(self._names))
        return self._claim(key, stem)

    def numbered(self, stem: str, scoped: bool = False) -> Iterator[sympy.Symbol]:
        """Symbols ``stem0``, ``stem1``, ... that no other name has (for sympy.cse).

        ``scoped``: the names live in one scope only (the temporaries of one CUDA
        function), so another scoped run may use them again; no other name will."""
        k = 0
        while True:
            name = f"{stem}{k}"
            k += 1
            if name not in self._taken:
                (self._scoped if scoped else self._taken).add(name)
                self._kinds[name] = ("numbered", stem)
                yield sympy.Symbol(name)

    def kind(self, name: str) -> str | None:
        """What a generated name is (``"adj"``, ``"seq"``, ...), or None for another name."""
        key = self._kinds.get(name)
        return key[0] if key else None

    def owner(self, name: str) -> tuple | None:
        """(kind, parts...) of a generated name, or None."""
        return self._kinds.get(name)

    def taken(self, name: str) -> bool:
        return name in self._taken

    def names(self) -> frozenset[str]:
        """Every name this namer gave out (values included)."""
        return frozenset(self._kinds)
