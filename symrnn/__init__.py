"""symrnn: the equations of a recurrent cell -> verified gradient kernels.

A cell is written once, per unit, as SymPy expressions (or in a TOML equations
file); symrnn derives its BPTT and RTRL gradients, generates NumPy and CuPy
modules, checks them against finite differences and writes the derivation as
LaTeX or Markdown.  The command line is ``symrnn`` (``symrnn --help``).

The API, by task:

* write a cell: :class:`Cell`, with :class:`Param` shapes (and :class:`State` sizes; either
  with an :class:`Init`, see :func:`parse_init`), a :class:`Loss`, and
  ``params("W U")`` for parameter symbols (``W @ x`` a matrix product,
  ``W @ (h_prev, x)`` a concatenation, ``W[k]`` a row block, ``W.T @ v`` a transpose,
  ``matvec(W - W.T - gamma * I, h)`` a combination of matrices with the identity ``I``);
  the nonlinearities ``sigmoid``, ``tanh``, ``relu``, ``softplus``, ``exp``, ``identity``,
  ``step``, ``log``, ``sqrt``, ``sin``, ``cos``
  (``OPS`` maps their names to them); the reductions over units ``mean``, ``sum_units``
  (``sum`` in a spec file) and ``logsumexp``, broadcast back to every unit (``REDUCTIONS``);
  ``help(symrnn.cell)`` has an example;
* show a derivation in a notebook: :func:`derivation` (``symrnn.derivation("lstm")`` displays as
  mathematics; ``.tex``, ``.markdown``, ``.pdf(path)``);
* check a hand-written derivation: ``symrnn.verify`` (``verify_file``, ``format_report``; the
  claims format is ``docs/claims-format.md``), ``symrnn verify CLAIMS.toml`` on the command line;
* read a cell from an equations file: :func:`load_spec`, :func:`parse_spec`
  (``docs/spec-format.md``), which raise :class:`SpecError` and warn with
  :class:`SpecWarning`;
* the built-in cells: :func:`builtin_names`, :func:`builtin`;
* generate and check: ``symrnn.pipeline`` (``build``, ``render_numpy``,
  ``render_cupy``, ``render_latex``, ``render_markdown``, ``generate``,
  ``load_module``) and ``symrnn.gradcheck`` (``check_module``, ``report``);
* errors: :class:`UserError` for bad input (:class:`CellError`,
  :class:`SpecError`), :class:`InternalError` for a bug in symrnn.

>>> import symrnn
>>> print(symrnn.builtin("single_sigmoid").summary())
single_sigmoid [seed 002]: one sigmoid hidden unit: a = w x + v h^{t-1} + b, h = sigma(a), y = u h + d; L = mean over time of (target - y)^2 / 2
"""

from .cell import DIMS, Block, Cell, I, Loss, MatVec, Param, ParamSymbol, State, Transpose, matvec, params
from .cells import builtin, builtin_names
from .errors import CellError, InternalError, UserError
from .init import Init, parse_init
from .notebook import derivation
from .ops import OPS, cos, exp, identity, log, relu, sigmoid, sin, softplus, sqrt, step, tanh
from .reductions import REDUCTIONS, logsumexp, mean, sum_units
from .spec import SpecError, SpecWarning, load_spec, parse_spec
from .version import __version__

# What help(symrnn) documents.  Everything imported above is importable from here
# (from symrnn import tanh), but the nonlinearities and Block, MatVec, ParamSymbol are SymPy
# classes, whose inherited methods would fill 36,000 lines, and each exception class but
# UserError would add the 70 lines of ValueError's: the docstring above names them instead.
__all__ = [
    "DIMS", "Cell", "Init", "Loss", "OPS", "Param", "State", "UserError", "builtin", "builtin_names", "derivation", "load_spec",
    "params", "parse_init", "parse_spec",
]
