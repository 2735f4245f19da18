"""Spatial SVD (Jaderberg et al. 2014, scheme 2): a kh x 1 conv then a 1 x kw conv.

W[t, s, i, j] ~ sum_k V[k, s, i] H[t, k, j], the SVD of W as an (S*kh) x (T*kw)
matrix. Stride, dilation and padding split by axis between the two convs.
Grouped convs are factorised group by group. Conv3d (and ConvTranspose2d/3d) split
the same way, the first spatial axis from the rest: (kd x 1 x 1) then (1 x kh x kw).
A Conv1d has one spatial axis, nothing to split: `check` refuses it.

With calibration data (`factorize_whitened`) the factors minimise the output error
||H^(1/2) (W - W_hat) G^(1/2)|| instead of the weight error: the first conv's subspace is the
whitened SVD's under a Kronecker-factored input Gram matrix and the second conv is the exact
weighted least-squares fit given the first (`fxdecomp.factorize.fitted`; data-driven as in
Zhang et al., TPAMI 2015, for the scheme-2 structure of Jaderberg et al. 2014 / Tai et al. 2016).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import UnsupportedLayerError
from ..factorize.fitted import GroupFits, projected_fit
from ..factorize.svd import low_rank_factors, matrix_spectrum
from .base import (
    CONV_KINDS,
    Decomposer,
    combined_error,
    dense_conv_grams,
    group_slices,
    layer_kernel,
    leading_pad,
    new_kernel,
    register,
    set_kernel,
    spatial_conv,
)


def spatial_matrix(kernel: torch.Tensor) -> torch.Tensor:
    """A canonical kernel (T, S, k0, *rest) as the (S*k0) x (T*prod(rest)) matrix that the split factorises."""
    t, s, k0 = kernel.shape[:3]
    rest = kernel.shape[3:]
    return kernel.permute(1, 2, 0, *range(3, kernel.dim())).reshape(s * k0, t * math.prod(rest))


@register
class ConvSpatialSVD(Decomposer):
    kind, method = "conv2d", "spatial_svd"
    kinds = CONV_KINDS
    data_aware = True

    def check(self, spec):
        if spec.ndim == 1:
            raise UnsupportedLayerError(
                f"spatial_svd: a {spec.kind} kernel has one spatial axis, so there is nothing to split; "
                "use svd, tucker2, cp or tt"
            )

    def max_ranks(self, spec):
        k0, rest = spec.kernel_size[0], math.prod(spec.kernel_size[1:])
        return (min(spec.in_per_group * k0, spec.out_per_group * rest),)

    def structure(self, spec, ranks):
        (r,) = ranks
        pads, padding = leading_pad(spec)
        g, rest = spec.groups, range(1, spec.ndim)
        return nn.Sequential(
            *pads,
            spatial_conv(spec, spec.in_channels, g * r, padding, axes=(0,), groups=g),
            spatial_conv(spec, g * r, spec.out_channels, padding, axes=rest, groups=g, bias=spec.has_bias),
        )

    def factorize(self, spec, weight):
        blocks = group_slices(spec, weight)
        return blocks, [matrix_spectrum(spatial_matrix(b)) for b in blocks]

    def can_fit(self, spec, grams):
        return dense_conv_grams(spec, grams)

    def factorize_whitened(self, spec, weight, grams, output_weights=None):
        blocks = group_slices(spec, weight)
        channels = spec.in_per_group * spec.kernel_size[0]
        fits = [
            projected_fit(b.reshape(b.shape[0], -1), gram, output_weights[g] if output_weights else None, channels)
            for g, (b, gram) in enumerate(zip(blocks, grams))
        ]
        return GroupFits(blocks, fits)

    def error(self, spec, state, ranks):
        if isinstance(state, GroupFits):
            return state.relative_error(ranks[0])
        blocks, spectra = state
        return combined_error([s.relative_error(ranks[0]) for s in spectra], blocks.norms)

    def reconstruct(self, spec, state, ranks):
        if isinstance(state, GroupFits):
            return layer_kernel(spec, state.reconstruct(ranks[0]))
        blocks = []
        for block, spectrum in zip(*state):
            t, s, k0, *rest = block.shape
            left, right = low_rank_factors(spatial_matrix(block).double(), ranks[0], spectrum)
            blocks.append((left @ right).reshape(s, k0, t, *rest).permute(2, 0, 1, *range(3, block.dim())))
        return layer_kernel(spec, torch.cat(blocks))

    def load(self, module, spec, state, ranks):
        (r,) = ranks
        first, second = module[-2], module[-1]
        first_kernel, second_kernel = new_kernel(first), new_kernel(second)
        tg, ones = spec.out_per_group, [1] * (spec.ndim - 1)
        if isinstance(state, GroupFits):
            for g, (block, (projection, fit, _)) in enumerate(zip(state.blocks, state.factors(r))):
                t, s, k0, *rest = block.shape
                first_kernel[g * r : (g + 1) * r] = projection.reshape(r, s, k0, *ones)
                second_kernel[g * tg : (g + 1) * tg] = fit.reshape(t, r, 1, *rest)
            set_kernel(first, first_kernel)
            set_kernel(second, second_kernel)
            return
        for g, (block, spectrum) in enumerate(zip(*state)):
            t, s, k0, *rest = block.shape
            left, right = low_rank_factors(spatial_matrix(block), r, spectrum)
            # left[(s, i), k] -> first[k, s, i, 1...]; right[k, (t, rest)] -> second[t, k, 1, rest]
            first_kernel[g * r : (g + 1) * r] = left.T.reshape(r, s, k0, *ones)
            second_kernel[g * tg : (g + 1) * tg] = right.reshape(r, t, 1, *rest).transpose(0, 1)
        set_kernel(first, first_kernel)
        set_kernel(second, second_kernel)

    def rank_spectra(self, spec, state):
        if isinstance(state, GroupFits):
            return [[f.in_spectrum for f in state.fits]]
        return [state[1]]
