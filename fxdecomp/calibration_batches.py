"""Calibration data read more than once: the correction passes run it again after the rewrite.

``compress(calibration=...)`` takes any iterable of input tuples, and a generator is
consumed by the calibrate pass. When the recipe holds an enabled pass that runs the
data again (a pass class with ``replays_calibration = True``: correct_factors,
reestimate_batchnorm), `replayable` keeps a one-shot iterator's batches in a list
(memory: the calibration inputs themselves); a list, a tensor dataset or a DataLoader is
iterated again as it is.

Example::

    calibration = replayable(calibration, recipe.steps)
    for inputs in calibration_batches(calibration, max_batches=0): model(*inputs)
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch

from .errors import InvalidInputError


def replayable(calibration: Any, steps: Iterable[Any]) -> Any:
    """``calibration`` as given, or its batches in a list when it is a one-shot iterator and an enabled
    step (a `fxdecomp.recipes.Step`) is a pass that replays the calibration data."""
    if calibration is None or not isinstance(calibration, Iterator):
        return calibration
    from .passes import pass_class

    for step in steps:
        cls = pass_class(step.name)
        if getattr(cls, "replays_calibration", False) and getattr(cls.Options(**step.options), "enabled", True):
            return list(calibration)
    return calibration


def calibration_batches(calibration: Iterable, max_batches: int = 0) -> Iterator[tuple[torch.Tensor, ...]]:
    """The calibration data as input tuples, at most ``max_batches`` (0: all).

    Raises:
        InvalidInputError: a batch that is not a tensor or a tuple of tensors.
    """
    for index, batch in enumerate(calibration):
        if max_batches and index >= max_batches:
            return
        inputs = tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)
        if not all(isinstance(x, torch.Tensor) for x in inputs):
            raise InvalidInputError("calibration must yield input tuples (or single tensors) like example_inputs")
        yield inputs
