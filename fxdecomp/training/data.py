"""Training data as fxdecomp's training helpers take it: batches of (inputs, targets), once per epoch.

``data`` is a re-iterable (a list, a DataLoader), or a callable returning a fresh
iterator (called with the epoch number if it takes one argument, to reshuffle).
A bare generator can be read only once, so it serves one epoch only.

Example::

    for inputs, targets in epoch_batches(lambda epoch: split.batches(64, shuffle=True, seed=epoch), epoch=3):
        ...
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from ..errors import InvalidInputError

Data = Iterable[tuple[Any, Any]] | Callable[..., Iterable[tuple[Any, Any]]]


def epoch_batches(data: Data, epoch: int) -> Iterator[tuple[Any, Any]]:
    """The batches of one epoch, each checked to be an (inputs, targets) pair."""
    if callable(data) and not hasattr(data, "__iter__"):
        source = data(epoch) if _takes_argument(data) else data()
    elif iter(data) is data and epoch > 0:
        raise InvalidInputError(
            "data is an iterator (e.g. a generator), which is used up after one epoch; pass a list, a DataLoader "
            "or a callable returning a fresh iterator"
        )
    else:
        source = data
    for batch in source:
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise InvalidInputError(f"each batch must be an (inputs, targets) pair, got {type(batch).__name__}")
        yield batch[0], batch[1]


def _takes_argument(function: Callable) -> bool:
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return False
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.default is p.empty]
    return len(positional) == 1 or any(p.kind == p.VAR_POSITIONAL for p in parameters)
