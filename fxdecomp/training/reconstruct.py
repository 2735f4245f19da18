"""Dense equivalents of decomposed layers: the weight a single Conv2d or Linear would need.

Every decomposer builds a module that is linear in its input plus the layer's bias,
with the layer's geometry (pads, stride, dilation, groups). Its dense weight is
therefore its response to impulses, minus its response to zero: this reads the
weight off whatever module the decomposer built (pad layers, channel shuffles and
matmul layers included), so it equals decompose-then-reconstruct for every method.

Example::

    layer = nn.Conv2d(32, 64, 3, padding=1)
    weight, module = low_rank_weight(layer, "tucker2", (8, 16))
    # nn.Conv2d with ``weight`` and layer.bias computes what ``module`` computes
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..decompose import decompose_layer
from ..layer_spec import ConvSpec, LinearSpec, layer_spec

# Impulse batches are cut so that one chunk's input holds at most this many elements.
_CHUNK_ELEMENTS = 1 << 22


def low_rank_weight(layer: nn.Module, method: str, ranks: tuple[int, ...], **options) -> tuple[torch.Tensor, nn.Module]:
    """(dense weight of ``layer`` decomposed with ``method`` at ``ranks``, the decomposed module)."""
    module = decompose_layer(layer, method, tuple(ranks), **options)
    return dense_weight(module, layer_spec(layer)).to(layer.weight.dtype), module


@torch.no_grad()
def dense_weight(module: nn.Module, spec: ConvSpec | LinearSpec) -> torch.Tensor:
    """The weight (Conv2d: (T, S/g, kh, kw); Linear: (T, S)) that ``module`` applies, computed in float64."""
    param = next(module.parameters())
    work = _float64_copy(module, param.device)
    if isinstance(spec, LinearSpec):
        return _linear_weight(work, spec, param.device)
    return _conv_weight(work, spec, param.device)


def _float64_copy(module: nn.Module, device: torch.device) -> nn.Module:
    import copy

    work = copy.deepcopy(module).eval()
    # float64 keeps the impulse response exact to well below float32 rounding (MPS has no float64).
    return work.to(torch.float64) if device.type != "mps" else work.float()


def _linear_weight(module: nn.Module, spec: LinearSpec, device) -> torch.Tensor:
    dtype = next(module.parameters()).dtype
    n = spec.in_features
    offset = module(torch.zeros(1, n, dtype=dtype, device=device))
    step = max(1, _CHUNK_ELEMENTS // n)
    columns = []
    for start in range(0, n, step):
        eye = torch.eye(n, dtype=dtype, device=device)[start : start + step]
        columns.append(module(eye) - offset)
    return torch.cat(columns).T.contiguous()


def _conv_weight(module: nn.Module, spec: ConvSpec, device) -> torch.Tensor:
    left, right, top, bottom = spec.pads
    (kh, kw), (sh, sw), (dh, dw) = spec.kernel_size, spec.stride, spec.dilation
    # Output pixel (p, q) is the first whose window lies entirely inside the input, so
    # the padding (of any mode) never reaches it; its tap (0, 0) reads input (oh, ow).
    p, q = math.ceil(top / sh), math.ceil(left / sw)
    oh, ow = p * sh - top, q * sw - left
    # A margin of the pad size keeps reflect/circular padding valid on the small input.
    height = oh + (kh - 1) * dh + 1 + top + bottom
    width = ow + (kw - 1) * dw + 1 + left + right
    channels, area = spec.in_channels, kh * kw
    dtype = next(module.parameters()).dtype
    offset = module(torch.zeros(1, channels, height, width, dtype=dtype, device=device))[0, :, p, q]
    rows = torch.arange(kh, device=device).repeat_interleave(kw) * dh + oh
    cols = torch.arange(kw, device=device).repeat(kh) * dw + ow
    per_chunk = max(1, _CHUNK_ELEMENTS // (area * channels * height * width))
    responses = []
    for start in range(0, channels, per_chunk):
        chans = torch.arange(start, min(channels, start + per_chunk), device=device)
        batch = len(chans) * area
        x = torch.zeros(batch, channels, height, width, dtype=dtype, device=device)
        x[torch.arange(batch, device=device), chans.repeat_interleave(area), rows.repeat(len(chans)), cols.repeat(len(chans))] = 1
        responses.append(module(x)[:, :, p, q] - offset)  # (batch, T), batch ordered (s, i, j)
    full = torch.cat(responses).reshape(channels, kh, kw, spec.out_channels).permute(3, 0, 1, 2)
    if spec.groups == 1:
        return full.contiguous()
    # Output t of group g reads only input channels of group g: keep that diagonal block.
    g, tg, sg = spec.groups, spec.out_per_group, spec.in_per_group
    blocks = full.reshape(g, tg, g, sg, kh, kw)
    return torch.stack([blocks[i, :, i] for i in range(g)]).reshape(spec.out_channels, sg, kh, kw).contiguous()
