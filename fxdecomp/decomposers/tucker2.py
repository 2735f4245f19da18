"""Tucker-2 (Kim et al. 2016): 1x1 (S->r_in), core kh x kw (r_in->r_out), 1x1 (r_out->T).

Ranks are (r_in, r_out), input side first; grouped convs are factorised group by
group (each group gets r_in and r_out channels). The same structure holds for
Conv1d/3d (1x1x1 convs around the core) and for transposed convs (the core is the
transposed conv; the 1x1 convs mix channels on either side of it).

With calibration data (`factorize_whitened`) the factors minimise the output error
||H^(1/2) (W - W_hat) G^(1/2)|| instead of the weight error: the input 1x1 conv's subspace is
the whitened SVD's of the input-channel unfolding under a Kronecker-factored Gram matrix,
and the core and output factor are the exact two-sided whitened fit given it (a closed-form
HOOI step in the data's metric; `fxdecomp.factorize.fitted`, after Zhang et al., TPAMI 2015).
"""

from __future__ import annotations

import torch
from torch import nn

from ..factorize.fitted import GroupFits, projected_fit
from ..factorize.tucker import tucker2_hosvd
from .base import (
    CONV_KINDS,
    Decomposer,
    combined_error,
    dense_conv_grams,
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
    data_aware = True

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

    def can_fit(self, spec, grams):
        return dense_conv_grams(spec, grams)

    def factorize_whitened(self, spec, weight, grams, output_weights=None):
        blocks = group_slices(spec, weight)
        fits = [
            projected_fit(b.reshape(b.shape[0], -1), gram, output_weights[g] if output_weights else None, spec.in_per_group)
            for g, (b, gram) in enumerate(zip(blocks, grams))
        ]
        return GroupFits(blocks, fits)

    def error(self, spec, state, ranks):
        if isinstance(state, GroupFits):
            return state.relative_error(*ranks)
        blocks, tuckers = state
        return combined_error([t.relative_error(*ranks) for t in tuckers], blocks.norms)

    def reconstruct(self, spec, state, ranks):
        if isinstance(state, GroupFits):
            return layer_kernel(spec, state.reconstruct(*ranks))
        blocks = [torch.einsum("ta,ab...,sb->ts...", u_out, core, u_in) for core, u_in, u_out in (t.factors(*ranks) for t in state[1])]
        return layer_kernel(spec, torch.cat(blocks))

    def load(self, module, spec, state, ranks):
        r_in, r_out = ranks
        first_layer, core_conv, last_layer = module[-3], module[-2], module[-1]
        kernels = [new_kernel(layer) for layer in (first_layer, core_conv, last_layer)]
        tg = spec.out_per_group
        if isinstance(state, GroupFits):
            for g, (first, core, last) in enumerate(state.factors(r_in, r_out)):
                kernels[0][g * r_in : (g + 1) * r_in] = pointwise_kernel(first, spec.ndim)
                kernels[1][g * r_out : (g + 1) * r_out] = core.reshape(r_out, r_in, *spec.kernel_size)
                kernels[2][g * tg : (g + 1) * tg] = pointwise_kernel(last, spec.ndim)
            for layer, kernel in zip((first_layer, core_conv, last_layer), kernels):
                set_kernel(layer, kernel)
            return
        for g, tucker in enumerate(state[1]):
            core, u_in, u_out = tucker.factors(r_in, r_out)
            kernels[0][g * r_in : (g + 1) * r_in] = pointwise_kernel(u_in.T, spec.ndim)
            kernels[1][g * r_out : (g + 1) * r_out] = core
            kernels[2][g * tg : (g + 1) * tg] = pointwise_kernel(u_out, spec.ndim)
        for layer, kernel in zip((first_layer, core_conv, last_layer), kernels):
            set_kernel(layer, kernel)

    def rank_spectra(self, spec, state):
        if isinstance(state, GroupFits):
            return [[f.in_spectrum for f in state.fits], [f.out_spectrum() for f in state.fits]]
        tuckers = state[1]
        return [[t.in_spectrum for t in tuckers], [t.out_spectrum for t in tuckers]]
