"""The experts of one stacked weight planned as one: every expert at the same option, so the FLOPs hold at any routing.

`fxdecomp.capture.experts` makes each expert of a mixture of experts a Linear
candidate (``<stacked weight>_expert<e>``). Planned apart, experts get different
ranks, and the compressed model's FLOPs then follow its routing: a token that moves
from an expert at rank 8 to one kept dense costs more than the plan priced (Qwen2-MoE
at a budget of 0.5 measured 0.503 on its own example). With one option for all
experts of a stack, the stack costs ``rows x cost per row`` whichever expert each row
is routed to. `tie_experts` merges their knapsack groups into one whose options are
the options every expert has, costs and damages summed; `expand` gives back one
choice per expert. An expert the example routes no row to costs nothing there; its
options are priced at no cost (`fxdecomp.planning.grid.option_grid`'s ``unrouted``), so it
takes its stack's option too. Where the experts share no option but "keep" (a latency
filter that kept different ranks per expert), they are planned apart.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from ..capture.experts import expert_of
from .grid import Choice
from .solver import Option

@dataclass(frozen=True)
class TiedChoice(Choice):
    """One option (method, ranks) for every expert of a stack: costs and damages summed over ``members``."""

    members: tuple[Choice, ...] = ()


@dataclass(frozen=True)
class TiedCandidate:
    """The planned experts of one stacked weight, named by that weight."""

    name: str
    members: tuple[Any, ...]


def tie_experts(planned: list, groups: list, metric: str, tie_break: float, stacks: dict[str, bool]) -> tuple[list, list]:
    """``planned`` [(candidate, [keep, *choices])] and the solver's ``groups`` with the experts of each of ``stacks``
    (`fxdecomp.capture.experts.stacks_of`) merged."""
    members: dict[str, list[int]] = {}
    for index, (candidate, _) in enumerate(planned):
        found = expert_of(stacks, candidate.name)
        if found:
            members.setdefault(found[0], []).append(index)
    merged: dict[int, tuple] = {}
    for stack, indices in members.items():
        tied = _tie(stack, [planned[i] for i in indices])
        if len(indices) > 1 and tied is not None:
            merged[indices[0]] = tied
            merged.update({i: None for i in indices[1:]})
    if not merged:
        return planned, groups
    new_planned, new_groups = [], []
    for index, entry in enumerate(planned):
        if index not in merged:
            new_planned.append(entry)
            new_groups.append(groups[index])
        elif merged[index] is not None:
            candidate, choices = merged[index]
            new_planned.append((candidate, choices))
            new_groups.append([Option(c.cost(metric), c.predicted_damage() + (i > 0) * tie_break) for i, c in enumerate(choices)])
    return new_planned, new_groups


def _tie(stack: str, entries: list) -> tuple[TiedCandidate, list[TiedChoice]] | None:
    keys = [(c.method, c.ranks) for c in entries[0][1]]
    common = set.intersection(*({(c.method, c.ranks) for c in choices} for _, choices in entries))
    keys = [k for k in keys if k in common]
    if len(keys) < 2:  # only "keep" in common: nothing to tie
        return None
    by_key = [{(c.method, c.ranks): c for c in choices} for _, choices in entries]
    choices = [_summed(key, tuple(options[key] for options in by_key)) for key in keys]
    return TiedCandidate(stack, tuple(candidate for candidate, _ in entries)), choices


def _summed(key: tuple, members: tuple[Choice, ...]) -> TiedChoice:
    latencies = [m.latency_ms for m in members]
    return TiedChoice(
        method=key[0],
        ranks=key[1],
        flops=sum(m.flops for m in members),
        params=sum(m.params for m in members),
        error=math.sqrt(sum(m.error**2 for m in members) / len(members)),
        damage=sum(m.predicted_damage() for m in members),
        latency_ms=None if any(v is None for v in latencies) else sum(latencies),
        members=members,
    )


def expand(candidate, choice) -> list[tuple[Any, Choice]]:
    """(candidate, choice) per expert of a tied stack; a plain candidate as it is."""
    if isinstance(candidate, TiedCandidate):
        return list(zip(candidate.members, choice.members))
    return [(candidate, choice)]
