"""Truncated SVD: Linear (Fast R-CNN) and the lowered conv matrix (DeepTwist's 2-D SVD).

Linear(S->T)  ->  Linear(S->r, no bias) -> Linear(r->T, bias)
Conv(S->T)    ->  Conv(S->r, kh x kw, stride, padding, dilation) -> Conv 1x1 (r->T, bias)
Grouped convs are factorised group by group (r per group). With calibration data
both are data-aware: the whitened SVD (`fxdecomp.calibration.whitened_spectrum`)
minimises the output error on the data instead of the weight error.
"""

from __future__ import annotations

import torch
from torch import nn

from ..calibration import whitened_spectrum
from ..factorize.svd import low_rank_factors, matrix_spectrum
from .base import Decomposer, combined_error, conv, group_slices, leading_pad, register


@register
class LinearSVD(Decomposer):
    kind, method = "linear", "svd"
    data_aware = True

    def max_ranks(self, spec):
        return (min(spec.in_features, spec.out_features),)

    def structure(self, spec, ranks):
        (r,) = ranks
        return nn.Sequential(nn.Linear(spec.in_features, r, bias=False), nn.Linear(r, spec.out_features, bias=spec.has_bias))

    def factorize(self, spec, weight):
        return weight.detach(), matrix_spectrum(weight)

    def factorize_whitened(self, spec, weight, grams):
        return weight.detach(), whitened_spectrum(weight, grams[0])

    def error(self, spec, state, ranks):
        return state[1].relative_error(ranks[0])

    def reconstruct(self, spec, state, ranks):
        left, right = low_rank_factors(state[0].double(), ranks[0], state[1])
        return left @ right

    def load(self, module, spec, state, ranks):
        left, right = low_rank_factors(state[0], ranks[0], state[1])
        with torch.no_grad():
            module[0].weight.copy_(right)
            module[1].weight.copy_(left)

    def rank_spectra(self, spec, state):
        return [[state[1]]]


def lowered(kernel: torch.Tensor) -> torch.Tensor:
    """A kernel (T, S, kh, kw) as the T x (S*kh*kw) matrix of the im2col convolution."""
    return kernel.reshape(kernel.shape[0], -1)


@register
class ConvSVD(Decomposer):
    kind, method = "conv2d", "svd"
    data_aware = True

    def max_ranks(self, spec):
        return (min(spec.out_per_group, spec.in_per_group * spec.kernel_area),)

    def structure(self, spec, ranks):
        (r,) = ranks
        pads, padding = leading_pad(spec)
        g = spec.groups
        return nn.Sequential(
            *pads,
            conv(spec.in_channels, g * r, spec.kernel_size, spec.stride, padding, spec.dilation, groups=g),
            conv(g * r, spec.out_channels, groups=g, bias=spec.has_bias),
        )

    def factorize(self, spec, weight):
        blocks = group_slices(spec, weight)
        return blocks, [matrix_spectrum(lowered(b)) for b in blocks]

    def factorize_whitened(self, spec, weight, grams):
        blocks = group_slices(spec, weight)
        return blocks, [whitened_spectrum(lowered(b), g) for b, g in zip(blocks, grams)]

    def error(self, spec, state, ranks):
        blocks, spectra = state
        return combined_error([s.relative_error(ranks[0]) for s in spectra], blocks.norms)

    def reconstruct(self, spec, state, ranks):
        blocks = []
        for block, spectrum in zip(*state):
            left, right = low_rank_factors(lowered(block).double(), ranks[0], spectrum)
            blocks.append((left @ right).reshape(block.shape))
        return torch.cat(blocks)

    def load(self, module, spec, state, ranks):
        (r,) = ranks
        first, second = module[-2], module[-1]
        for g, (block, spectrum) in enumerate(zip(*state)):
            left, right = low_rank_factors(lowered(block), r, spectrum)
            with torch.no_grad():
                first.weight[g * r : (g + 1) * r].copy_(right.reshape(r, *block.shape[1:]))
                second.weight[g * spec.out_per_group : (g + 1) * spec.out_per_group].copy_(left[:, :, None, None])

    def rank_spectra(self, spec, state):
        return [state[1]]
