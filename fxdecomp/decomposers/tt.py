"""Tensor-train decompositions of convs and Linear layers (TT-SVD).

Conv: the kernel as the 4-way tensor (S, kh, kw, T), a TT of four cores realised
as a chain of convs: 1x1 (S->r1), kh x 1 (r1->r2), 1 x kw (r2->r3), 1x1 (r3->T).
Conv1d and Conv3d get one conv per spatial axis (2 and 4 bonds); transposed convs
get transposed convs on their axes. Grouped convs: every conv of the chain is grouped
like the layer, each group its own TT at the same bonds. With calibration data the
conv's output core is refitted to the data (`ConvTT`).
Linear: a TT-matrix over factorisations of in/out features (Novikov et al. 2015),
realised by `fxdecomp.layers.TTLinear`. Ranks are the bonds, input side first.
The error reported is the TT-SVD bound sqrt(sum eps_k^2) of Oseledets (2011).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import nn

from ..calibration import OutputErrorMeter, output_whitening
from ..errors import InvalidInputError
from ..factorize.svd import Spectrum, matrix_spectrum
from ..factorize.tiles import psd_solve, refit_last_factor, relative_output_error
from ..factorize.tt import tt_error_bound, tt_max_ranks, tt_reconstruct, tt_svd
from ..layers import TTLinear
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
    data_aware = True

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
        return LinearTTState(tensor, [matrix_spectrum(u) for u in _unfoldings(tensor)])

    def factorize_whitened(self, spec, weight, grams, output_weights=None):
        """TT-SVD of (H_1^(1/2) x ... x H_d^(1/2)) W (G_1^(1/2) x ... x G_d^(1/2)), cores mapped back mode by mode.

        G_k (H_k) is the Gram matrix of input (output) mode k, the full one traced over the other
        modes: a Kronecker-factored approximation of G (H), under which whitening keeps the
        tensor-train structure. At each ranks the cores of this and of the plain TT-SVD are
        scored on the exact output error tr(H dW G dW^T) and the lower one is used.
        """
        state = self.factorize(spec, weight)
        gram = grams[0]
        if isinstance(gram, LowRankPSD):  # sketched: no dense G to score with
            output_sqrt = [w[0] for w in output_weights] if output_weights else None
            return replace(state, meter=OutputErrorMeter([gram], [weight.detach()], output_sqrt=output_sqrt))
        in_modes, out_modes = self._modes(spec)
        d = len(in_modes)
        gram = gram.to(torch.float64)
        output = output_weights[0][0] @ output_weights[0][0] if output_weights else None
        ins = [output_whitening(_mode_gram(gram, in_modes, k)) for k in range(d)]
        outs = [output_whitening(_mode_gram(output, out_modes, k)) if output is not None else None for k in range(d)]
        w = weight.detach().to(torch.float64)
        whitened = w.reshape(*out_modes, *in_modes)
        for k in range(d):
            if outs[k] is not None:
                whitened = _mode_product(whitened, outs[k][0], k)
            whitened = _mode_product(whitened, ins[k][0], d + k)
        unweights = [(o[1] if o is not None else None, i[1]) for o, i in zip(outs, ins)]
        return replace(
            state, whitened=self._tensor(spec, whitened.reshape(w.shape)), unweights=unweights, fit=(w, gram, w @ gram, output)
        )

    def _natural_cores(self, spec, state, ranks) -> tuple[list[torch.Tensor], float | None]:
        """(natural cores (r, m_k*n_k, r'), the relative output error on the data or None without data)."""
        plain = tt_svd(state.tensor, ranks[::-1])
        if state.fit is None:
            return plain, None
        cores = []
        for k, core in enumerate(tt_svd(state.whitened, ranks[::-1])):
            out_inverse, in_inverse = state.unweights[k]
            left, _, right = core.shape
            core = core.reshape(left, -1, in_inverse.shape[0], right)
            if out_inverse is not None:
                core = _mode_product(core, out_inverse, 1)
            cores.append(_mode_product(core, in_inverse, 2).reshape(left, -1, right))
        w, gram, weight_gram, output = state.fit

        def score(candidate):
            dense = self._dense(spec, candidate)
            return relative_output_error([w], [weight_gram], [dense], [dense @ gram], [output]), candidate

        best = min((score(plain), score(cores)), key=lambda pair: pair[0])
        refitted = self._refit_first(spec, state, best[1])
        if refitted is not None:
            best = min(best, score(refitted), key=lambda pair: pair[0])
        return best[1], best[0]

    def _refit_first(self, spec, state, natural) -> list[torch.Tensor] | None:
        """The cores with the first (slowest modes) core refitted by least squares on G; None if too large to solve.

        W[(i1, i'), (j1, j')] = sum_a C[i1, j1, a] Q[a, i', j'] is linear in C: for each i1 the best
        C[i1] solves normal equations A c = b with A = sum_i' (I x Q_i') G (I x Q_i')^T (Kronecker-structured).
        """
        in_modes, out_modes = self._modes(spec)
        r = natural[0].shape[-1]
        m1, n1 = out_modes[0], in_modes[0]
        mr, nr = spec.out_features // m1, spec.in_features // n1
        if (r * nr) ** 2 > _REFIT_LIMIT:
            return None
        _, gram, weight_gram, _ = state.fit
        d = len(in_modes)
        rest = tt_reconstruct([torch.eye(r, dtype=torch.float64)[None], *natural[1:]])  # (r, m2 n2, ..., md nd)
        rest = rest.reshape(r, *[x for pair in zip(out_modes[1:], in_modes[1:]) for x in pair])
        rest = rest.permute(0, *range(1, 2 * d - 1, 2), *range(2, 2 * d - 1, 2)).reshape(r, mr, nr)
        # As matrix products (einsum's own contraction order is far slower here).
        flat = rest.transpose(1, 2).reshape(r * nr, mr)
        pairs = (flat @ flat.T).reshape(r, nr, r, nr).permute(0, 2, 1, 3).reshape(r * r, nr * nr)  # [(a, b), (k, l)]
        blocks = gram.reshape(n1, nr, n1, nr).permute(0, 2, 1, 3).reshape(n1 * n1, nr * nr)  # [(j, J), (k, l)]
        normal = (blocks @ pairs.T).reshape(n1, n1, r, r).permute(0, 2, 1, 3).reshape(n1 * r, n1 * r)  # [(j, a), (J, b)]
        projected = weight_gram.reshape(m1, mr, n1, nr).permute(0, 2, 1, 3).reshape(m1 * n1, mr * nr)
        rhs = (projected @ rest.reshape(r, mr * nr).T).reshape(m1, n1 * r)  # [x, (j, a)]
        first = psd_solve(rhs, normal).reshape(1, m1 * n1, r)
        return [first, *natural[1:]]

    def _dense(self, spec, natural) -> torch.Tensor:
        """The (out, in) matrix of natural cores."""
        return self._matrix(spec, tt_reconstruct(natural))

    def _matrix(self, spec, tensor: torch.Tensor) -> torch.Tensor:
        """The (out, in) matrix of a natural tensor (m_1 n_1, ..., m_d n_d): the inverse of `_tensor`."""
        in_modes, out_modes = self._modes(spec)
        d = len(in_modes)
        tensor = tensor.reshape([x for pair in zip(out_modes, in_modes) for x in pair])
        return tensor.permute(*range(0, 2 * d, 2), *range(1, 2 * d, 2)).reshape(spec.out_features, spec.in_features)

    def error(self, spec, state, ranks):
        """Weight-only: the TT-SVD bound; with data: the exact relative output error tr(H dW G dW^T)."""
        if state.fit is not None:
            return self._natural_cores(spec, state, ranks)[1]
        if state.meter is not None:
            return state.meter.relative_error([self._matrix(spec, state.tensor)], [self.reconstruct(spec, state, ranks)])
        return tt_error_bound(state.spectra, ranks[::-1])

    def reconstruct(self, spec, state, ranks):
        return self._dense(spec, self._natural_cores(spec, state, ranks)[0])

    def load(self, module, spec, state, ranks):
        in_modes, out_modes = self._modes(spec)
        natural = self._natural_cores(spec, state, ranks)[0]
        with torch.no_grad():
            for step, core in enumerate(reversed(natural)):
                k = len(natural) - 1 - step
                left, _, right = core.shape
                matrix = core.reshape(left, out_modes[k], in_modes[k], right).permute(2, 3, 0, 1)
                module.cores[step].copy_(matrix.reshape(in_modes[k] * right, left * out_modes[k]))

    def rank_spectra(self, spec, state):
        return [[s] for s in state.spectra][::-1]


@dataclass(frozen=True, eq=False)
class LinearTTState:
    """The weight as the natural tensor (m_1 n_1, ..., m_d n_d) and its unfoldings' spectra; with data, the whitened one."""

    tensor: torch.Tensor
    spectra: list[Spectrum]
    whitened: torch.Tensor | None = None
    unweights: list[tuple] | None = None  # per mode: (H_k^(-1/2) or None, G_k^(-1/2))
    fit: tuple | None = None  # (W, G, W G, H or None)
    meter: OutputErrorMeter | None = None  # output errors on a sketched Gram matrix (no fit)


_REFIT_LIMIT = 1 << 24  # entries of the refit's (r * n') ^ 2 matrix: 128 MiB of float64


def _mode_gram(gram: torch.Tensor, modes: Sequence[int], k: int) -> torch.Tensor:
    """The Gram matrix of mode k of a (prod modes)^2 Gram matrix: the others traced out."""
    d = len(modes)
    letters = "abcdefghijklmnopqrstuvwxyz"
    rows = letters[:d]
    cols = rows[:k] + "z" + rows[k + 1 :]
    return torch.einsum(f"{rows}{cols}->{rows[k]}z", gram.reshape(*modes, *modes))


def _mode_product(tensor: torch.Tensor, matrix: torch.Tensor, axis: int) -> torch.Tensor:
    """``matrix`` (symmetric) applied to ``tensor``'s ``axis``."""
    return torch.movedim(torch.tensordot(matrix.to(tensor.dtype), tensor, dims=([1], [axis])), 0, axis)
