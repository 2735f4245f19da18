"""Knowledge distillation (Hinton et al., 2015) and the per-batch objective of fine-tuning.

``distillation_loss`` is the KL divergence between the teacher's and the student's
distributions softened by a temperature T, times T^2 (so its gradients keep their
scale as T changes). `Distiller` mixes it with the task loss and runs the teacher
in eval mode without gradients; use it in your own loop.

Example::

    distiller = Distiller(student, teacher=original, temperature=4.0, alpha=0.5)
    loss, parts = distiller(images, labels)     # parts: {"task": ..., "distill": ...}
    loss.backward(); optimizer.step()
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InvalidInputError


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 4.0) -> torch.Tensor:
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)), averaged over examples (classes on the last dim)."""
    if temperature <= 0:
        raise InvalidInputError(f"temperature must be > 0, got {temperature}")
    if student_logits.shape != teacher_logits.shape:
        raise InvalidInputError(f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} differ in shape")
    classes = student_logits.shape[-1]
    student = F.log_softmax(student_logits.reshape(-1, classes) / temperature, dim=-1)
    teacher = F.log_softmax(teacher_logits.detach().reshape(-1, classes).to(student.dtype) / temperature, dim=-1)
    return F.kl_div(student, teacher, reduction="batchmean", log_target=True) * temperature**2


def call_model(model: nn.Module, inputs: Any) -> torch.Tensor:
    """``model(inputs)``, or ``model(*inputs)`` for a tuple or list of inputs."""
    return model(*inputs) if isinstance(inputs, (tuple, list)) else model(inputs)


class Distiller:
    """Loss of one batch: ``alpha * distillation + (1 - alpha) * task`` with a teacher, the task loss without.

    ``loss_fn(student_logits, targets)`` is the task loss (default: cross-entropy); with a
    teacher, targets may be None (pure distillation). The teacher is run in eval mode under
    ``torch.no_grad()``; its parameters, buffers and training flag are left as they were.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None = None,
        temperature: float = 4.0,
        alpha: float = 0.5,
        loss_fn: Callable[[torch.Tensor, Any], torch.Tensor] | None = None,
    ):
        if not 0.0 <= alpha <= 1.0:
            raise InvalidInputError(f"alpha must be in [0, 1] (the weight of the distillation loss), got {alpha}")
        if temperature <= 0:
            raise InvalidInputError(f"temperature must be > 0, got {temperature}")
        if teacher is not None and teacher is student:
            raise InvalidInputError("the teacher must be another model than the student (e.g. the original, uncompressed one)")
        self.student, self.teacher = student, teacher
        self.temperature, self.alpha = temperature, alpha
        self.loss_fn = loss_fn or F.cross_entropy

    def teacher_logits(self, inputs: Any) -> torch.Tensor:
        was_training = self.teacher.training
        self.teacher.eval()
        try:
            with torch.no_grad():
                return call_model(self.teacher, inputs)
        finally:
            self.teacher.train(was_training)

    def __call__(self, inputs: Any, targets: Any = None) -> tuple[torch.Tensor, dict[str, float]]:
        """(loss to backpropagate, {"task": float, "distill": float, "loss": float}) for one batch."""
        if targets is None and self.teacher is None:
            raise InvalidInputError("a batch without targets needs a teacher (pure distillation)")
        logits = call_model(self.student, inputs)
        parts: dict[str, float] = {}
        terms = []
        if self.teacher is not None:
            distill = distillation_loss(logits, self.teacher_logits(inputs), self.temperature)
            parts["distill"] = float(distill.detach())
            terms.append((self.alpha if targets is not None else 1.0, distill))
        if targets is not None:
            task = self.loss_fn(logits, targets)
            parts["task"] = float(task.detach())
            terms.append((1.0 - self.alpha if self.teacher is not None else 1.0, task))
        loss = sum(weight * term for weight, term in terms)
        parts["loss"] = float(loss.detach())
        return loss, parts
