"""Public entry points run with inference mode off, whatever mode their caller is in.

Under ``torch.inference_mode()`` every tensor made is an inference tensor: one that
autograd can never use. Called there, `fxdecomp.compress` would return factors that
cannot be trained (``finetune`` and any backward raise) and its calibration could not
differentiate the model (output-aware errors silently skipped). Example inputs and
calibration batches made under inference mode are copied into normal tensors where
gradients need them (`fxdecomp.passes.calibrate`).
"""

from __future__ import annotations

import functools
from typing import Callable, TypeVar

import torch

F = TypeVar("F", bound=Callable)


def outside_inference_mode(fn: F) -> F:
    """``fn``, run under ``torch.inference_mode(False)`` (which also enables grad) when its caller is in inference
    mode; otherwise run as called, its grad mode untouched."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if not torch.is_inference_mode_enabled():
            return fn(*args, **kwargs)
        with torch.inference_mode(False):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
