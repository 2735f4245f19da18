"""Fine-tuning of a (decomposed) model, with knowledge distillation from the original when asked.

Example::

    result = fxdecomp.compress(model, (x,), budget=0.3)
    history = finetune(result.graph_module, train_batches, epochs=3, lr=1e-3, teacher=model)
    history.loss        # mean loss per epoch
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..errors import InvalidInputError
from .data import Data, epoch_batches
from .distill import Distiller


@dataclass
class History:
    """Mean losses per epoch (``distill``/``task`` only where they apply), optimizer steps, seconds."""

    loss: list[float] = field(default_factory=list)
    task: list[float] = field(default_factory=list)
    distill: list[float] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0


def finetune(
    module: nn.Module,
    data: Data,
    epochs: int = 1,
    lr: float = 1e-3,
    teacher: nn.Module | None = None,
    temperature: float = 4.0,
    alpha: float = 0.5,
    loss_fn: Callable[[torch.Tensor, Any], torch.Tensor] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    max_steps: int | None = None,
    progress: bool | None = None,
) -> History:
    """Train ``module`` in place on ``data`` (batches of (inputs, targets)) and return its `History`.

    With a ``teacher`` the loss is ``alpha * KD(student, teacher, temperature) + (1 - alpha) * task``
    (see `Distiller`); the teacher is never modified. ``optimizer`` defaults to Adam(lr) on the
    module's trainable parameters; ``max_steps`` stops after that many optimizer steps.
    ``progress`` prints one line per epoch on stderr (default: when stderr is a terminal).
    The module's training flag is restored at the end.
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise InvalidInputError(f"epochs must be an int >= 1, got {epochs!r}")
    if max_steps is not None and max_steps < 1:
        raise InvalidInputError(f"max_steps must be >= 1 or None, got {max_steps!r}")
    params = [p for p in module.parameters() if p.requires_grad]
    if optimizer is None:
        if not params:
            raise InvalidInputError("the module has no trainable parameters (requires_grad is False everywhere)")
        optimizer = torch.optim.Adam(params, lr=lr)
    distiller = Distiller(module, teacher, temperature, alpha, loss_fn)
    show = sys.stderr.isatty() if progress is None else progress
    history, start, was_training = History(), time.perf_counter(), module.training
    module.train()
    try:
        for epoch in range(epochs):
            sums: dict[str, float] = {}
            counts: dict[str, int] = {}
            batches = 0
            for inputs, targets in epoch_batches(data, epoch):
                optimizer.zero_grad(set_to_none=True)
                loss, parts = distiller(inputs, targets)
                loss.backward()
                optimizer.step()
                history.steps += 1
                batches += 1
                for key, value in parts.items():
                    sums[key] = sums.get(key, 0.0) + value
                    counts[key] = counts.get(key, 0) + 1
                if max_steps is not None and history.steps >= max_steps:
                    break
            if batches == 0:
                raise InvalidInputError(f"data yielded no batch in epoch {epoch}")
            for key in ("loss", "task", "distill"):
                if key in sums:
                    getattr(history, key).append(sums[key] / counts[key])
            if show:
                _print_epoch(epoch, epochs, history, batches, time.perf_counter() - start)
            if max_steps is not None and history.steps >= max_steps:
                break
    finally:
        module.train(was_training)
        history.seconds = time.perf_counter() - start
    return history


def _print_epoch(epoch: int, epochs: int, history: History, batches: int, seconds: float) -> None:
    parts = [f"loss {history.loss[-1]:.4f}"]
    parts += [f"{key} {getattr(history, key)[-1]:.4f}" for key in ("task", "distill") if len(getattr(history, key)) == len(history.loss)]
    if not math.isfinite(history.loss[-1]):
        parts.append("(not finite: lower lr?)")
    print(f"fxdecomp finetune: epoch {epoch + 1}/{epochs}, {batches} batches, {', '.join(parts)}, {seconds:.1f} s", file=sys.stderr, flush=True)
