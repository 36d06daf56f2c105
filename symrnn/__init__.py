"""symrnn: the equations of a recurrent cell -> verified gradient kernels."""

from .cell import DIMS, Block, Cell, Loss, MatVec, Param, ParamSymbol, State, params
from .cells import builtin, builtin_names
from .errors import CellError, InternalError, UserError
from .init import Init, parse_init
from .ops import OPS, exp, identity, relu, sigmoid, softplus, step, tanh
from .spec import SpecError, SpecWarning, load_spec, parse_spec

__version__ = "0.1.0"

__all__ = [
    "DIMS", "Block", "Cell", "CellError", "Init", "InternalError", "Loss", "MatVec", "OPS", "Param",
    "ParamSymbol", "SpecError", "SpecWarning", "State", "UserError", "builtin", "builtin_names", "exp", "identity",
    "load_spec", "params", "parse_init", "parse_spec", "relu", "sigmoid", "softplus", "step", "tanh",
]
