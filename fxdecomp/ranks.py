"""Rank specs: how a user says which ranks a decomposition gets.

``"full"``          the maximum ranks (the structure reproduces the layer exactly)
``8`` / ``(8, 16)``  fixed ranks; an int applies to every bond (clamped to each maximum)
``0.25``            a fraction of each maximum rank (rounded up, at least 1)
``"energy:0.9"``    the smallest ranks that keep 90 % of each spectrum's energy
``"vbmf"``          empirical variational Bayes (Nakajima et al. 2013) on each unfolding

Example::

    resolve_ranks("energy:0.95", decomposer, spec, state)  # -> (23,); state from decomposer.factorize
"""

from __future__ import annotations

import math
from typing import Any

from collections.abc import Callable

from .errors import InvalidInputError
from .factorize.svd import Spectrum
from .vbmf import evbmf_singular_values

RankSpec = int | float | str | tuple


def resolve_ranks(spec_ranks: RankSpec, decomposer: Any, spec: Any, state: Any) -> tuple[int, ...]:
    maxima = decomposer.max_ranks(spec)
    method = decomposer.method
    if isinstance(spec_ranks, str):
        return _rule_ranks(spec_ranks, decomposer, spec, state, maxima)
    if isinstance(spec_ranks, bool):
        raise InvalidInputError(f"{method}: ranks={spec_ranks!r} is not a rank; give an int, a tuple, a fraction or 'full'")
    if isinstance(spec_ranks, int):
        if spec_ranks < 1:
            raise InvalidInputError(f"{method}: rank must be at least 1, got {spec_ranks}")
        return tuple(min(spec_ranks, m) for m in maxima)
    if isinstance(spec_ranks, float):
        if not (0.0 < spec_ranks <= 1.0) or math.isnan(spec_ranks):
            raise InvalidInputError(f"{method}: a fractional rank must be in (0, 1], got {spec_ranks}")
        return tuple(max(1, min(m, math.ceil(spec_ranks * m - 1e-9))) for m in maxima)
    if isinstance(spec_ranks, (tuple, list)):
        ranks = tuple(spec_ranks)
        if len(ranks) != len(maxima):
            raise InvalidInputError(
                f"{method} takes {len(maxima)} rank(s) for this layer (input side first), got {len(ranks)}: {ranks}"
            )
        for r, m in zip(ranks, maxima):
            if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= m:
                raise InvalidInputError(f"{method}: each rank must be an int in [1, max]; got {ranks}, maxima {maxima}")
        return ranks
    raise InvalidInputError(f"{method}: cannot read ranks={spec_ranks!r}; give an int, a tuple, a fraction, 'full', 'energy:F' or 'vbmf'")


def _rule_ranks(rule: str, decomposer, spec, state, maxima) -> tuple[int, ...]:
    if rule == "full":
        return tuple(maxima)
    if rule == "vbmf":
        return rule_ranks(decomposer.rank_spectra(spec, state), maxima, vbmf_rank_of_spectrum)
    if rule.startswith("energy:"):
        try:
            fraction = float(rule.split(":", 1)[1])
        except ValueError:
            fraction = float("nan")
        if not 0.0 < fraction <= 1.0:
            raise InvalidInputError(f"energy rule needs a fraction in (0, 1], e.g. 'energy:0.9'; got {rule!r}")
        return rule_ranks(decomposer.rank_spectra(spec, state), maxima, lambda s: s.energy_rank(fraction))
    raise InvalidInputError(f"unknown rank rule {rule!r}; use 'full', 'vbmf' or 'energy:F'")


def rule_ranks(spectra_per_rank, maxima, estimate: Callable[[Spectrum], int]) -> tuple[int, ...]:
    """Each rank from its spectra (one per group: the largest estimate wins), clamped to [1, max]."""
    return tuple(max(1, min(m, max(estimate(s) for s in group))) for m, group in zip(maxima, spectra_per_rank))


def vbmf_rank_of_spectrum(spectrum: Spectrum) -> int:
    return evbmf_singular_values(spectrum.singular_values, spectrum.shape).rank
