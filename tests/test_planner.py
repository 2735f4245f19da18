"""The knapsack solver finds the optimum (checked by brute force) and respects the capacity."""

import itertools
import random

import pytest

from fxdecomp.planner import Infeasible, Option, solve_mckp


def brute_force(groups, capacity):
    best = None
    for plan in itertools.product(*[range(len(g)) for g in groups]):
        cost = sum(groups[i][j].cost for i, j in enumerate(plan))
        damage = sum(groups[i][j].damage for i, j in enumerate(plan))
        if cost <= capacity and (best is None or damage < best[0] - 1e-12):
            best = (damage, plan)
    return best


@pytest.mark.parametrize("seed", range(30))
def test_matches_brute_force(seed):
    rng = random.Random(seed)
    groups = [
        [Option(rng.uniform(0, 10) if j else 10.0, rng.uniform(0, 1) if j else 0.0) for j in range(rng.randint(1, 5))]
        for _ in range(rng.randint(1, 5))
    ]
    capacity = rng.uniform(0.2, 1.0) * sum(10.0 for _ in groups)
    expected = brute_force(groups, capacity)
    if expected is None:
        with pytest.raises(Infeasible):
            solve_mckp(groups, capacity)
        return
    plan = solve_mckp(groups, capacity)
    assert sum(groups[i][j].cost for i, j in enumerate(plan)) <= capacity + 1e-9
    assert sum(groups[i][j].damage for i, j in enumerate(plan)) == pytest.approx(expected[0], abs=1e-12)


def test_small_known_case():
    groups = [[Option(10, 0.0), Option(4, 0.2)], [Option(6, 0.0), Option(2, 0.5)]]
    assert solve_mckp(groups, 16) == [0, 0]
    assert solve_mckp(groups, 12) == [1, 0]
    assert solve_mckp(groups, 6) == [1, 1]
    with pytest.raises(Infeasible) as info:
        solve_mckp(groups, 5)
    assert info.value.smallest == 6


def test_thinned_front_still_meets_capacity():
    rng = random.Random(0)
    groups = [[Option(100.0, 0.0)] + [Option(rng.uniform(1, 99), rng.uniform(0, 1)) for _ in range(30)] for _ in range(12)]
    plan = solve_mckp(groups, 600.0, max_front=50)
    assert sum(groups[i][j].cost for i, j in enumerate(plan)) <= 600.0 + 1e-9
