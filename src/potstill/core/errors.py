"""User-facing errors.

A :class:`PotstillError` means *the input is wrong*, not the code. The CLI prints
its message as one line and exits with code 2; no traceback. Messages name the
problem and the fix.
"""

from __future__ import annotations


class PotstillError(Exception):
    """Bad input: a config, a file, a model spec. The message says what to fix."""


class TrainingDiverged(PotstillError):
    """The loss became NaN/inf; the run stopped before applying the bad update."""
