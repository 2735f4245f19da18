"""The knapsack solver finds the optimum (checked by brute force) and respects the capacity."""

import itertools
import random

import pytest

from fxdecomp.planning.solver import Infeasible, Option, solve_mckp


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


def test_infeasible_names_the_smallest_cost():
    with pytest.raises(Infeasible) as info:
        solve_mckp([[Option(4.0, 0.0)], [Option(2.5, 0.0), Option(3.0, 0.0)]], 6.0)
    assert info.value.smallest == 6.5
    assert str(info.value) == "smallest reachable cost is 6.5"


def test_capacity_tolerance_is_relative_with_a_floor_of_one():
    # Within 1e-9 of the capacity (relative above 1, absolute below) fits; beyond it does not.
    big = 1e6
    assert solve_mckp([[Option(big * (1 + 5e-10), 0.0)]], big) == [0]
    with pytest.raises(Infeasible):
        solve_mckp([[Option(big * (1 + 2e-9), 0.0)]], big)
    assert solve_mckp([[Option(1.0 + 0.5e-9, 0.0)]], 1.0) == [0]
    with pytest.raises(Infeasible):
        solve_mckp([[Option(1.0 + 1.5e-9, 0.0)]], 1.0)
    # A plan exactly at the limit fits, in the first check and in the front's.
    assert solve_mckp([[Option(1e-9, 0.0)], [Option(0.0, 0.0)]], 0.0) == [0, 0]


def test_thinning_keeps_the_last_point_of_each_bucket():
    import numpy as np

    from fxdecomp.planning.solver import _thin

    front = np.array([True, True, False, True, True, True, False, True])
    bucket = np.array([0, 0, 0, 1, 1, 2, 3, 3])
    assert _thin(front, bucket).tolist() == [False, True, False, False, True, True, False, True]


def test_thinning_buckets_are_capacity_over_max_front_wide(monkeypatch):
    import fxdecomp.planning.solver as planner

    seen = []
    real = planner._thin

    def spy(front, bucket):
        seen.append(int(bucket[front].max()))
        return real(front, bucket)

    monkeypatch.setattr(planner, "_thin", spy)
    rng = random.Random(1)
    groups = [[Option(100.0, 0.0)] + [Option(rng.uniform(1, 99), rng.uniform(0, 1)) for _ in range(30)] for _ in range(8)]
    capacity, max_front = 400.0, 40
    thinned = solve_mckp(groups, capacity, max_front=max_front)
    assert seen and max(seen) <= max_front and max(seen) >= max_front // 2  # costs up to the capacity fill the buckets
    exact = solve_mckp(groups, capacity, max_front=10**9)
    damage = lambda plan: sum(groups[i][j].damage for i, j in enumerate(plan))  # noqa: E731
    assert damage(thinned) <= damage(exact) + 0.05 * len(groups)  # a close approximation, not one point per front
