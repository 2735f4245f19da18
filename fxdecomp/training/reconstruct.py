"""Dense equivalents of decomposed layers: the weight a single Conv2d or Linear would need.

`low_rank` factorises a layer and composes the factors back in closed form
(`Decomposer.reconstruct`, float64); its ``build`` gives the decomposed module
made from the very same factors. `dense_weight` reads the weight off any built
module instead: every decomposer builds a module that is linear in its input plus
a bias, with the layer's geometry (pads, stride, dilation, groups), so its dense
weight is its response to impulses minus its response to zero.

Example::

    layer = nn.Conv2d(32, 64, 3, padding=1)
    approx = low_rank(layer, "tucker2", (8, 16))
    approx.weight                      # (64, 32, 3, 3): nn.Conv2d with it computes what approx.build() computes
    dense_weight(approx.build(), layer_spec(layer))   # the same weight, read off the module
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..decompose import factorize_layer
from ..decomposers import Decomposer
from ..layer_spec import ConvSpec, LinearSpec
from ..ranks import RankSpec

# Impulse batches are cut so that one chunk's input holds at most this many elements.
_CHUNK_ELEMENTS = 1 << 22


@dataclass
class LowRank:
    """One layer's factorisation at given ranks: its dense weight, and the module of the same factors."""

    weight: torch.Tensor  # the layer's shape, dtype and device
    decomposer: Decomposer
    spec: ConvSpec | LinearSpec
    state: Any
    ranks: tuple[int, ...]

    def build(self, bias: torch.Tensor | None = None) -> nn.Module:
        """The decomposed module whose factors compose to ``weight`` (bias on its last layer)."""
        module = self.decomposer.build(self.spec, self.state, self.ranks, bias, self.weight)
        module.fxdecomp_method, module.fxdecomp_ranks = self.decomposer.method, self.ranks
        return module


@torch.no_grad()
def low_rank(layer: nn.Module, method: str, ranks: RankSpec, **options: Any) -> LowRank:
    """Factorise ``layer``'s current weight with ``method`` at ``ranks`` (as `fxdecomp.decompose_layer` does)."""
    spec, decomposer, state, chosen = factorize_layer(layer, method, ranks, **options)
    weight = layer.weight.detach()
    dense = decomposer.reconstruct(spec, state, chosen).to(dtype=weight.dtype, device=weight.device)
    return LowRank(dense, decomposer, spec, state, chosen)


@torch.no_grad()
def dense_weight(module: nn.Module, spec: ConvSpec | LinearSpec) -> torch.Tensor:
    """The weight (Conv2d: (T, S/g, kh, kw); Linear: (T, S)) that ``module`` applies, computed in float64."""
    param = next(module.parameters())
    work = _float64_copy(module, param.device)
    if isinstance(spec, LinearSpec):
        return _linear_weight(work, spec, param.device)
    return _conv_weight(work, spec, param.device)


def _float64_copy(module: nn.Module, device: torch.device) -> nn.Module:
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
