"""Functional convolution calls (``F.conv1d`` .. ``aten.convolution``) as the modules they amount to.

A candidate found in functional form is held by an equivalent module built on the
meta device around the call's own weight and bias (`lifted_conv`), so the
decomposers see one kind of layer whatever the call form. `CONV_CALLS` names, for
every conv function target that torch.fx (``F.conv*``, ``torch.conv*``) and
torch.export (``aten.conv1d.default``, ``aten.conv3d.padding``,
``aten.conv_transpose2d.input``, ...; torch 2.13 emits these, not
``aten.convolution``) put in a graph, its argument names in order.

Example::

    call = CONV_CALLS[torch.ops.aten.conv_transpose2d.input]
    values = dict(zip(call.arg_names, node.args)) | dict(node.kwargs)
    layer = lifted_conv(call, weight, bias, values)   # an nn.ConvTranspose2d, or None
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

aten = torch.ops.aten

_CONV_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_TRANSPOSE_ARGS = ("input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation")
_CONVOLUTION_ARGS = ("input", "weight", "bias", "stride", "padding", "dilation", "transposed", "output_padding", "groups")


@dataclass(frozen=True)
class ConvCall:
    """A conv function's signature: spatial dims (None: read from the weight), transposed or not, argument names."""

    ndim: int | None
    transposed: bool | None  # None: read from the call's own ``transposed`` argument
    arg_names: tuple[str, ...]


def _table() -> dict:
    table = {}
    for n in (1, 2, 3):
        plain = ConvCall(n, False, _CONV_ARGS)
        transposed = ConvCall(n, True, _TRANSPOSE_ARGS)
        table[getattr(F, f"conv{n}d")] = plain
        table[getattr(torch, f"conv{n}d")] = plain
        table[getattr(aten, f"conv{n}d").default] = plain
        table[getattr(aten, f"conv{n}d").padding] = plain
        table[getattr(F, f"conv_transpose{n}d")] = transposed
        table[getattr(torch, f"conv_transpose{n}d")] = transposed
    table[aten.conv_transpose1d.default] = ConvCall(1, True, _TRANSPOSE_ARGS)
    table[aten.conv_transpose2d.input] = ConvCall(2, True, _TRANSPOSE_ARGS)
    table[aten.conv_transpose3d.input] = ConvCall(3, True, _TRANSPOSE_ARGS)
    table[aten.convolution.default] = table[torch.convolution] = ConvCall(None, None, _CONVOLUTION_ARGS)
    return table


CONV_CALLS: dict = _table()

_MODULES = {
    (1, False): nn.Conv1d, (2, False): nn.Conv2d, (3, False): nn.Conv3d,
    (1, True): nn.ConvTranspose1d, (2, True): nn.ConvTranspose2d, (3, True): nn.ConvTranspose3d,
}


def lifted_conv(call: ConvCall, weight: torch.Tensor, bias: torch.Tensor | None, values: dict) -> nn.Module | None:
    """The nn.Conv*d / nn.ConvTranspose*d that computes the call, holding ``weight`` and ``bias``; None if none does.

    ``weight`` is (T, S/groups, *k) for a plain conv and (S, T/groups, *k) for a transposed one.
    """
    ndim = weight.dim() - 2
    transposed = bool(values.get("transposed", False)) if call.transposed is None else call.transposed
    if ndim not in (1, 2, 3) or (call.ndim is not None and call.ndim != ndim):
        return None
    groups = int(values.get("groups", 1))
    common = dict(stride=values.get("stride", 1), padding=values.get("padding", 0), dilation=values.get("dilation", 1))
    if transposed:
        if isinstance(common["padding"], str):
            return None
        channels = (weight.shape[0], weight.shape[1] * groups)
        common["output_padding"] = values.get("output_padding", 0)
    else:
        channels = (weight.shape[1] * groups, weight.shape[0])
        if call.transposed is None and any(int(p) for p in _as_tuple(values.get("output_padding", 0))):
            return None
    layer = _MODULES[ndim, transposed](
        *channels, tuple(weight.shape[2:]), groups=groups, bias=bias is not None, device="meta", **common
    )
    layer.weight = nn.Parameter(weight.detach(), requires_grad=weight.requires_grad)  # factors inherit it
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach(), requires_grad=bias.requires_grad)
    return layer


def _as_tuple(value) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)
