"""Warnings that point at the user's line, not at fxdecomp's.

A fixed ``stacklevel`` is right for one call path only: the same pass warns from
`fxdecomp.compress`, `CompressionResult.apply_to` or the CLI, through decorators and
pass runners, so a fixed level named a line inside fxdecomp (``grad_mode.py:27``).
`warn` counts the frames instead, as pandas' ``find_stack_level`` does: the warning is
attributed to the caller of the outermost fxdecomp frame, so it names the user's call
and Python's once-per-location filter counts it there.
"""

from __future__ import annotations

import inspect
import os
import warnings

from .errors import FxDecompWarning

_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


def stack_level() -> int:
    """The ``stacklevel`` that `warn` hands ``warnings.warn`` to name the outermost fxdecomp frame (level 1 is
    `warn` itself); one more names the user's line that called it."""
    frame = inspect.currentframe()
    level, outermost = 0, 1
    try:
        frame = frame.f_back  # warn's frame: level 1
        while frame is not None:
            level += 1
            if os.path.abspath(frame.f_code.co_filename).startswith(_PACKAGE):
                outermost = level
            frame = frame.f_back
    finally:
        del frame
    return outermost


def warn(message: str, category: type[Warning] = FxDecompWarning) -> None:
    """``warnings.warn(message, category)`` attributed to the user's line that called into fxdecomp."""
    warnings.warn(message, category, stacklevel=stack_level() + 1)
