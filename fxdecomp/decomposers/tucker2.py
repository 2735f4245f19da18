"""Tucker-2 (Kim et al. 2016): 1x1 (S->r_in), core kh x kw (r_in->r_out), 1x1 (r_out->T).

Ranks are (r_in, r_out), input side first; grouped convs are factorised group by
group (each group gets r_in and r_out channels). The same structure holds for
Conv1d/3d (1x1x1 convs around the core) and for transposed convs (the core is the
transposed conv; the 1x1 convs mix channels on either side of it).
"""

from __future__ import annotations

import torch
from torch import nn

from ..factorize.tucker import tucker2_hosvd
from .base import (
    CONV_KINDS,
    Decomposer,
    combined_error,
    group_slices,
    layer_kernel,
    leading_pad,
    new_kernel,
    pointwise,
    pointwise_kernel,
    register,
    set_kernel,
    spatial_conv,
)


@register
class ConvTucker2(Decomposer):
    kind, method = "conv2d", "tucker2"
    kinds = CONV_KINDS

    def max_ranks(self, spec):
        return (spec.in_per_group, spec.out_per_group)

    def structure(self, spec, ranks):
        r_in, r_out = ranks
        pads, padding = leading_pad(spec)
        g = spec.groups
        return nn.Sequential(
            *pads,
            pointwise(spec, spec.in_channels, g * r_in, groups=g),
            spatial_conv(spec, g * r_in, g * r_out, padding, groups=g),
            pointwise(spec, g * r_out, spec.out_channels, groups=g, bias=spec.has_bias),
        )

    def factorize(self, spec, weight):
        blocks = group_slices(spec, weight)
        return blocks, [tucker2_hosvd(b) for b in blocks]

    def error(self, spec, state, ranks):
        blocks, tuckers = state
        return combined_error([t.relative_error(*ranks) for t in tuckers], blocks.norms)

    def reconstruct(self, spec, state, ranks):
        blocks = [torch.einsum("ta,ab...,sb->ts...", u_out, core, u_in) for core, u_in, u_out in (t.factors(*ranks) for t in state[1])]
        return layer_kernel(spec, torch.cat(blocks))

    def load(self, module, spec, state, ranks):
        r_in, r_out = ranks
        first, core_conv, last = module[-3], module[-2], module[-1]
        kernels = [new_kernel(layer) for layer in (first, core_conv, last)]
        tg = spec.out_per_group
        for g, tucker in enumerate(state[1]):
            core, u_in, u_out = tucker.factors(r_in, r_out)
            kernels[0][g * r_in : (g + 1) * r_in] = pointwise_kernel(u_in.T, spec.ndim)
            kernels[1][g * r_out : (g + 1) * r_out] = core
            kernels[2][g * tg : (g + 1) * tg] = pointwise_kernel(u_out, spec.ndim)
        for layer, kernel in zip((first, core_conv, last), kernels):
            set_kernel(layer, kernel)

    def rank_spectra(self, spec, state):
        tuckers = state[1]
        return [[t.in_spectrum for t in tuckers], [t.out_spectrum for t in tuckers]]
