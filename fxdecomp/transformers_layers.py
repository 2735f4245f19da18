"""transformers' ``Conv1D`` (GPT-2 family) as a Linear layer, without importing transformers.

``transformers.pytorch_utils.Conv1D`` stores its weight as (in_features, out_features)
and computes ``y = x @ W + b`` (``addmm``): an ``nn.Linear`` with weight ``W.T``.
fxdecomp decomposes it through that Linear, so every Linear method applies and the
decomposed module (a chain of Linears) replaces the Conv1D module as it is.

Example::

    conv1d_types()                 # (transformers.pytorch_utils.Conv1D,) once transformers is imported, else ()
    as_linear(model.transformer.h[0].mlp.c_fc)   # nn.Linear(in, out) sharing no storage with the Conv1D
"""

from __future__ import annotations

import sys

from torch import nn


def conv1d_types() -> tuple[type, ...]:
    """The Conv1D class if transformers is loaded (a model holding one has loaded it), else ()."""
    module = sys.modules.get("transformers.pytorch_utils")
    conv1d = getattr(module, "Conv1D", None)
    return (conv1d,) if isinstance(conv1d, type) else ()


def is_conv1d(module: nn.Module) -> bool:
    types = conv1d_types()
    return bool(types) and isinstance(module, types)


def as_linear(module: nn.Module) -> nn.Linear:
    """An ``nn.Linear`` computing what the Conv1D ``module`` computes (weight transposed, detached, trainable as the
    Conv1D's parameters are, so that the factors inherit it).

    Shapes: Conv1D weight (in, out), bias (out,) -> Linear weight (out, in), bias (out,).
    """
    weight = module.weight.detach().T
    bias = module.bias.detach() if getattr(module, "bias", None) is not None else None
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    layer.weight = nn.Parameter(weight.contiguous(), requires_grad=module.weight.requires_grad)
    if bias is not None:
        layer.bias = nn.Parameter(bias, requires_grad=module.bias.requires_grad)
    layer.train(module.training)
    return layer


def lifted_layer(module: nn.Module) -> nn.Module:
    """``module`` itself, or its Linear equivalent if it is a Conv1D."""
    return as_linear(module) if is_conv1d(module) else module


__all__ = ["as_linear", "conv1d_types", "is_conv1d", "lifted_layer"]
