"""CP decomposition of convs (Lebedev et al. 2015).

1x1 (S->R) -> depthwise kh x 1 -> depthwise 1 x kw -> 1x1 (R->T, bias), with the
factors from `fxdecomp.factorize.cp` (HOSVD-compressed ALS; exact construction at
the maximum rank). Grouped convs are factorised group by group. CP has no
rank-independent factorisation, so results are cached per rank in the state.
"""

from __future__ import annotations

import torch
from torch import nn

from ..factorize.cp import cp_conv_kernel, max_cp_rank
from ..factorize.svd import matrix_spectrum
from .base import Decomposer, combined_error, conv, group_slices, leading_pad, register


@register
class ConvCP(Decomposer):
    kind, method = "conv2d", "cp"
    options = ("max_iter", "tol", "seed", "planning_iters")

    def __init__(self, max_iter: int = 200, tol: float = 1e-6, seed: int = 0, planning_iters: int = 10):
        self.cp_options = dict(max_iter=max_iter, tol=tol, seed=seed)
        self.planning_iters = planning_iters

    def max_ranks(self, spec):
        return (max_cp_rank((spec.out_per_group, spec.in_per_group, *spec.kernel_size)),)

    def planning_max_ranks(self, spec):
        # Exact CP needs rank S*kh*kw, but ALS at ranks beyond the channel counts is slow and
        # rarely worth it: the planner explores ranks up to min(T, S) per group.
        return (min(spec.out_per_group, spec.in_per_group, self.max_ranks(spec)[0]),)

    def structure(self, spec, ranks):
        (r,) = ranks
        pads, (ph, pw) = leading_pad(spec)
        (kh, kw), (sh, sw), (dh, dw), g = spec.kernel_size, spec.stride, spec.dilation, spec.groups
        return nn.Sequential(
            *pads,
            conv(spec.in_channels, g * r, groups=g),
            conv(g * r, g * r, (kh, 1), (sh, 1), (ph, 0), (dh, 1), groups=g * r),
            conv(g * r, g * r, (1, kw), (1, sw), (0, pw), (1, dw), groups=g * r),
            conv(g * r, spec.out_channels, groups=g, bias=spec.has_bias),
        )

    def factorize(self, spec, weight):
        return group_slices(spec, weight), {}

    def _factors(self, state, rank, quick=False):
        blocks, cache = state
        key = (rank, quick)
        if key not in cache:
            options = self.cp_options | {"max_iter": self.planning_iters} if quick else self.cp_options
            cache[key] = [cp_conv_kernel(b, rank, **options) for b in blocks]
        return cache[key]

    def error(self, spec, state, ranks):
        factors = self._factors(state, ranks[0])
        return combined_error([f.relative_error for f in factors], state[0].norms)

    def estimate_error(self, spec, state, ranks):
        # The planner scores many ranks: a few ALS sweeps give an upper bound of the final error
        # (ALS never increases it) at a fraction of the cost (512x512x3x3, rank 256: 1 s vs 4.6 s).
        factors = self._factors(state, ranks[0], quick=True)
        return combined_error([f.relative_error for f in factors], state[0].norms)

    def reconstruct(self, spec, state, ranks):
        return torch.cat([f.reconstruct().double() for f in self._factors(state, ranks[0])])

    def estimate_reconstruct(self, spec, state, ranks):
        return torch.cat([f.reconstruct().double() for f in self._factors(state, ranks[0], quick=True)])

    def load(self, module, spec, state, ranks):
        (r,) = ranks
        first, vertical, horizontal, last = list(module)[-4:]
        tg = spec.out_per_group
        for g, f in enumerate(self._factors(state, r)):
            block = slice(g * r, (g + 1) * r)
            with torch.no_grad():
                first.weight[block].copy_(f.inp.T[:, :, None, None])
                vertical.weight[block].copy_(f.vertical.T[:, None, :, None])
                horizontal.weight[block].copy_(f.horizontal.T[:, None, None, :])
                last.weight[g * tg : (g + 1) * tg].copy_(f.out[:, :, None, None])

    def rank_spectra(self, spec, state):
        blocks = state[0]
        # One rank, estimated from both channel unfoldings (the larger estimate wins).
        unfoldings = [b.reshape(b.shape[0], -1) for b in blocks] + [b.transpose(0, 1).reshape(b.shape[1], -1) for b in blocks]
        return [[matrix_spectrum(u) for u in unfoldings]]
