"""Sensitivity scoring: an option's damage as the drop of the user's score with only that layer decomposed.

The callback scores a model (higher is better, e.g. validation accuracy); the
reference is scored once, each option on a decomposed copy of the reference.

Example::

    score = score_drops(ctx)          # ctx.sensitivity is the callback
    damage = score(candidate, choice)   # >= 0
"""

from __future__ import annotations

import copy
from collections.abc import Callable

from ..graph.candidates import Candidate
from ..graph.rewrite import rewrite_graph
from .grid import Choice, decision


def score_drops(ctx) -> Callable[[Candidate, Choice], float]:
    """A function (candidate, choice) -> how much ``ctx.sensitivity``'s score falls (never below 0)."""
    baseline: list[float] = []

    def score_drop(candidate: Candidate, choice: Choice) -> float:
        if not baseline:
            baseline.append(float(ctx.sensitivity(ctx.reference)))
        variant = copy.deepcopy(ctx.reference)
        rewrite_graph(variant, ctx, {candidate.name: decision(candidate, choice, "")})
        return max(0.0, baseline[0] - float(ctx.sensitivity(variant)))

    return score_drop
