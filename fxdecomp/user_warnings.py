"""Warnings that point at the user's line, not at fxdecomp's.

A fixed ``stacklevel`` is right for one call path only: the same pass warns from
`fxdecomp.compress`, `CompressionResult.apply_to` or the CLI, through decorators and
pass runners, so a fixed level named a line inside fxdecomp (``grad_mode.py:27``).
`warn` counts the frames instead, as pandas' ``find_stack_level`` does: the warning is
attributed to the caller of the outermost fxdecomp frame (past torch's frames when torch
called fxdecomp, as ``torch.compile`` calls a backend), so it names the user's call and
Python's once-per-location filter counts it there.
"""

from __future__ import annotations

import inspect
import os
import warnings

import torch

from .errors import FxDecompWarning

_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep
_TORCH = os.path.dirname(os.path.abspath(torch.__file__)) + os.sep


def stack_level() -> int:
    """The ``stacklevel`` that `warn` hands ``warnings.warn`` to name the outermost fxdecomp frame (level 1 is
    `warn` itself), or the outermost of the torch frames right above it (torch calling fxdecomp: dynamo calling
    a ``torch.compile`` backend); one more names the user's line that called it."""
    frame = inspect.currentframe()
    owners: list[str] = []  # per level from 1 (warn's frame): "fxdecomp", "torch" or ""
    try:
        frame = frame.f_back
        while frame is not None:
            path = os.path.abspath(frame.f_code.co_filename)
            owners.append("fxdecomp" if path.startswith(_PACKAGE) else "torch" if path.startswith(_TORCH) else "")
            frame = frame.f_back
    finally:
        del frame
    level = max((i for i, owner in enumerate(owners, 1) if owner == "fxdecomp"), default=1)
    while level < len(owners) and owners[level] == "torch":  # owners[level] is level + 1
        level += 1
    return level


def warn(message: str, category: type[Warning] = FxDecompWarning) -> None:
    """``warnings.warn(message, category)`` attributed to the user's line that called into fxdecomp."""
    warnings.warn(message, category, stacklevel=stack_level() + 1)
