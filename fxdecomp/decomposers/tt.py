"""Tensor-train decompositions of convs and Linear layers (TT-SVD).

Conv: the kernel as the 4-way tensor (S, kh, kw, T), a TT of four cores realised
as a chain of convs: 1x1 (S->r1), kh x 1 (r1->r2), 1 x kw (r2->r3), 1x1 (r3->T).
Conv1d and Conv3d get one conv per spatial axis (2 and 4 bonds); transposed convs
get transposed convs on their axes. Grouped convs: every conv of the chain is grouped
like the layer, each group its own TT at the same bonds. With calibration data the
conv's output core is refitted to the data (`ConvTT`).
Linear: `fxdecomp.decomposers.tt_linear`. Ranks are the bonds, input side first.
The error reported is the TT-SVD bound sqrt(sum eps_k^2) of Oseledets (2011).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import nn

from ..calibration import OutputErrorMeter, output_whitening
from ..factorize.svd import Spectrum, matrix_spectrum
from ..factorize.tiles import refit_last_factor, relative_output_error
from ..factorize.tt import tt_error_bound, tt_max_ranks, tt_reconstruct, tt_svd
from ..sketch import LowRankPSD
from .base import (
    CONV_KINDS,
    Blocks,
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


def _conv_tensor(canonical: torch.Tensor) -> torch.Tensor:
    """A canonical kernel block (T/g, S/g, *k) as (S/g, k_1, ..., k_n, T/g): the order the input meets the modes."""
    return canonical.permute(1, *range(2, canonical.dim()), 0)


def _unfoldings(tensor: torch.Tensor) -> list[torch.Tensor]:
    shape = tensor.shape
    return [tensor.reshape(math.prod(shape[: k + 1]), -1) for k in range(len(shape) - 1)]


@dataclass(frozen=True, eq=False)
class ConvTTState:
    """Per group: the kernel as (S/g, *k, T/g) and its unfoldings' spectra; with calibration data, the refit's inputs."""

    tensors: list[torch.Tensor]
    spectra: list[list[Spectrum]]  # per group, one per bond
    groups: Blocks  # the lowered weight per group (T/g, S/g*area)
    fit: list[tuple] | None = None  # per group: (G, W G, channel whitening, H or None)
    meter: OutputErrorMeter | None = None  # output errors on a sketched Gram matrix (no fit)


@register
class ConvTT(Decomposer):
    """TT of a conv kernel: 1x1 (S->r1), one conv per spatial axis, 1x1 (->T); n+1 bonds for n axes.

    A grouped conv is decomposed group by group: every conv of the chain has the layer's groups
    and each group holds its own TT at the same bonds (r per group). With calibration data the
    first core (the input 1x1) is the plain or the input channels' whitened truncation (`tt_svd`'s
    ``first_weight``: the channels' Gram matrix, summed over kernel positions), whichever scores
    lower, and the last core (the output 1x1) is refitted by least squares, L = W G M^T (M G M^T)^+
    with M the product of the other cores: the output error tr(H dW G dW^T) is then the least these
    cores allow (for any output Gram H, see `fxdecomp.factorize.tiles.refit_last_factor`), and never
    above the weight-only cores'.
    """

    kind, method = "conv2d", "tt"
    kinds = CONV_KINDS
    data_aware = True

    def max_ranks(self, spec):
        return tt_max_ranks((spec.in_per_group, *spec.kernel_size, spec.out_per_group))

    def structure(self, spec, ranks):
        pads, padding = leading_pad(spec)
        g = spec.groups
        bonds = (spec.in_channels, *(g * r for r in ranks))
        return nn.Sequential(
            *pads,
            pointwise(spec, spec.in_channels, bonds[1], groups=g),
            *(spatial_conv(spec, bonds[i + 1], bonds[i + 2], padding, axes=(i,), groups=g) for i in range(spec.ndim)),
            pointwise(spec, bonds[-1], spec.out_channels, groups=g, bias=spec.has_bias),
        )

    def factorize(self, spec, weight):
        blocks = group_slices(spec, weight)
        tensors = [_conv_tensor(block) for block in blocks]
        groups = Blocks(block.reshape(block.shape[0], -1) for block in blocks)
        return ConvTTState(tensors, [[matrix_spectrum(u) for u in _unfoldings(t)] for t in tensors], groups)

    def factorize_whitened(self, spec, weight, grams, output_weights=None):
        state = self.factorize(spec, weight)
        if any(isinstance(g, LowRankPSD) for g in grams):  # sketched: no dense G to solve with
            output_sqrt = [w[0] for w in output_weights] if output_weights else None
            return replace(state, meter=OutputErrorMeter(list(grams), state.groups, output_sqrt=output_sqrt))
        fit = []
        for g, (gram, w) in enumerate(zip(grams, state.groups)):
            gram = gram.to(torch.float64)
            # The input channels' own Gram matrix (summed over kernel positions) weights the first core.
            channels = gram.reshape(spec.in_per_group, spec.kernel_area, spec.in_per_group, spec.kernel_area)
            output = output_weights[g][0] @ output_weights[g][0] if output_weights else None
            fit.append((gram, w.to(torch.float64) @ gram, output_whitening(channels.diagonal(dim1=1, dim2=3).sum(-1)), output))
        return replace(state, fit=fit)

    def _cores(self, state: ConvTTState, ranks) -> list[list[torch.Tensor]]:
        return self._fitted(state, ranks)[0]

    def _fitted(self, state: ConvTTState, ranks):
        """(per group: (1,S/g,r1) (r1,k_1,r2) ... (r_{n+1},T/g,1), per group W_hat G or None without data)."""
        per_group, approximation_grams = [], []
        for g, tensor in enumerate(state.tensors):
            if state.fit is None:
                per_group.append(tt_svd(tensor, ranks))
                continue
            gram, weight_gram, channel_weight, output = state.fit[g]
            candidates = []
            for first_weight in (None, channel_weight):  # the plain and the channel-whitened first truncation
                cores = tt_svd(tensor, ranks, first_weight)
                head = tt_reconstruct([*cores[:-1], torch.eye(ranks[-1], dtype=torch.float64)[:, :, None]])  # (S/g, *k, r)
                left, approximation_gram = refit_last_factor(weight_gram, gram, head.reshape(-1, ranks[-1]).T)  # (T/g, r)
                cores[-1] = left.T[:, :, None]
                error = relative_output_error([state.groups[g]], [weight_gram], [_lowered(cores)], [approximation_gram], [output])
                candidates.append((error, cores, approximation_gram))
            _, cores, approximation_gram = min(candidates, key=lambda c: c[0])  # never worse than the weight-only cores
            per_group.append(cores)
            approximation_grams.append(approximation_gram)
        return per_group, (approximation_grams if state.fit is not None else None)

    def error(self, spec, state, ranks):
        """Weight-only: the TT-SVD bound per group; with data: the exact output error tr(H dW G dW^T), relative."""
        if state.fit is not None:
            per_group, approximation_grams = self._fitted(state, ranks)
            approximations = [_lowered(cores) for cores in per_group]
            _, weight_grams, _, outputs = zip(*state.fit)
            return relative_output_error(state.groups, weight_grams, approximations, approximation_grams, outputs)
        if state.meter is not None:
            return state.meter.relative_error(state.groups, self._dense(spec, state, ranks))
        return combined_error([tt_error_bound(s, ranks) for s in state.spectra], state.groups.norms)

    def _dense(self, spec, state, ranks) -> list[torch.Tensor]:
        """The lowered (T/g, S/g*area) matrix of each group at ``ranks``."""
        return [_lowered(cores) for cores in self._cores(state, ranks)]

    def reconstruct(self, spec, state, ranks):
        canonical = torch.cat(self._dense(spec, state, ranks)).reshape(spec.out_channels, spec.in_per_group, *spec.kernel_size)
        return layer_kernel(spec, canonical)

    def load(self, module, spec, state, ranks):
        layers = list(module)[-(spec.ndim + 2) :]
        kernels = [new_kernel(layer) for layer in layers]
        for g, cores in enumerate(self._cores(state, ranks)):
            # cores: (1,S/g,r1) (r1,k_1,r2) ... (r_n,k_n,r_{n+1}) (r_{n+1},T/g,1); group g's block of each kernel.
            first = pointwise_kernel(cores[0][0].T, spec.ndim)
            kernels[0][g * first.shape[0] : (g + 1) * first.shape[0]] = first
            for axis, core in enumerate(cores[1:-1]):
                shape = [1] * spec.ndim
                shape[axis] = core.shape[1]
                block = core.permute(2, 0, 1).reshape(core.shape[2], core.shape[0], *shape)
                kernels[axis + 1][g * block.shape[0] : (g + 1) * block.shape[0]] = block
            last = pointwise_kernel(cores[-1][..., 0].T, spec.ndim)
            kernels[-1][g * last.shape[0] : (g + 1) * last.shape[0]] = last
        for layer, kernel in zip(layers, kernels):
            set_kernel(layer, kernel)

    def rank_spectra(self, spec, state):
        return [list(bond) for bond in zip(*state.spectra)]


def _lowered(cores: list[torch.Tensor]) -> torch.Tensor:
    """The (T/g, S/g*area) matrix of one group's cores."""
    dense = tt_reconstruct(cores)  # (S/g, *k, T/g)
    return dense.reshape(-1, dense.shape[-1]).T
