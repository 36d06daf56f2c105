"""The two kinds of error symrnn raises.

* :class:`UserError` and its subclasses: something in the user's input (a cell
  definition, a name, an option, an output folder) is wrong.  The message names
  the place and says what is expected; the CLI prints it on one line and exits
  with status 2.
* :class:`InternalError`: a bug in symrnn.  The message says so.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UserError(ValueError):
    """Bad input from the user; the message is meant to be shown as it is."""


class CellError(UserError):
    """A cell definition is inconsistent (unknown symbol, shape mismatch, ...)."""

    def __init__(self, cell: str, where: str, message: str):
        self.cell, self.where = cell, where
        super().__init__(f"cell '{cell}', {where}: {message}")


class InternalError(RuntimeError):
    """A bug in symrnn, not in the user's input."""

    def __init__(self, message: str):
        super().__init__(f"internal error (a bug in symrnn, please report it): {message}")


def suggest(name: str, choices: Iterable[str]) -> str:
    """' (did you mean 'x'?)' for the closest of ``choices``, or ''."""
    close = difflib.get_close_matches(name, sorted(choices), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""
