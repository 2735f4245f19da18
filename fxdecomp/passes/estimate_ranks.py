"""The estimate_ranks pass: VBMF and energy rank estimates per candidate and method."""

from __future__ import annotations

from dataclasses import dataclass

from torch.fx.passes.infra.pass_base import PassResult

from .. import meta
from ..planning.factors import factorization
from ..ranks import rule_ranks, vbmf_rank_of_spectrum
from ..records import RankEstimates
from .base import Pass, register_pass


@register_pass
class RankEstimatePass(Pass):
    """VBMF and energy rank estimates per candidate and method (from the cached factorisations)."""

    name = "estimate_ranks"
    requires = ("candidates",)
    provides = ("rank_estimates",)

    @dataclass(frozen=True)
    class Options:
        methods: tuple[str, ...] = ("svd", "tucker2")

    def run(self, gm):
        ctx = self.context
        by_candidate = {}
        for candidate in ctx.candidates.values():
            estimates = {}
            for method in self.options.methods:
                decomposer, state = factorization(ctx, candidate, method)
                if state is None:
                    continue
                spectra = decomposer.rank_spectra(candidate.spec, state)
                maxima = decomposer.max_ranks(candidate.spec)
                estimates[method] = meta.RankEstimate(
                    method,
                    maxima,
                    rule_ranks(spectra, maxima, vbmf_rank_of_spectrum),
                    rule_ranks(spectra, maxima, lambda s: s.energy_rank(0.9)),
                    rule_ranks(spectra, maxima, lambda s: s.energy_rank(0.99)),
                )
            for site in candidate.sites:
                site.node.meta[meta.RANK] = estimates
            by_candidate[candidate.name] = estimates
        ctx.provide("rank_estimates", RankEstimates(by_candidate))
        return PassResult(gm, False)
