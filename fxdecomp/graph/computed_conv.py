"""Conv subclasses that compute their weight in ``forward`` from their own parameters.

timm's ``StdConv2d`` / ``ScaledStdConv2d`` (BiT ResNetV2, NFNets) standardise ``weight``
(and scale it by a learned gain) in every forward before calling ``F.conv2d``. Such a layer
is still a conv of its own configuration, with an effective weight that depends on its
parameters alone. `materialize_computed_convs` records the weight and bias the forward
hands to the conv function (a ``TorchFunctionMode``), checks on two random probes that the
weight does not depend on the input and that the plain torch conv with it reproduces the
layer, and then makes the layer in fxdecomp's private copy that plain conv: the decomposers
factor the effective weight, as they do for `torch.nn.utils.parametrize` weights
(`fxdecomp.graph.parametrized`). A layer that fails a check is left as it is (and refused
later, by name, as a conv whose forward fxdecomp cannot express).

Written here because no library turns a layer's in-forward weight transform into a plain
weight; the recording uses torch's ``TorchFunctionMode``.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..conv_calls import CONV_CALLS
from ..layer_spec import CONV_TYPES, torch_class

_RTOL, _ATOL = 1e-4, 1e-5  # as layer_spec's check of a custom forward


class _ConvCalls(TorchFunctionMode):
    """Records (weight, bias) of every conv function called while active."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[torch.Tensor, torch.Tensor | None]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        call = CONV_CALLS.get(func)
        if call is not None:
            values = dict(zip(call.arg_names, args)) | kwargs
            self.calls.append((values.get("weight"), values.get("bias")))
        return func(*args, **kwargs)


def overrides_forward(module: nn.Module) -> bool:
    return isinstance(module, CONV_TYPES) and type(module).forward is not torch_class(module).forward


@torch.no_grad()
def _effective(conv: nn.Module, probe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor] | None:
    """(weight, bias, output) of the one conv call ``conv``'s forward makes on ``probe``; None unless exactly one.

    Calls ``forward`` itself: the user's hooks do not run on probes.
    """
    recorder = _ConvCalls()
    with recorder:
        output = conv.forward(probe)
    if len(recorder.calls) != 1:
        return None
    weight, bias = recorder.calls[0]
    if not isinstance(weight, torch.Tensor) or weight.shape != conv.weight.shape:
        return None
    if bias is not None and (conv.bias is None or not isinstance(bias, torch.Tensor) or bias.shape != conv.bias.shape):
        return None
    return weight.detach().clone(), None if bias is None else bias.detach().clone(), output


def _probes(conv: nn.Module) -> list[torch.Tensor]:
    """Two random inputs of different sizes, one odd and one even per spatial dim (a forward that pads by the
    input's size, TF "same" at stride 2, pads them differently)."""
    generator = torch.Generator().manual_seed(0)
    sizes = [2 * d * (k - 1) + 5 + 2 * i for i, (k, d) in enumerate(zip(conv.kernel_size, conv.dilation))]
    return [
        torch.randn(1, conv.in_channels, *[n + extra for n in sizes], generator=generator, dtype=conv.weight.dtype).to(conv.weight.device)
        for extra in (0, 3)
    ]


def plain_with_weight(conv: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """A torch-class conv holding ``conv``'s configuration, hooks, buffers and submodules, and ``weight`` / ``bias``."""
    cls = torch_class(conv)
    plain = cls.__new__(cls)
    plain.__dict__.update({k: copy.copy(v) if isinstance(v, dict) else v for k, v in vars(conv).items()})
    plain._parameters = {
        "weight": nn.Parameter(weight, requires_grad=conv.weight.requires_grad),
        "bias": None if bias is None else nn.Parameter(bias, requires_grad=conv.bias.requires_grad),
    }
    return plain


def plain_equivalent(conv: nn.Module) -> nn.Module | None:
    """The plain torch conv (nn.Conv2d, ...) of ``conv``'s configuration and effective weight, or None.

    None when ``conv`` does not override ``forward``, makes other than one conv call, computes its
    weight from the input, calls the conv on its own weight and bias (nothing to materialize), or
    is not that plain conv on both probes (e.g. it pads by the input size). The plain conv keeps
    ``conv``'s hooks; its other parameters (a gain) are gone.
    """
    if not overrides_forward(conv):
        return None
    was_training = conv.training
    conv.eval()
    try:
        probes = _probes(conv)
        seen = [_effective(conv, probe) for probe in probes]
        if any(s is None for s in seen) or not torch.equal(seen[0][0], seen[1][0]):
            return None
        weight, bias, _ = seen[0]
        same_bias = (bias is None) == (conv.bias is None) and (bias is None or torch.equal(bias, conv.bias))
        if torch.equal(weight, conv.weight) and same_bias:
            return None  # its own weight: nothing computed (a pad, if any, is layer_spec's to check)
        plain = plain_with_weight(conv, weight, bias)
        with torch.no_grad():
            for probe, (_, _, output) in zip(probes, seen):
                got = plain.forward(probe)
                if got.shape != output.shape or not torch.allclose(got, output, rtol=_RTOL, atol=_ATOL):
                    return None
    except Exception:  # a forward that cannot run on a probe is refused later, by name
        return None
    finally:
        conv.train(was_training)
    plain.train(was_training)
    return plain


def materialize_computed_convs(model: nn.Module) -> dict[str, str]:
    """Replace, in place, every conv of ``model`` that computes its weight in forward by its `plain_equivalent`.

    Every name the layer is registered under gets the same plain conv. Returns {weight path: note}.
    """
    replaced: dict[int, nn.Module] = {}
    notes: dict[str, str] = {}
    for name, module in list(model.named_modules()):
        plain = plain_equivalent(module) if name else None  # the root itself stays what it is
        if plain is None:
            continue
        replaced[id(module)] = plain
        notes[f"{name}.weight"] = (
            f"computed in {type(module).__name__}.forward from its parameters (e.g. weight standardization) and "
            "materialized: its effective weight was factored"
        )
    if replaced:
        for parent in model.modules():
            for child_name, child in list(parent._modules.items()):
                if child is not None and id(child) in replaced:
                    parent._modules[child_name] = replaced[id(child)]
    return notes
