"""Truncated SVD: Linear (Fast R-CNN) and the lowered conv matrix (DeepTwist's 2-D SVD).

Linear(S->T)  ->  Linear(S->r, no bias) -> Linear(r->T, bias)
Conv(S->T)    ->  Conv(S->r, kh x kw, stride, padding, dilation) -> Conv 1x1 (r->T, bias)
The conv form holds for Conv1d/2d/3d and ConvTranspose1d/2d/3d (the transposed conv first).
Grouped convs are factorised group by group (r per group). With calibration data
both are data-aware: the whitened SVD (`fxdecomp.calibration.whitened_spectrum`)
minimises the output error on the data instead of the weight error; with output
Gram matrices H too (given as ``output_weights``), it minimises ||H^(1/2) dW G^(1/2)||, the first-order change of
the model's outputs (the SVD of H^(1/2) W G^(1/2); the left factor is mapped back by H^(-1/2)).
"""

from __future__ import annotations

import torch
from torch import nn

from ..calibration import whitened_spectrum
from ..factorize.svd import low_rank_factors, matrix_spectrum
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
class LinearSVD(Decomposer):
    kind, method = "linear", "svd"
    data_aware = True

    def max_ranks(self, spec):
        return (min(spec.in_features, spec.out_features),)

    def structure(self, spec, ranks):
        (r,) = ranks
        return nn.Sequential(nn.Linear(spec.in_features, r, bias=False), nn.Linear(r, spec.out_features, bias=spec.has_bias))

    # state: (the matrix factorised, its spectrum, H^(-1/2) or None); see `two_sided`.

    def factorize(self, spec, weight):
        return weight.detach(), matrix_spectrum(weight), None

    def factorize_whitened(self, spec, weight, grams, output_weights=None):
        matrix, unweight = two_sided(weight, output_weights[0] if output_weights else None)
        return matrix, whitened_spectrum(matrix, grams[0]), unweight

    def error(self, spec, state, ranks):
        return state[1].relative_error(ranks[0])

    def reconstruct(self, spec, state, ranks):
        left, right = factors(state[0], ranks[0], state[1], state[2], torch.float64)
        return left @ right

    def load(self, module, spec, state, ranks):
        left, right = factors(state[0], ranks[0], state[1], state[2], module[0].weight.dtype)
        with torch.no_grad():
            module[0].weight.copy_(right)
            module[1].weight.copy_(left)

    def rank_spectra(self, spec, state):
        return [[state[1]]]


def two_sided(matrix: torch.Tensor, output_weight) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(H^(1/2) W, H^(-1/2)) with an output weight (H^(1/2), H^(-1/2)); (W, None) without one."""
    if output_weight is None:
        return matrix.detach(), None
    sqrt, inv_sqrt = output_weight
    return sqrt @ matrix.detach().to(torch.float64), inv_sqrt


def factors(matrix, rank, spectrum, unweight, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated-SVD factors of the layer's own weight from those of the (output-weighted) matrix."""
    left, right = low_rank_factors(matrix, rank, spectrum, dtype=spectrum.basis.dtype)
    if unweight is not None:
        left = unweight @ left.to(unweight.dtype)
    return left.to(dtype), right.to(dtype)


def lowered(kernel: torch.Tensor) -> torch.Tensor:
    """A canonical kernel (T, S, *k) as the T x (S*prod(k)) matrix of the im2col convolution."""
    return kernel.reshape(kernel.shape[0], -1)


@register
class ConvSVD(Decomposer):
    """Conv (1-3 spatial dims, transposed too): the spec's conv S->r, then a 1x1 conv r->T with the bias.

    For a transposed conv the first stage is the transposed conv (stride, padding,
    output_padding, dilation) and the 1x1 runs on its output: exact, as a 1x1 conv
    commutes with the per-channel spatial operator.
    """

    kind, method = "conv2d", "svd"
    kinds = CONV_KINDS
    data_aware = True

    def max_ranks(self, spec):
        return (min(spec.out_per_group, spec.in_per_group * spec.kernel_area),)

    def structure(self, spec, ranks):
        (r,) = ranks
        pads, padding = leading_pad(spec)
        g = spec.groups
        return nn.Sequential(
            *pads,
            spatial_conv(spec, spec.in_channels, g * r, padding, groups=g),
            pointwise(spec, g * r, spec.out_channels, groups=g, bias=spec.has_bias),
        )

    # state: (kernel blocks, per group: the matrix factorised, its spectrum, H^(-1/2) or None).

    def factorize(self, spec, weight):
        blocks = group_slices(spec, weight)
        return blocks, [(lowered(b), matrix_spectrum(lowered(b)), None) for b in blocks]

    def factorize_whitened(self, spec, weight, grams, output_weights=None):
        blocks = group_slices(spec, weight)
        per_group = []
        for g, (block, gram) in enumerate(zip(blocks, grams)):
            matrix, unweight = two_sided(lowered(block), output_weights[g] if output_weights else None)
            per_group.append((matrix, whitened_spectrum(matrix, gram), unweight))
        return blocks, per_group

    def error(self, spec, state, ranks):
        blocks, per_group = state
        spectra = [spectrum for _, spectrum, _ in per_group]
        # Each group's share of the error is its share of the energy that its spectrum measures.
        norms = [s.total**0.5 for s in spectra]
        return combined_error([s.relative_error(ranks[0]) for s in spectra], norms)

    def reconstruct(self, spec, state, ranks):
        blocks = []
        for block, (matrix, spectrum, unweight) in zip(*state):
            left, right = factors(matrix, ranks[0], spectrum, unweight, torch.float64)
            blocks.append((left @ right).reshape(block.shape))
        return layer_kernel(spec, torch.cat(blocks))

    def load(self, module, spec, state, ranks):
        (r,) = ranks
        first, second = module[-2], module[-1]
        first_kernel, second_kernel = new_kernel(first), new_kernel(second)
        for g, (block, (matrix, spectrum, unweight)) in enumerate(zip(*state)):
            left, right = factors(matrix, r, spectrum, unweight, first.weight.dtype)
            first_kernel[g * r : (g + 1) * r] = right.reshape(r, *block.shape[1:])
            second_kernel[g * spec.out_per_group : (g + 1) * spec.out_per_group] = pointwise_kernel(left, spec.ndim)
        set_kernel(first, first_kernel)
        set_kernel(second, second_kernel)

    def rank_spectra(self, spec, state):
        return [[spectrum for _, spectrum, _ in state[1]]]
