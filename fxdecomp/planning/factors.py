"""The factorisation cache: each candidate's rank-independent factorisation, computed once per run.

Every pass and planning step that needs a candidate's factors (rank estimates,
the option grid, the rewrite) asks `factorization`, which keeps the answer in
the context's `fxdecomp.records.Factorizations` cache.

Example::

    decomposer, state = factorization(ctx, candidate, "svd")   # state None: svd does not apply
"""

from __future__ import annotations

import logging

import torch

from ..calibration import output_whitening
from ..decomposers import get_decomposer, methods_for
from ..errors import FxDecompError
from ..graph.candidates import Candidate

log = logging.getLogger("fxdecomp")


FIT_MODES = ("data", "svd", "weights")


def factorization(ctx, candidate: Candidate, method: str):
    """(decomposer, state) for a candidate and method, computed once per compress call; state None if n/a.

    With calibration data, data-aware decomposers (svd, spatial_svd, tucker2, cp) fit
    their factors to it (`fitted_to_data`), on both sides when the calibration was output-aware.
    """
    gram = ctx.grams.get(candidate.name)
    key = _key(ctx, candidate, method)
    fitted = key[2]
    if key not in ctx.states:
        decomposer = get_decomposer(candidate.kind, method) if method in methods_for(candidate.kind) else None
        state = None
        if decomposer is not None:
            weight = candidate.layer.weight.detach()
            try:
                decomposer.check(candidate.spec)
                if fitted:
                    state = decomposer.factorize_whitened(
                        candidate.spec, weight, gram_matrices(gram), output_weights(ctx, candidate)
                    )
                else:
                    state = decomposer.factorize(candidate.spec, weight)
            except FxDecompError as exc:
                log.info("%s: %s does not apply (%s)", candidate.name, method, exc)
        ctx.states[key] = (decomposer, state)
    return ctx.states[key]


def fitted_to_data(ctx, candidate: Candidate, method: str) -> bool:
    """Whether ``method``'s factors of ``candidate`` are fitted to the calibration data (else weight-only).

    Yes when there is calibration data, the decomposer is data-aware and can fit this
    layer (`Decomposer.can_fit`), and the plan pass's ``fit`` option allows it: "data"
    (default) every data-aware method, "svd" only svd (the behaviour before issue #16),
    "weights" none (for ablations). Unfitted factors are still scored on the data.
    """
    mode = ctx.factorizations.fit
    key = (candidate.name, method, mode)
    cache = ctx.factorizations.fitted
    if key not in cache:
        gram = ctx.grams.get(candidate.name)
        allowed = mode == "data" or (mode == "svd" and method == "svd")
        fitted = False
        if gram is not None and allowed and method in methods_for(candidate.kind):
            decomposer = get_decomposer(candidate.kind, method)
            fitted = decomposer.data_aware and decomposer.can_fit(candidate.spec, gram_matrices(gram))
        cache[key] = fitted
    return cache[key]


def store_factorization(ctx, candidate: Candidate, method: str, decomposer, state) -> None:
    """Make (decomposer, state) what `factorization` answers for this candidate and method from now on
    (the compensate pass's factors, fitted on the compressed model's inputs)."""
    ctx.states[_key(ctx, candidate, method)] = (decomposer, state)


def _key(ctx, candidate: Candidate, method: str) -> tuple[str, str, bool]:
    """The cache key: the candidate, the method, and whether its factors are fitted to the data."""
    return candidate.name, method, fitted_to_data(ctx, candidate, method)


def gram_matrices(gram) -> list[torch.Tensor]:
    return [gram.matrix(g) for g in range(gram.groups)]


def output_gram_matrices(ctx, candidate: Candidate) -> list[torch.Tensor] | None:
    output_gram = ctx.output_grams.get(candidate.name)
    return gram_matrices(output_gram) if output_gram is not None else None


def output_weights(ctx, candidate: Candidate) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """(H^(1/2), H^(-1/2)) per group of the candidate's output Gram matrices, computed once; None without."""
    cache = ctx.factorizations.output_weights
    if candidate.name not in cache:
        output_grams = output_gram_matrices(ctx, candidate)
        cache[candidate.name] = [output_whitening(h) for h in output_grams] if output_grams else None
    return cache[candidate.name]
