"""Tensor-train decompositions of convs and Linear layers (TT-SVD).

Conv: the kernel as the 4-way tensor (S, kh, kw, T), a TT of four cores realised
as a chain of convs: 1x1 (S->r1), kh x 1 (r1->r2), 1 x kw (r2->r3), 1x1 (r3->T).
Conv1d and Conv3d get one conv per spatial axis (2 and 4 bonds); transposed convs
get transposed convs on their axes.
Linear: a TT-matrix over factorisations of in/out features (Novikov et al. 2015),
realised by `fxdecomp.layers.TTLinear`. Ranks are the bonds, input side first.
The error reported is the TT-SVD bound sqrt(sum eps_k^2) of Oseledets (2011).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from ..errors import InvalidInputError
from ..factorize.svd import matrix_spectrum
from ..factorize.tt import tt_error_bound, tt_max_ranks, tt_reconstruct, tt_svd
from ..layers import TTLinear
from .base import (
    CONV_KINDS,
    Decomposer,
    canonical_kernel,
    layer_kernel,
    leading_pad,
    pointwise,
    pointwise_kernel,
    refuse_groups,
    register,
    set_kernel,
    spatial_conv,
)


def _conv_tensor(spec, kernel: torch.Tensor) -> torch.Tensor:
    """(S, k_1, ..., k_n, T): the order the input meets the modes."""
    canonical = canonical_kernel(spec, kernel.detach())
    return canonical.permute(1, *range(2, canonical.dim()), 0)


def _unfoldings(tensor: torch.Tensor) -> list[torch.Tensor]:
    shape = tensor.shape
    return [tensor.reshape(math.prod(shape[: k + 1]), -1) for k in range(len(shape) - 1)]


@register
class ConvTT(Decomposer):
    """TT of a conv kernel: 1x1 (S->r1), one conv per spatial axis, 1x1 (->T); n+1 bonds for n axes."""

    kind, method = "conv2d", "tt"
    kinds = CONV_KINDS

    def check(self, spec):
        refuse_groups(spec, "tt")

    def max_ranks(self, spec):
        return tt_max_ranks((spec.in_channels, *spec.kernel_size, spec.out_channels))

    def structure(self, spec, ranks):
        pads, padding = leading_pad(spec)
        bonds = (spec.in_channels, *ranks)
        return nn.Sequential(
            *pads,
            pointwise(spec, spec.in_channels, ranks[0]),
            *(spatial_conv(spec, bonds[i + 1], bonds[i + 2], padding, axes=(i,)) for i in range(spec.ndim)),
            pointwise(spec, ranks[-1], spec.out_channels, bias=spec.has_bias),
        )

    def factorize(self, spec, weight):
        tensor = _conv_tensor(spec, weight)
        return tensor, [matrix_spectrum(u) for u in _unfoldings(tensor)]

    def error(self, spec, state, ranks):
        return tt_error_bound(state[1], ranks)

    def reconstruct(self, spec, state, ranks):
        dense = tt_reconstruct(tt_svd(state[0], ranks))  # (S, *k, T)
        return layer_kernel(spec, dense.permute(dense.dim() - 1, *range(dense.dim() - 1)))

    def load(self, module, spec, state, ranks):
        cores = tt_svd(state[0], ranks)  # (1,S,r1) (r1,k_1,r2) ... (r_n,k_n,r_{n+1}) (r_{n+1},T,1)
        layers = list(module)[-(spec.ndim + 2) :]
        set_kernel(layers[0], pointwise_kernel(cores[0][0].T, spec.ndim))
        for axis, (layer, core) in enumerate(zip(layers[1:-1], cores[1:-1])):
            shape = [1] * spec.ndim
            shape[axis] = core.shape[1]
            set_kernel(layer, core.permute(2, 0, 1).reshape(core.shape[2], core.shape[0], *shape))
        set_kernel(layers[-1], pointwise_kernel(cores[-1][..., 0].T, spec.ndim))

    def rank_spectra(self, spec, state):
        return [[s] for s in state[1]]


def balanced_factors(n: int, count: int) -> tuple[int, ...]:
    """``n`` as ``count`` factors with the smallest largest factor, largest first (512, 3 -> 8, 8, 8)."""
    if count == 1:
        return (n,)
    candidates = (
        tuple(sorted((d, *balanced_factors(n // d, count - 1)), reverse=True)) for d in range(1, n + 1) if n % d == 0
    )
    return min(candidates, key=lambda factors: (factors[0], factors))


@register
class LinearTT(Decomposer):
    kind, method = "linear", "tt"
    options = ("cores", "modes")

    def __init__(self, cores: int = 3, modes: tuple[Sequence[int], Sequence[int]] | None = None):
        if modes is None and (not isinstance(cores, int) or cores < 2):
            raise InvalidInputError(f"tt: cores must be an int >= 2, got {cores!r}")
        self.cores, self.modes = cores, modes

    def _modes(self, spec):
        if self.modes is not None:
            in_modes, out_modes = (tuple(m) for m in self.modes)
            if math.prod(in_modes) != spec.in_features or math.prod(out_modes) != spec.out_features:
                raise InvalidInputError(
                    f"tt: modes {in_modes} x {out_modes} do not multiply to the layer's "
                    f"{spec.in_features} x {spec.out_features} features"
                )
            if len(in_modes) != len(out_modes) or len(in_modes) < 2:
                raise InvalidInputError("tt: give as many in modes as out modes, at least 2")
            return in_modes, out_modes
        return balanced_factors(spec.in_features, self.cores), balanced_factors(spec.out_features, self.cores)

    def _natural_shape(self, spec):
        in_modes, out_modes = self._modes(spec)
        return tuple(m * n for m, n in zip(out_modes, in_modes))

    def check(self, spec):
        self._modes(spec)

    def max_ranks(self, spec):
        return tt_max_ranks(self._natural_shape(spec))[::-1]

    def structure(self, spec, ranks):
        in_modes, out_modes = self._modes(spec)
        return TTLinear(in_modes, out_modes, ranks, bias=spec.has_bias)

    def _tensor(self, spec, weight):
        in_modes, out_modes = self._modes(spec)
        d = len(in_modes)
        interleave = [i for k in range(d) for i in (k, d + k)]  # (m1, n1, m2, n2, ...)
        return weight.detach().reshape(*out_modes, *in_modes).permute(*interleave).reshape(self._natural_shape(spec))

    def factorize(self, spec, weight):
        tensor = self._tensor(spec, weight)
        return tensor, [matrix_spectrum(u) for u in _unfoldings(tensor)]

    def error(self, spec, state, ranks):
        return tt_error_bound(state[1], ranks[::-1])

    def reconstruct(self, spec, state, ranks):
        in_modes, out_modes = self._modes(spec)
        d = len(in_modes)
        tensor = tt_reconstruct(tt_svd(state[0], ranks[::-1])).reshape([x for pair in zip(out_modes, in_modes) for x in pair])
        return tensor.permute(*range(0, 2 * d, 2), *range(1, 2 * d, 2)).reshape(spec.out_features, spec.in_features)

    def load(self, module, spec, state, ranks):
        in_modes, out_modes = self._modes(spec)
        natural = tt_svd(state[0], ranks[::-1])
        with torch.no_grad():
            for step, core in enumerate(reversed(natural)):
                k = len(natural) - 1 - step
                left, _, right = core.shape
                matrix = core.reshape(left, out_modes[k], in_modes[k], right).permute(2, 3, 0, 1)
                module.cores[step].copy_(matrix.reshape(in_modes[k] * right, left * out_modes[k]))

    def rank_spectra(self, spec, state):
        return [[s] for s in state[1]][::-1]
