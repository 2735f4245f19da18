"""Calibration inputs distilled from a network's own BatchNorm statistics (ZeroQ), for when no data is at hand.

Without calibration data the planner only sees weights, and a weight error says
little about what truncating a layer does to a lean network (EfficientNet-Lite0
at 0.8 of its FLOPs: no top-1 agreement left on weight-only plans). ZeroQ (Cai et
al. 2020, "ZeroQ: A Novel Zero Shot Quantization Framework", eq. 2) makes inputs
whose statistics at every BatchNorm match the running ones the network was
trained with: starting from Gaussian noise, Adam minimises

    sum over BatchNorms of ||mean(x_bn) - running_mean||_2 + ||std(x_bn) - sqrt(running_var + eps)||_2

where x_bn is the BatchNorm's input, its statistics taken over the batch and
positions of each channel. The inputs then calibrate `fxdecomp.compress` as real
data would. Written here: no maintained library distills inputs from BatchNorm
statistics for an arbitrary torch model.

Example::

    data = fxdecomp.distilled_batches(model, (x,), count=32)       # x: one example input batch
    result = fxdecomp.compress(model, (x,), budget=0.8, calibration=data)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .errors import InvalidInputError
from .progress import Progress

_BATCHNORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def distilled_batches(
    model: nn.Module,
    example_inputs: Sequence[torch.Tensor] | torch.Tensor,
    count: int = 32,
    batch_size: int = 8,
    steps: int = 200,
    lr: float = 0.1,
    seed: int = 0,
    progress: bool = False,
) -> list[tuple[torch.Tensor]]:
    """``count`` inputs shaped like one example input, distilled from ``model``'s BatchNorm statistics (ZeroQ).

    Args:
        model: a network with BatchNorm layers that track running statistics; it is
            not modified (its parameters get no gradients, its mode is restored).
        example_inputs: the model's single input (a tensor, or a 1-tuple); its shape past the
            batch dimension, dtype and device are those of the distilled inputs.
        count: distilled inputs, optimised together as one batch (the statistics are batch statistics).
        batch_size: inputs per returned calibration batch.
        steps: Adam steps on the inputs; lr: its learning rate; seed: of the starting noise.
        progress: report the steps on stderr (`fxdecomp.progress.Progress`).

    Returns:
        ``ceil(count / batch_size)`` 1-tuples of inputs (batch_size, *example shape[1:]).

    Raises:
        InvalidInputError: the model has no BatchNorm with running statistics, takes more than one
            input, or its input is not a floating-point tensor (token ids cannot be distilled this way).
    """
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    if len(inputs) != 1 or not isinstance(inputs[0], torch.Tensor) or not inputs[0].is_floating_point():
        raise InvalidInputError(
            "distilled_batches makes one floating-point input tensor (images, spectrograms); this model takes "
            f"{[type(x).__name__ if not isinstance(x, torch.Tensor) else str(x.dtype) for x in inputs]}: pass real calibration data"
        )
    norms = [m for m in model.modules() if isinstance(m, _BATCHNORMS) and m.track_running_stats and m.running_mean is not None]
    if not norms:
        raise InvalidInputError(
            "distilled_batches matches BatchNorm running statistics, and this model has no BatchNorm that tracks them "
            "(a LayerNorm network, or BatchNorms folded away): pass real calibration data"
        )
    if count < 2 or batch_size < 1 or steps < 0:
        raise InvalidInputError(f"distilled_batches needs count >= 2, batch_size >= 1, steps >= 0; got {count}, {batch_size}, {steps}")
    example = inputs[0]
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn((count, *example.shape[1:]), generator=generator, dtype=example.dtype).to(example.device).requires_grad_()
    optimizer = torch.optim.Adam([x], lr=lr)
    observed: list[tuple[nn.Module, torch.Tensor]] = []
    handles = [norm.register_forward_pre_hook(lambda m, args: observed.append((m, args[0]))) for norm in norms]
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        with torch.enable_grad(), Progress("distillation step", steps, progress) as report:
            for _ in range(steps):
                report.step()
                observed.clear()
                model(x)
                if not observed:
                    raise InvalidInputError(
                        "distilled_batches: none of the model's BatchNorms ran on the example input's shape; "
                        "pass real calibration data"
                    )
                loss = sum(_statistics_loss(norm, value) for norm, value in observed)
                optimizer.zero_grad()
                (grad,) = torch.autograd.grad(loss, [x])  # gradients of the inputs only: the model's stay untouched
                x.grad = grad
                optimizer.step()
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes.items():  # each module's own mode: a user's eval-mode Dropout stays so
            module.training = training
    data = x.detach()
    return [(data[i : i + batch_size].clone(),) for i in range(0, count, batch_size)]


def _statistics_loss(norm: nn.Module, value: torch.Tensor) -> torch.Tensor:
    """ZeroQ's term of one BatchNorm: distances of its input's channel mean and std from the running ones."""
    dims = [d for d in range(value.dim()) if d != 1]
    mean = value.mean(dims)
    std = (value.var(dims, unbiased=False) + norm.eps).sqrt()
    return (mean - norm.running_mean).norm() + (std - (norm.running_var + norm.eps).sqrt()).norm()
