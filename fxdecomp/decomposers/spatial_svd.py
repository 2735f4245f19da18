"""Spatial SVD (Jaderberg et al. 2014, scheme 2): a kh x 1 conv then a 1 x kw conv.

W[t, s, i, j] ~ sum_k V[k, s, i] H[t, k, j], the SVD of W as an (S*kh) x (T*kw)
matrix. Stride, dilation and padding split by axis between the two convs.
Grouped convs are factorised group by group.
"""

from __future__ import annotations

import torch
from torch import nn

from ..factorize.svd import low_rank_factors, matrix_spectrum
from .base import Decomposer, combined_error, conv, group_slices, leading_pad, register


def spatial_matrix(kernel: torch.Tensor) -> torch.Tensor:
    t, s, kh, kw = kernel.shape
    return kernel.permute(1, 2, 0, 3).reshape(s * kh, t * kw)


@register
class ConvSpatialSVD(Decomposer):
    kind, method = "conv2d", "spatial_svd"

    def max_ranks(self, spec):
        kh, kw = spec.kernel_size
        return (min(spec.in_per_group * kh, spec.out_per_group * kw),)

    def structure(self, spec, ranks):
        (r,) = ranks
        pads, (ph, pw) = leading_pad(spec)
        (kh, kw), (sh, sw), (dh, dw), g = spec.kernel_size, spec.stride, spec.dilation, spec.groups
        return nn.Sequential(
            *pads,
            conv(spec.in_channels, g * r, (kh, 1), (sh, 1), (ph, 0), (dh, 1), groups=g),
            conv(g * r, spec.out_channels, (1, kw), (1, sw), (0, pw), (1, dw), groups=g, bias=spec.has_bias),
        )

    def factorize(self, spec, weight):
        blocks = group_slices(spec, weight)
        return blocks, [matrix_spectrum(spatial_matrix(b)) for b in blocks]

    def error(self, spec, state, ranks):
        blocks, spectra = state
        return combined_error([s.relative_error(ranks[0]) for s in spectra], blocks.norms)

    def reconstruct(self, spec, state, ranks):
        blocks = []
        for block, spectrum in zip(*state):
            t, s, kh, kw = block.shape
            left, right = low_rank_factors(spatial_matrix(block).double(), ranks[0], spectrum)
            blocks.append((left @ right).reshape(s, kh, t, kw).permute(2, 0, 1, 3))
        return torch.cat(blocks)

    def load(self, module, spec, state, ranks):
        (r,) = ranks
        vertical, horizontal = module[-2], module[-1]
        tg = spec.out_per_group
        for g, (block, spectrum) in enumerate(zip(*state)):
            t, s, kh, kw = block.shape
            left, right = low_rank_factors(spatial_matrix(block), r, spectrum)
            with torch.no_grad():
                # left[(s, i), k] -> vertical[k, s, i, 0]; right[k, (t, j)] -> horizontal[t, k, 0, j]
                vertical.weight[g * r : (g + 1) * r].copy_(left.T.reshape(r, s, kh, 1))
                horizontal.weight[g * tg : (g + 1) * tg].copy_(right.reshape(r, t, 1, kw).transpose(0, 1))

    def rank_spectra(self, spec, state):
        return [state[1]]
