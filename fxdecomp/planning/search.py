"""The global plan: every candidate's options on the grid, one multiple-choice knapsack, then latency repairs.

For every candidate the options are keep, or each allowed method on a grid of
ranks (`fxdecomp.planning.grid`); the knapsack (`fxdecomp.planning.solver`)
picks one option per candidate within the budget's capacity at the least summed
damage. With ``min_efficiency`` the FLOP plan is repaired toward a measured
speed-up, and a latency plan is re-made when its measurement misses the budget
(`fxdecomp.planning.latency`). The whole model's cost counts, undecomposable ops included.

Example::

    decisions = search(ctx, methods, plan_options, total=cost.flops, round_to=1)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from ..graph.candidates import Candidate
from ..layer_spec import LAYER_TYPES
from ..progress import Progress
from ..result import Decision
from .budget import unreachable
from .grid import Choice, LayerMs, decision, keep_choice, option_grid
from .latency import follow_latency, follows_latency, replan_on_measurement
from .solver import Infeasible, Option, solve_mckp
from .tied import expand, tie_experts
from ..capture.experts import expert_of, stacks_of
from ..user_warnings import warn

# A decomposition must buy something: at equal damage, keeping the layer wins.
TIE_BREAK = 1e-12


def search(
    ctx,
    methods: Sequence[str],
    options: Any,
    *,
    total: float,
    round_to: int,
    layer_ms: LayerMs | None = None,
    measure: Callable[[dict[str, Decision]], float] | None = None,
    latency_before_ms: float | None = None,
    score: Callable[[Candidate, Choice], float] | None = None,
) -> dict[str, Decision]:
    """One `Decision` per candidate (graph order) meeting ``ctx.budget`` at the least predicted damage.

    ``total`` is the whole model's cost in the budget's metric; ``options`` the plan
    pass's Options; ``layer_ms`` times a candidate's options (None: not timed);
    ``measure`` times a set of decisions applied to the reference, in ms of
    ``latency_before_ms``'s timing. Raises `BudgetError` (with ``smallest_reachable``)
    when no plan fits.
    """
    budget = ctx.budget
    metric = budget.metric
    groups, planned, fixed = [], [], total
    decisions: dict[str, Decision] = {}
    progress = Progress("planning layer", len(ctx.candidates), ctx.progress)
    stacks = next((stacks_of(c.sites[0].node.graph.owning_module) for c in ctx.candidates.values() if c.sites), {})
    for candidate in ctx.candidates.values():
        progress.step(candidate.name)
        keep = keep_choice(candidate, layer_ms)
        fixed -= keep.cost(metric)
        unrouted = keep.flops == 0 and expert_of(stacks, candidate.name) is not None
        choices = [] if candidate.excluded else option_grid(
            ctx, candidate, methods, options, metric=metric, keep=keep, round_to=round_to, layer_ms=layer_ms, score=score,
            unrouted=unrouted,
        )
        if not choices:
            decisions[candidate.name] = decision(candidate, keep, "hooks" if candidate.hooks else "excluded" if candidate.excluded else "no cheaper option")
            fixed += keep.cost(metric)
            continue
        choices = [keep, *choices]
        groups.append([Option(o.cost(metric), o.predicted_damage() + (i > 0) * TIE_BREAK) for i, o in enumerate(choices)])
        planned.append((candidate, choices))
    progress.__exit__()
    if not ctx.candidates or all(c.excluded for c in ctx.candidates.values()):
        why = _no_candidate_reason(ctx) if not ctx.candidates else "has every candidate layer excluded"
        warn(f"fxdecomp: the model {why}; it is returned unchanged")
        groups, planned = [], []
        capacity = 0.0
    else:
        capacity = budget.fraction * total - fixed

    planned, groups = tie_experts(planned, groups, metric, TIE_BREAK, stacks)  # a stack's experts at one option

    def measure_plan(planned_, plan: list[int]) -> float:
        return measure({
            member.name: decision(member, chosen, "")
            for (c, choices), i in zip(planned_, plan) if i > 0 for member, chosen in expand(c, choices[i])
        })

    try:
        plan = solve_mckp(groups, capacity, max_front=options.max_front)
        if follows_latency(options, metric) and planned:
            plan = follow_latency(
                groups, planned, plan, capacity,
                model_ms_before=latency_before_ms, flops_before=ctx.flops_before, options=options, measure=measure_plan,
            )
        if metric == "latency" and planned and options.replan_tolerance > 0:
            plan = replan_on_measurement(groups, planned, plan, fixed, budget.fraction * total, options, measure_plan)
    except Infeasible as exc:
        excluded = [c.name for c in ctx.candidates.values() if c.excluded]
        raise unreachable(exc, fixed, total, budget, ctx.refused, excluded) from None
    for (candidate, choices), index in zip(planned, plan):
        for member, chosen in expand(candidate, choices[index]):
            decisions[member.name] = decision(member, chosen, "budget" if index == 0 else "")
    return {c.name: decisions[c.name] for c in ctx.candidates.values()}


def _no_candidate_reason(ctx) -> str:
    """Why no layer is a candidate: every one refused (with its reason), none in the model, or every one inside a
    module the graph calls as a whole."""
    refused = ctx.refused if ctx.has("refused") else {}
    if refused:
        listed = "; ".join(f"{name}: {reason}" for name, reason in list(refused.items())[:3])
        more = f"; and {len(refused) - 3} more" if len(refused) > 3 else ""
        return f"has {len(refused)} Conv/Linear layer(s), none of which fxdecomp can decompose ({listed}{more})"
    layers = [n for n, m in ctx.source_model.named_modules() if isinstance(m, LAYER_TYPES)] if ctx.source_model is not None else []
    if not layers:
        return "has no Conv2d or Linear layer to decompose"
    graph = ctx.reference if ctx.reference is not None else None
    opaque = sorted({
        node.target for node in (graph.graph.nodes if graph is not None else ())
        if node.op == "call_module" and any(name.startswith(f"{node.target}.") for name in layers)
    })
    where = f"inside {', '.join(repr(o) for o in opaque[:3])}, which the captured graph calls as a whole" if opaque else "where the captured graph does not show them"
    return (f"has {len(layers)} Conv/Linear layer(s) but none is called where fxdecomp can decompose it (they run {where}); "
            "compress the module that holds them, or unwrap it")
