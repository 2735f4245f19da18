"""CP decomposition of convs (Lebedev et al. 2015).

1x1 (S->R) -> depthwise kh x 1 -> depthwise 1 x kw -> 1x1 (R->T, bias), with the
factors from `fxdecomp.factorize.cp` (HOSVD-compressed ALS; exact construction at
the maximum rank). Grouped convs are factorised group by group. CP has no
rank-independent factorisation, so results are cached per rank in the state.

Other conv kinds use the same 4-way CP on a view of the kernel: a 1-d kernel as
(T, S, 1, k) (one depthwise conv of k taps), a 3-d one as (T, S, kd, kh*kw) (a
depthwise kd x 1 x 1 conv, then a depthwise 1 x kh x kw one; the (kh, kw) taps are
not split further). Transposed convs get transposed depthwise convs.

With calibration data (`factorize_whitened`) every rank's factors are fitted to the data
(`fxdecomp.factorize.fitted_cp.fitted_cp`: ALS on the kernel whitened mode by mode with the
Kronecker factors of the input Gram matrix and the output one, then the output factor
refitted by exact weighted least squares), and the errors are relative output errors.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..factorize.cp import cp_conv_kernel, max_cp_rank
from ..factorize.fitted_cp import fitted_cp
from ..factorize.svd import matrix_spectrum
from .base import (
    CONV_KINDS,
    Blocks,
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


def cp_shape(spec) -> tuple[int, int, int, int]:
    """The 4-way (T/g, S/g, a, b) view CP factorises: (1, k) for 1-d kernels, (kd, kh*kw) for 3-d ones."""
    k = spec.kernel_size
    a, b = (1, k[0]) if spec.ndim == 1 else (k[0], math.prod(k[1:]))
    return spec.out_per_group, spec.in_per_group, a, b


@register
class ConvCP(Decomposer):
    kind, method = "conv2d", "cp"
    kinds = CONV_KINDS
    options = ("max_iter", "tol", "seed", "planning_iters")
    data_aware = True

    def __init__(self, max_iter: int = 200, tol: float = 1e-6, seed: int = 0, planning_iters: int = 10):
        self.cp_options = dict(max_iter=max_iter, tol=tol, seed=seed)
        self.planning_iters = planning_iters

    def max_ranks(self, spec):
        return (max_cp_rank(cp_shape(spec)),)

    def planning_max_ranks(self, spec):
        # Exact CP needs rank S*kh*kw, but ALS at ranks beyond the channel counts is slow and
        # rarely worth it: the planner explores ranks up to min(T, S) per group.
        return (min(spec.out_per_group, spec.in_per_group, self.max_ranks(spec)[0]),)

    def structure(self, spec, ranks):
        (r,) = ranks
        pads, padding = leading_pad(spec)
        g = spec.groups
        depthwise = [range(spec.ndim)] if spec.ndim == 1 else [(0,), range(1, spec.ndim)]
        return nn.Sequential(
            *pads,
            pointwise(spec, spec.in_channels, g * r, groups=g),
            *(spatial_conv(spec, g * r, g * r, padding, axes=axes, groups=g * r) for axes in depthwise),
            pointwise(spec, g * r, spec.out_channels, groups=g, bias=spec.has_bias),
        )

    def factorize(self, spec, weight):
        blocks = group_slices(spec, weight)
        return Blocks(b.reshape(cp_shape(spec)) for b in blocks), {}

    # A fitted state adds, per group, (input Gram matrix, output weight or None) and the group's
    # output energy ||H^(1/2) W G^(1/2)||: errors are then relative output errors.

    def can_fit(self, spec, grams):
        return dense_conv_grams(spec, grams)

    def factorize_whitened(self, spec, weight, grams, output_weights=None):
        blocks, cache = self.factorize(spec, weight)
        data = [(gram, output_weights[g] if output_weights else None) for g, gram in enumerate(grams)]
        norms = [output_norm(b, gram, weight_pair) for b, (gram, weight_pair) in zip(blocks, data)]
        return blocks, cache, (data, norms)

    def _factors(self, state, rank, quick=False):
        blocks, cache = state[:2]
        key = (rank, quick)
        if key not in cache:
            options = self.cp_options | {"max_iter": self.planning_iters} if quick else self.cp_options
            if len(state) > 2:
                cache[key] = [fitted_cp(b, rank, gram, pair, **options) for b, (gram, pair) in zip(blocks, state[2][0])]
            else:
                cache[key] = [cp_conv_kernel(b, rank, **options) for b in blocks]
        return cache[key]

    @staticmethod
    def _norms(state):
        return state[2][1] if len(state) > 2 else state[0].norms

    def error(self, spec, state, ranks):
        factors = self._factors(state, ranks[0])
        return combined_error([f.relative_error for f in factors], self._norms(state))

    def estimate_error(self, spec, state, ranks):
        # The planner scores many ranks: a few ALS sweeps give an upper bound of the final error
        # (ALS never increases it) at a fraction of the cost (512x512x3x3, rank 256: 1 s vs 4.6 s).
        # Fitted to data, the sweeps minimise the Kronecker-whitened error, so the estimate is the
        # output error of those quicker factors (close to the final one, not a bound).
        factors = self._factors(state, ranks[0], quick=True)
        return combined_error([f.relative_error for f in factors], self._norms(state))

    def _dense(self, spec, factors):
        blocks = [f.reconstruct().double().reshape(spec.out_per_group, spec.in_per_group, *spec.kernel_size) for f in factors]
        return layer_kernel(spec, torch.cat(blocks))

    def reconstruct(self, spec, state, ranks):
        return self._dense(spec, self._factors(state, ranks[0]))

    def estimate_reconstruct(self, spec, state, ranks):
        return self._dense(spec, self._factors(state, ranks[0], quick=True))

    def load(self, module, spec, state, ranks):
        (r,) = ranks
        layers = list(module)[-4:] if spec.ndim > 1 else list(module)[-3:]
        kernels = [new_kernel(layer) for layer in layers]
        tg, k = spec.out_per_group, spec.kernel_size
        for g, f in enumerate(self._factors(state, r)):
            block = slice(g * r, (g + 1) * r)
            kernels[0][block] = pointwise_kernel(f.inp.T, spec.ndim)
            if spec.ndim == 1:  # the (1, R) vertical factor is a scale: fold it into the taps
                kernels[1][block] = (f.horizontal * f.vertical[0]).T.reshape(r, 1, *k)
            else:
                kernels[1][block] = f.vertical.T.reshape(r, 1, k[0], *[1] * (spec.ndim - 1))
                kernels[2][block] = f.horizontal.T.reshape(r, 1, 1, *k[1:])
            kernels[-1][g * tg : (g + 1) * tg] = pointwise_kernel(f.out, spec.ndim)
        for layer, kernel in zip(layers, kernels):
            set_kernel(layer, kernel)

    def rank_spectra(self, spec, state):
        blocks = state[0]
        # One rank, estimated from both channel unfoldings (the larger estimate wins).
        unfoldings = [b.reshape(b.shape[0], -1) for b in blocks] + [b.transpose(0, 1).reshape(b.shape[1], -1) for b in blocks]
        return [[matrix_spectrum(u) for u in unfoldings]]


def output_norm(block: torch.Tensor, gram: torch.Tensor, output_weight) -> float:
    """||H^(1/2) W G^(1/2)||_F of one group's kernel (T, S, ...) with its input Gram matrix G (and output weight)."""
    w = block.detach().reshape(block.shape[0], -1).to(torch.float64)
    if output_weight is not None:
        w = (output_weight[0] @ w).to(torch.float64)
    return max(float(((w @ gram.to(torch.float64)) * w).sum()), 0.0) ** 0.5
