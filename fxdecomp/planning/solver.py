"""The global planner: a multiple-choice knapsack over every candidate layer.

Each layer offers options (keep it, or a method at some ranks), each with a cost
(FLOPs or parameters) and a damage (predicted squared relative error). The plan
takes exactly one option per layer, keeps the total cost within the capacity,
and minimises the total damage.

Solver: dynamic programming over Pareto fronts. After each layer, the front
holds every partial plan that no other partial plan beats on both cost and
damage, with its exact cost; partial plans that cannot fit the capacity even
with the cheapest options of the remaining layers are dropped. The answer is
the least-damage plan on the final front: exact, and always within capacity.
Only if a front grows beyond ``max_front`` points is it thinned to the best
point per cost bucket (capacity / max_front wide), the one approximation.
Hand-written: no maintained library solves the multiple-choice knapsack.

Example::

    solve_mckp([[Option(10, 0.0), Option(4, 0.2)], [Option(6, 0.0), Option(2, 0.5)]], capacity=12)
    # -> [1, 0]: cost 10, damage 0.2
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Option:
    cost: float
    damage: float


class Infeasible(Exception):
    """No choice meets the capacity; ``smallest`` is the least total cost any choice reaches."""

    def __init__(self, smallest: float):
        super().__init__(f"smallest reachable cost is {smallest}")
        self.smallest = smallest


def solve_mckp(groups: Sequence[Sequence[Option]], capacity: float, max_front: int = 50_000) -> list[int]:
    """Index of the chosen option in each group: total cost <= capacity, least total damage.

    Ties go to the cheaper plan, then to earlier options, so the same inputs always give the same plan.
    """
    group_costs = [np.array([o.cost for o in group], dtype=np.float64) for group in groups]
    group_damages = [np.array([o.damage for o in group], dtype=np.float64) for group in groups]
    cheapest = [float(c.min()) for c in group_costs]
    smallest = sum(cheapest)
    limit = capacity + 1e-9 * max(abs(capacity), 1.0)
    if smallest > limit:
        raise Infeasible(smallest)
    still_needed = np.cumsum([0.0, *cheapest[::-1]])[::-1][1:]  # least cost of the groups after each one
    costs, damages = np.zeros(1), np.zeros(1)
    history = []
    for costs_g, damages_g, needed in zip(group_costs, group_damages, still_needed):
        parent = np.repeat(np.arange(len(costs)), len(costs_g))
        option = np.tile(np.arange(len(costs_g)), len(costs))
        cost = costs[parent] + costs_g[option]
        damage = damages[parent] + damages_g[option]
        fits = cost + needed <= limit
        parent, option, cost, damage = parent[fits], option[fits], cost[fits], damage[fits]
        order = np.lexsort((option, parent, damage, cost))  # by cost, then damage, then a fixed order
        cost, damage, parent, option = cost[order], damage[order], parent[order], option[order]
        best_before = np.concatenate([[np.inf], np.minimum.accumulate(damage)[:-1]])
        front = damage < best_before  # strictly better than every cheaper partial plan
        if front.sum() > max_front:
            front = _thin(front, np.floor(cost / (capacity / max_front)).astype(np.int64))
        costs, damages = cost[front], damage[front]
        history.append((parent[front], option[front]))
    index = int(np.argmin(damages))  # first minimum: the cheapest of equal-damage plans
    plan = []
    for parents, options in reversed(history):
        plan.append(int(options[index]))
        index = int(parents[index])
    return plan[::-1]


def _thin(front: np.ndarray, bucket: np.ndarray) -> np.ndarray:
    """Keep, in each cost bucket, only the last (least-damage) front point."""
    points = np.flatnonzero(front)
    keep = np.r_[bucket[points][1:] != bucket[points][:-1], True]
    thinned = np.zeros_like(front)
    thinned[points[keep]] = True
    return thinned
