"""The option grid: for each candidate, keep it or a method at ranks on a grid, each with its cost and damage.

An option's cost is its FLOPs (2 per multiply-add, over every call site), its
parameters, or its onnxruntime milliseconds (measured by the caller's
``layer_ms``); its damage is the squared predicted error (`fxdecomp.planning.damage`),
or the score drop of a sensitivity callback. Options that cost at least as much
as the layer, or measure no faster, are dropped.

Example::

    keep = keep_choice(candidate)
    options = option_grid(ctx, candidate, ("svd", "tucker2"), plan_options, metric="flops", keep=keep, round_to=1)
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .. import meta
from ..cost import FLOPS_PER_MAC, count_params, module_macs
from ..decomposers import methods_for
from ..graph.candidates import Candidate
from ..result import Decision
from .damage import output_damage, predicted_error
from .factors import factorization

log = logging.getLogger("fxdecomp")

# onnxruntime milliseconds of a candidate's calls, as the layer (method None) or as an option at ranks.
LayerMs = Callable[[Candidate, "str | None", tuple[int, ...]], float]


@dataclass(frozen=True)
class Choice:
    method: str
    ranks: tuple[int, ...]
    flops: int
    params: int
    error: float
    damage: float | None = None  # measured by the sensitivity callback; None: error ** 2
    latency_ms: float | None = None  # measured in onnxruntime (latency budgets, latency_filter)

    def cost(self, metric: str) -> float:
        return {"flops": self.flops, "params": self.params, "latency": self.latency_ms}[metric]

    def predicted_damage(self) -> float:
        return self.damage if self.damage is not None else self.error**2


def bond_multiple(maximum: int, block: int) -> int:
    """The rank multiple of a bond of maximum rank ``maximum`` under adaptive rounding to ``block`` (plan ``round_to = 0``).

    ``block`` where the bond has room for at least 4 of them; else the largest power of two
    at most a quarter of the maximum (a 16-channel layer keeps ranks 4, 8, 12), at least 1.
    """
    quarter = max(maximum // 4, 1)
    return min(block, 1 << (quarter.bit_length() - 1))


def rank_grid(maxima: tuple[int, ...], steps: int, round_to: int, adaptive: bool = False) -> list[tuple[int, ...]]:
    """Ranks proportional to each maximum, on a grid dense at low ranks, rounded up to ``round_to``
    (``adaptive``: to `bond_multiple` of each maximum and ``round_to``)."""
    fractions = np.unique(np.concatenate([np.geomspace(1 / 64, 1, steps // 2), np.linspace(1 / steps, 1, steps)]))
    multiples = [bond_multiple(m, round_to) if adaptive else round_to for m in maxima]
    grid = []
    for f in fractions:
        ranks = tuple(min(m, max(q, math.ceil(math.ceil(f * m) / q) * q)) for m, q in zip(maxima, multiples))
        if ranks not in grid:
            grid.append(ranks)
    return grid


def structure_cost(decomposer, candidate: Candidate, ranks: tuple[int, ...]) -> tuple[int, int]:
    """(FLOPs over every call site, parameters) of ``decomposer``'s structure at ``ranks``.

    The parameters include the candidate's ``shared_params``: a weight that another user keeps stays in the model.
    """
    with torch.device("meta"):
        structure = decomposer.structure(candidate.spec, ranks)
    flops = sum(module_macs(structure, s.input_shape) for s in candidate.sites) * FLOPS_PER_MAC
    return flops, count_params(structure) + candidate.shared_params  # a weight another user keeps stays


def keep_choice(candidate: Candidate, layer_ms: LayerMs | None = None) -> Choice:
    """The option of leaving the layer as it is (its latency only when ``layer_ms`` is given)."""
    flops = sum(site.node.meta[meta.FLOPS].flops for site in candidate.sites)
    latency = layer_ms(candidate, None, ()) if layer_ms is not None else None
    return Choice("keep", (), flops, count_params(candidate.layer), 0.0, latency_ms=latency)


def grid_steps(options: Any, method: str, sensitivity: bool, measures_latency: bool) -> int:
    """Rank grid points for ``method`` under the plan pass's ``options`` (coarser when each point is scored or timed)."""
    steps = options.cp_grid if method == "cp" else options.grid
    if sensitivity:
        steps = min(steps, options.sensitivity_grid)
    if measures_latency:
        steps = min(steps, options.latency_grid)
    return steps


def option_grid(
    ctx,
    candidate: Candidate,
    methods: Sequence[str],
    options: Any,
    *,
    metric: str,
    keep: Choice,
    round_to: int,
    layer_ms: LayerMs | None = None,
    score: Callable[[Candidate, Choice], float] | None = None,
    unrouted: bool = False,
) -> list[Choice]:
    """Every option of ``candidate`` (``keep`` excluded) cheaper than ``keep`` in ``metric``, on the rank grid.

    ``options`` is the plan pass's Options (grid sizes); ``layer_ms`` times options
    (latency budgets, latency filter); ``score`` replaces the damage by a score drop.
    ``unrouted``: an expert the example routes no row to (it costs nothing there): its options are those with
    fewer parameters, at no cost, so that its stack's one option (`fxdecomp.planning.tied`) can reach it too.
    """
    choices = []
    for method in methods:
        if method not in methods_for(candidate.kind):
            continue
        decomposer, state = factorization(ctx, candidate, method)
        if state is None:
            continue
        steps = grid_steps(options, method, score is not None, layer_ms is not None)
        adaptive = getattr(options, "round_to", 1) == 0  # round_to = 0: this CPU's block, adapted to small bonds
        for ranks in rank_grid(decomposer.planning_max_ranks(candidate.spec), steps, round_to, adaptive):
            flops, params = structure_cost(decomposer, candidate, ranks)
            if (params >= keep.params) if metric == "params" or unrouted else (flops >= keep.flops):
                continue  # never chosen: costs at least as much as the layer
            latency = (0.0 if unrouted else layer_ms(candidate, method, ranks)) if layer_ms is not None else None
            if latency is not None and latency >= keep.latency_ms and not unrouted:
                continue  # measured no faster than the layer it would replace
            error = predicted_error(ctx, candidate, method, ranks)
            choice = Choice(method, ranks, flops, params, error, damage=output_damage(ctx, candidate, error), latency_ms=latency)
            if score is not None:
                choice = dataclasses.replace(choice, damage=score(candidate, choice))
            choices.append(choice)
    log.debug("%s: %d options", candidate.name, len(choices))
    return choices


def decision(candidate: Candidate, choice: Choice, reason: str) -> Decision:
    """The `Decision` record of ``choice`` for ``candidate`` (``reason`` kept only for a kept layer)."""
    keep = keep_choice(candidate)
    return Decision(
        name=candidate.name,
        op=candidate.kind,
        method=choice.method,
        ranks=choice.ranks,
        flops_before=keep.flops,
        flops_after=choice.flops,
        params_before=keep.params,
        params_after=choice.params,
        error=choice.error,
        calls=len(candidate.sites),
        reason=reason if choice.method == "keep" else "",
        note=candidate.note,
    )
