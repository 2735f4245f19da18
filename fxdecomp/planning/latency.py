"""Latency in the plan: when options are timed, the repair of a FLOP plan toward a speed-up, and re-planning on measurement.

Plain functions over the solver's groups: ``planned`` pairs each candidate with
its options (keep first), ``plan`` indexes one option per candidate, and
``measure(planned, plan)`` (given by the caller, who owns onnxruntime) returns
the planned model's latency in milliseconds of the first timing.

Layers timed alone do not add up exactly to the model (fusion, caches): both
procedures time the planned model and rescale the layer sum by measured /
predicted, up to ``measure_rounds`` times.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

from .solver import Infeasible, Option, solve_mckp
from ..user_warnings import warn

log = logging.getLogger("fxdecomp")

Planned = Sequence[tuple[Any, Sequence[Any]]]  # (candidate, [keep, *choices])
Measure = Callable[[Planned, list[int]], float]


def follows_latency(options: Any, metric: str) -> bool:
    """A FLOP or parameter plan that must also reach ``min_efficiency`` in measured latency."""
    return options.min_efficiency > 0 and metric != "latency"


def measures_latency(options: Any, metric: str) -> bool:
    """Whether every option is timed in onnxruntime (latency budgets, latency_filter, min_efficiency)."""
    return metric == "latency" or options.latency_filter or follows_latency(options, metric)


def replan_on_measurement(
    groups: Sequence[Sequence[Option]],
    planned: Planned,
    plan: list[int],
    fixed: float,
    target: float,
    options: Any,
    measure: Measure,
) -> list[int]:
    """Time the planned model; while it misses the latency ``target`` (ms) by more than the tolerance, re-plan.

    Layers timed alone do not add up exactly to the model (fusion, caches): the
    measured / predicted ratio of the last plan rescales the layer times for the
    next solve, up to ``measure_rounds`` times. A plan measured within the budget
    is never traded for one that is not: of the plans measured within ``target``
    (plus the tolerance), the least damaging is returned; only when none was, the
    last re-plan is.
    """
    within = target * (1 + options.replan_tolerance)
    best: tuple[float, list[int]] | None = None  # (damage, plan) of the least damaging plan measured within budget
    for _ in range(max(options.measure_rounds, 1)):
        predicted = fixed + sum(choices[i].latency_ms for (_, choices), i in zip(planned, plan))
        measured = measure(planned, plan)
        log.info("latency plan: predicted %.3g ms, measured %.3g ms, budget %.3g ms", predicted, measured, target)
        damage = sum(group[i].damage for group, i in zip(groups, plan))
        if measured <= within and (best is None or damage < best[0]):
            best = (damage, plan)
        if abs(measured - target) <= options.replan_tolerance * target or predicted <= 0:
            break
        ratio = measured / predicted
        if not 0.5 <= ratio <= 2.0:  # a disturbed measurement, not a model error: keep the plan
            log.warning("latency plan measured %.3g ms against %.3g ms predicted; not re-planned", measured, predicted)
            break
        scale = ratio  # measured / summed layer times of this plan: the correction for the next solve
        try:  # the layers' share is what the ratio corrects: fixed + options = target / scale
            plan = solve_mckp(groups, target / scale - fixed, max_front=options.max_front)
        except Infeasible:
            break
        log.info("latency plan re-made with the layers' times scaled by %.3f", scale)
    return plan if best is None else best[1]


def follow_latency(
    groups: Sequence[Sequence[Option]],
    planned: Planned,
    plan: list[int],
    capacity: float,
    *,
    model_ms_before: float,
    flops_before: int,
    options: Any,
    measure: Measure,
) -> list[int]:
    """Repair the FLOP plan until its predicted efficiency reaches min_efficiency, at the least damage.

    Greedy repair: switch one layer's option at a time, within the budget, taking
    the switch that raises the predicted efficiency (L0 / L) * (F / F0) most per
    unit of damage (switches that raise it and lower the damage first), until it
    reaches the target. A memory-bound classifier, which saves latency without
    FLOPs, goes first; cutting convs further, which lowers latency and FLOPs
    alike, does not help and is not chosen. Then spend what is left: switches
    that lower the damage while the budget and the target both hold. Small steps
    from the FLOP plan keep the FLOPs at the budget (a Lagrangian price on the
    constraint jumps, on this discrete problem, to far cheaper plans).

    The damage is what the plan minimises first: a switch may raise the plan's
    summed damage to at most ``options.repair_damage`` times the FLOP plan's (0:
    no limit), so the repair trades a bounded share of accuracy for latency and
    never takes an option that a sensitivity callback scored far worse than the
    plan (a layer the user's metric says must stay). A repair that cannot reach
    the target within that ceiling is priced pro rata, with a warning: of the
    FLOP plan and the plans after each greedy step, the most efficient one that
    closes at least the share of the gap to the target that it spends of the
    damage allowance is kept. Falling short, the greedy path often buys little
    latency for the whole allowance (the digits CNN at 0.3 of its FLOPs,
    weight-only: test accuracy 97.2 % -> 83.0 %, tools/bench_calibration.py
    --only digits). Without a ceiling (``repair_damage = 0``) the most efficient
    plan found is kept, with a warning.

    Layers timed alone do not add up exactly to the model (at 2 threads VGG-16's
    plan ran 37 % slower than predicted): the planned model is timed, the
    prediction rescaled by measured / predicted, and the repair repeated on
    the rescaled figures, up to ``measure_rounds`` times.
    """
    target = options.min_efficiency
    flop_plan_damage = sum(group[i].damage for group, i in zip(groups, plan))
    # The absolute slack lets switches between options of no damage (a sensitivity score that did not move) through.
    ceiling = options.repair_damage * flop_plan_damage + 1e-9 if options.repair_damage > 0 else math.inf
    fixed_flops = flops_before - sum(choices[0].flops for _, choices in planned)

    correction = 1.0  # measured / predicted latency of the last plan timed

    def efficiency(saved_ms: float, flops: float) -> float:
        return model_ms_before / max(correction * (model_ms_before - saved_ms), 1e-9) * flops / flops_before

    def totals(indices: list[int]) -> tuple[float, float, float, float]:
        """(ms saved, FLOPs, budget cost, damage) of a plan."""
        saved = sum(choices[0].latency_ms - choices[i].latency_ms for (_, choices), i in zip(planned, indices))
        flops = fixed_flops + sum(choices[i].flops for (_, choices), i in zip(planned, indices))
        chosen = [group[i] for group, i in zip(groups, indices)]
        return saved, flops, sum(o.cost for o in chosen), sum(o.damage for o in chosen)

    def plan_efficiency(indices: list[int]) -> float:
        return efficiency(*totals(indices)[:2])

    def switches(indices: list[int]):
        """(layer, option, extra damage, efficiency after) for every single-layer switch within the budget and the damage ceiling."""
        saved, flops, cost, damage = totals(indices)
        for k, (group, (_, choices)) in enumerate(zip(groups, planned)):
            now = choices[indices[k]]
            for j, choice in enumerate(choices):
                extra = group[j].damage - group[indices[k]].damage
                if j != indices[k] and cost + group[j].cost - group[indices[k]].cost <= capacity and damage + extra <= ceiling:
                    after = efficiency(saved + now.latency_ms - choice.latency_ms, flops + choice.flops - now.flops)
                    yield k, j, extra, after

    def worth_its_damage(indices: list[int]) -> bool:
        """Short of the target, a repair is priced pro rata: it must close at least the share of the gap from the
        FLOP plan's efficiency to the target that it spends of the damage allowance (the ceiling)."""
        base = plan_efficiency(plan)
        gained = (plan_efficiency(indices) - base) / max(target - base, 1e-12)
        spent = (totals(indices)[3] - flop_plan_damage) / max(ceiling - flop_plan_damage, 1e-12)
        return gained >= spent

    state = list(plan)
    start = plan_efficiency(state)
    path: list[list[int]] = []
    for round_ in range(max(options.measure_rounds, 0) + 1):
        state, _, steps = repair(state, switches, plan_efficiency(state), target)
        path += steps  # every round's steps: a measured correction can put the target out of reach later
        if round_ == options.measure_rounds:
            break
        ratio = measure(planned, state) / max(model_ms_before - totals(state)[0], 1e-9)
        if not 0.5 <= ratio <= 2.0 or abs(ratio - correction) <= 0.03 * correction:
            break  # a disturbed measurement, or the prediction already holds
        correction = ratio  # measured / summed layer times: the efficiency below is now the measured one
        if plan_efficiency(state) >= target:
            break
    reached = plan_efficiency(state)
    if reached < target:
        if options.repair_damage > 0:
            kept = max((s for s in [plan, *path] if worth_its_damage(s)), key=plan_efficiency)
            warn(
                f"fxdecomp: no plan under this budget is predicted to reach efficiency {target:g} within "
                f"{options.repair_damage:g}x the FLOP plan's damage (the most efficient found: {reached:.3f}, at "
                f"{totals(state)[3] / max(flop_plan_damage, 1e-12):.2f}x); keeping the most efficient plan that covers "
                f"at least as large a share of the way to the target as of that damage allowance: "
                f"{plan_efficiency(kept):.3f}, at {totals(kept)[3] / max(flop_plan_damage, 1e-12):.2f}x"
            )
            state = list(kept)
        else:
            warn(
                f"fxdecomp: no plan under this budget is predicted to reach efficiency {target:g}; "
                f"keeping the most efficient found, {reached:.3f}"
            )
    log.info(
        "latency-following plan: predicted efficiency %.3f (FLOP plan: %.3f), damage %.4g (FLOP plan: %.4g)",
        plan_efficiency(state), start, totals(state)[3], flop_plan_damage,
    )
    return state


def repair(state: list[int], switches, current: float, target: float) -> tuple[list[int], float, list[list[int]]]:
    """Greedy switches up to the target efficiency, then damage-lowering ones that keep it (see follow_latency).

    Returns the plan, its efficiency, and the plans after each greedy step toward the target (for
    follow_latency to choose from when the target is out of reach)."""
    state, path = list(state), []
    while current < target:
        moves = [(damage / (after - current), k, j, after) for k, j, damage, after in switches(state) if after > current + 1e-12]
        if not moves:  # the target is out of reach: follow_latency decides what to keep
            return state, current, path
        _, k, j, current = min(moves)
        state[k] = j
        path.append(list(state))
    while True:  # spend what is left on damage, keeping the target
        moves = [(damage, k, j, after) for k, j, damage, after in switches(state) if damage < 0 and after >= target]
        if not moves:
            return state, current, path
        _, k, j, current = min(moves)
        state[k] = j
