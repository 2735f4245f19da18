"""Look before you cut: every candidate layer's FLOPs, parameters and rank estimates, nothing rewritten.

Runs the analysis-only recipe (`ANALYSIS_RECIPE`: shape_prop, find_candidates,
annotate_cost, estimate_ranks) through the pass manager on a captured copy of the model.

Example::

    from fxdecomp.inspect import inspect_model
    for layer in inspect_model(model, (torch.randn(1, 3, 224, 224),)):
        svd = layer.estimate("svd")
        print(layer.name, layer.flops, svd.vbmf, svd.energy_90, svd.energy_kept[0].energy)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from . import meta
from .compress import as_example_inputs
from .decomposers import all_methods
from .errors import InvalidInputError, UnknownMethodError
from .frontend import capture
from .passes import PassManager
from .planning.factors import factorization
from .recipes import Recipe, Step
from .records import PassContext, Request

__all__ = ["ANALYSIS_RECIPE", "RANK_FRACTIONS", "EnergyAt", "LayerInfo", "MethodEstimate", "inspect_model"]

ANALYSIS_PASSES = ("shape_prop", "find_candidates", "annotate_cost", "estimate_ranks")
ANALYSIS_RECIPE = Recipe(
    "inspect",
    "analysis only: shapes, candidates, FLOPs and parameters, rank estimates; nothing planned or rewritten",
    tuple(Step(name) for name in ANALYSIS_PASSES),
)
RANK_FRACTIONS = (0.25, 0.5)  # where the spectrum's kept energy is reported


@dataclass(frozen=True)
class EnergyAt:
    """Fraction of each bond's spectral energy kept at ``rank_fraction`` of its maximum rank."""

    rank_fraction: float
    ranks: tuple[int, ...]
    energy: tuple[float, ...]


@dataclass(frozen=True)
class MethodEstimate:
    """The rank rules' answers for one method of one layer (ranks input side first)."""

    method: str
    max_ranks: tuple[int, ...]
    vbmf: tuple[int, ...]
    energy_90: tuple[int, ...]
    energy_99: tuple[int, ...]
    energy_kept: tuple[EnergyAt, ...]


@dataclass(frozen=True)
class LayerInfo:
    """One candidate layer. FLOPs count 2 per multiply-add, summed over all of the layer's calls."""

    name: str
    op: str  # "conv2d" or "linear"
    form: str  # "module" or "function"
    weight_shape: tuple[int, ...]
    input_shape: tuple[int, ...]  # of the first call
    calls: int
    flops: int
    params: int
    excluded: bool
    estimates: tuple[MethodEstimate, ...]

    def estimate(self, method: str) -> MethodEstimate | None:
        return next((e for e in self.estimates if e.method == method), None)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: tuples become lists."""
        return asdict(self)


def inspect_model(
    model: nn.Module,
    example_inputs: tuple | torch.Tensor,
    methods: Sequence[str] = ("svd", "tucker2"),
    exclude: Sequence[str] = (),
) -> list[LayerInfo]:
    """The annotated candidate layers of ``model``, in graph order; the model is not modified.

    ``methods`` are the methods whose rank estimates are computed (each factorises every
    layer it applies to, so large models take as long as the analysis part of `compress`).
    """
    if not isinstance(model, nn.Module):
        raise InvalidInputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    inputs = as_example_inputs(example_inputs)
    methods = tuple(methods)
    unknown = [m for m in methods if m not in all_methods()]
    if unknown:
        raise UnknownMethodError(f"unknown method(s) {unknown}; known methods: {all_methods()}")
    with torch.no_grad():
        gm, frontend = capture(model, inputs)
        request = Request(inputs, exclude=(exclude,) if isinstance(exclude, str) else tuple(exclude), frontend=frontend)
        context = PassContext(request)
        recipe = ANALYSIS_RECIPE.with_options(estimate_ranks={"methods": methods})
        PassManager.from_steps(((s.name, s.options) for s in recipe.steps), context, "inspect")(gm)
        return [_layer_info(context, candidate) for candidate in context.candidates.values()]


def _layer_info(context: PassContext, candidate) -> LayerInfo:
    costs = [site.node.meta[meta.FLOPS] for site in candidate.sites]
    ranks: dict[str, meta.RankEstimate] = context.rank_estimates.by_candidate.get(candidate.name, {})
    estimates = []
    for method, estimate in ranks.items():
        decomposer, state = factorization(context, candidate, method)
        spectra = decomposer.rank_spectra(candidate.spec, state)
        estimates.append(
            MethodEstimate(
                method,
                estimate.max_ranks,
                estimate.vbmf,
                estimate.energy_90,
                estimate.energy_99,
                tuple(_energy_at(f, spectra, estimate.max_ranks) for f in RANK_FRACTIONS),
            )
        )
    return LayerInfo(
        name=candidate.name,
        op=candidate.kind,
        form=candidate.form,
        weight_shape=tuple(candidate.layer.weight.shape),
        input_shape=tuple(candidate.sites[0].input_shape),
        calls=len(candidate.sites),
        flops=sum(c.flops for c in costs),
        params=costs[0].params,
        excluded=candidate.excluded,
        estimates=tuple(estimates),
    )


def _energy_at(fraction: float, spectra_per_rank, max_ranks: tuple[int, ...]) -> EnergyAt:
    # The rank a fractional rank spec resolves to (see fxdecomp.ranks), and the energy kept there,
    # pooled over the spectra that set it (one per group: the energy of the block-diagonal whole).
    ranks = tuple(max(1, min(m, math.ceil(fraction * m - 1e-9))) for m in max_ranks)
    energy = []
    for rank, group in zip(ranks, spectra_per_rank):
        total = sum(s.total for s in group)
        kept = sum(float(s.energies[:rank].sum()) for s in group)
        energy.append(kept / total if total > 0 else 1.0)
    return EnergyAt(fraction, ranks, tuple(energy))

