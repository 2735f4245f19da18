"""Tensor-train decompositions of convs and Linear layers (TT-SVD).

Conv: the kernel as the 4-way tensor (S, kh, kw, T), a TT of four cores realised
as a chain of convs: 1x1 (S->r1), kh x 1 (r1->r2), 1 x kw (r2->r3), 1x1 (r3->T).
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
from .base import Decomposer, conv, leading_pad, refuse_groups, register


def _conv_tensor(kernel: torch.Tensor) -> torch.Tensor:
    return kernel.detach().permute(1, 2, 3, 0)  # (S, kh, kw, T): the order the input meets the modes


def _unfoldings(tensor: torch.Tensor) -> list[torch.Tensor]:
    shape = tensor.shape
    return [tensor.reshape(math.prod(shape[: k + 1]), -1) for k in range(len(shape) - 1)]


@register
class ConvTT(Decomposer):
    kind, method = "conv2d", "tt"

    def check(self, spec):
        refuse_groups(spec, "tt")

    def max_ranks(self, spec):
        return tt_max_ranks((spec.in_channels, *spec.kernel_size, spec.out_channels))

    def structure(self, spec, ranks):
        r1, r2, r3 = ranks
        pads, (ph, pw) = leading_pad(spec)
        (kh, kw), (sh, sw), (dh, dw) = spec.kernel_size, spec.stride, spec.dilation
        return nn.Sequential(
            *pads,
            conv(spec.in_channels, r1),
            conv(r1, r2, (kh, 1), (sh, 1), (ph, 0), (dh, 1)),
            conv(r2, r3, (1, kw), (1, sw), (0, pw), (1, dw)),
            conv(r3, spec.out_channels, bias=spec.has_bias),
        )

    def factorize(self, spec, weight):
        tensor = _conv_tensor(weight)
        return tensor, [matrix_spectrum(u) for u in _unfoldings(tensor)]

    def error(self, spec, state, ranks):
        return tt_error_bound(state[1], ranks)

    def reconstruct(self, spec, state, ranks):
        return tt_reconstruct(tt_svd(state[0], ranks)).permute(3, 0, 1, 2)

    def load(self, module, spec, state, ranks):
        g1, g2, g3, g4 = tt_svd(state[0], ranks)  # (1,S,r1) (r1,kh,r2) (r2,kw,r3) (r3,T,1)
        first, vertical, horizontal, last = list(module)[-4:]
        with torch.no_grad():
            first.weight.copy_(g1[0].T[:, :, None, None])
            vertical.weight.copy_(g2.permute(2, 0, 1)[..., None])
            horizontal.weight.copy_(g3.permute(2, 0, 1)[:, :, None, :])
            last.weight.copy_(g4[..., 0].T[:, :, None, None])

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
