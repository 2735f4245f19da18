"""Tensor-train matrix decomposition of Linear layers (Novikov et al. 2015), realised by `fxdecomp.layers.TTLinear`.

The weight is reshaped to the natural tensor (m_1 n_1, ..., m_d n_d) over factorisations
of out/in features and decomposed by TT-SVD (Oseledets 2011); ranks are the bonds,
input side first. Weight-only, the error reported is the TT-SVD bound; with calibration
data the cores are fitted to the output error (`LinearTT.factorize_whitened`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from ..calibration import OutputErrorMeter, output_whitening
from ..errors import InvalidInputError
from ..factorize.svd import Spectrum
from ..factorize.tiles import psd_solve, relative_output_error
from ..factorize.tt import tt_error_bound, tt_max_ranks, tt_reconstruct, tt_svd, unfolding_spectra
from ..layers import TTLinear
from ..sketch import LowRankPSD
from .base import Decomposer, register


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
        return LinearTTState(tensor, unfolding_spectra(tensor))

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
