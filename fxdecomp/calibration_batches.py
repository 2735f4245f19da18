"""Calibration data read more than once: the correction passes run it again after the rewrite.

``compress(calibration=...)`` takes any iterable of input tuples, and a generator is
consumed by the calibrate pass. When the recipe holds an enabled pass that runs the
data again (a pass class with ``replays_calibration = True``: correct_factors,
reestimate_batchnorm, compensate), `replayable` keeps a one-shot iterator's batches
(copies of the inputs, so a model that writes into its inputs cannot change what later passes see); a list, a tensor dataset or a DataLoader is
iterated again as it is.

Example::

    calibration = replayable(calibration, recipe.steps)
    for inputs in calibration_batches(calibration, max_batches=0): model(*inputs)
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from .errors import InvalidInputError


def replayable(calibration: Any, steps: Iterable[Any]) -> Any:
    """``calibration`` as given, or a `ReplayableBatches` of it when it is a one-shot iterator and an
    enabled step (a `fxdecomp.recipes.Step`) is a pass that replays the calibration data."""
    if calibration is None or not isinstance(calibration, Iterator):
        return calibration
    from .passes import pass_class

    for step in steps:
        cls = pass_class(step.name)
        if getattr(cls, "replays_calibration", False) and getattr(cls.Options(**step.options), "enabled", True):
            return ReplayableBatches(calibration)
    return calibration


class ReplayableBatches:
    """Iterates a one-shot iterator's batches as they come, and replays them on every later iteration.

    Keeps a copy of each batch (the inputs only, never activations), so that a model
    that writes into its inputs does not change what later passes see.
    """

    def __init__(self, source):
        self._source = iter(source)
        self._kept: list = []

    def __iter__(self):
        position = 0
        while True:
            if position == len(self._kept):
                try:
                    batch = next(self._source)
                except StopIteration:
                    return
                self._kept.append(_copied(batch))
                yield batch
            else:
                yield self._kept[position]
            position += 1


def _copied(batch):
    if isinstance(batch, torch.Tensor):
        return batch.detach().clone()
    if isinstance(batch, (tuple, list)):
        return type(batch)(_copied(b) for b in batch)
    return copy.deepcopy(batch)


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
