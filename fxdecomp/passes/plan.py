"""The plan pass: one global choice of method and ranks per candidate under the budget.

For every candidate it lists the options (keep, or each allowed method on a grid
of ranks), each with its cost (FLOPs, 2 per multiply-add, over every call;
parameters; or onnxruntime milliseconds measured per layer) and damage (the
squared predicted relative error; with output-aware calibration, that times the
layer's output energy as the model's outputs see it, so damages of different
layers are in one unit; or the score drop of a sensitivity callback),
drops options that are not cheaper than the layer, and solves the multiple-choice
knapsack (`fxdecomp.planner`). The whole model's cost counts, undecomposable ops included.

With ``min_efficiency`` a FLOP (or parameter) plan is also made to turn into
latency: every option is timed in onnxruntime, and if the plan's predicted
efficiency (speed-up / FLOP reduction, from the measured model minus the
replaced layers plus their replacements) falls short, the plan is repaired one
layer switch at a time, the switch that buys the most efficiency per unit of
damage first, until it holds (`PlanPass._follow_latency`). Layers whose latency is out of proportion to
their FLOPs, such as VGG-16's memory-bound classifier, are then decomposed
too; the FLOP budget still holds.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch.fx.passes.infra.pass_base import PassResult

from .. import meta
from ..cost import FLOPS_PER_MAC, count_params, module_macs
from ..decomposers import all_methods, methods_for
from ..errors import BudgetError, InvalidInputError, UnknownMethodError
from ..latency import LayerLatency, compare_models_ms, model_ms, preferred_rank_multiple
from ..planner import Infeasible, Option, solve_mckp
from ..progress import Progress
from ..ranks import resolve_ranks
from ..result import Decision
from .analysis import factorization, output_energies, predicted_error
from .base import Candidate, Pass, log, register_pass
from .rewrite import rewrite_graph

# A decomposition must buy something: at equal damage, keeping the layer wins.
TIE_BREAK = 1e-12


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


def rank_grid(maxima: tuple[int, ...], steps: int, round_to: int) -> list[tuple[int, ...]]:
    """Ranks proportional to each maximum, on a grid dense at low ranks, rounded up to ``round_to``."""
    fractions = np.unique(np.concatenate([np.geomspace(1 / 64, 1, steps // 2), np.linspace(1 / steps, 1, steps)]))
    grid = []
    for f in fractions:
        ranks = tuple(min(m, max(round_to, math.ceil(math.ceil(f * m) / round_to) * round_to)) for m in maxima)
        if ranks not in grid:
            grid.append(ranks)
    return grid


@register_pass
class PlanPass(Pass):
    name = "plan"

    @dataclass(frozen=True)
    class Options:
        grid: int = 24  # rank grid points per method
        cp_grid: int = 4  # CP needs an ALS run per rank: a coarser grid
        sensitivity_grid: int = 6  # ranks per method scored by the sensitivity callback
        round_to: int = 1  # round ranks up to a multiple (8 or 16 suit SIMD kernels)
        max_front: int = 50_000  # Pareto front size beyond which the solver thins it (see planner)
        latency_grid: int = 6  # ranks per method measured in onnxruntime (latency budgets)
        latency_threads: int = 1  # onnxruntime intra-op threads of the target
        latency_filter: bool = False  # drop options that measure no faster than their layer, whatever the budget
        min_efficiency: float = 0.0  # FLOP / parameter budgets: predicted speed-up / FLOP reduction to reach (0: off)
        replan_tolerance: float = 0.03  # latency budgets: re-plan if the measured plan misses by more (0: never)
        measure_rounds: int = 2  # latency budgets and min_efficiency: plans timed whole to correct the layer sum

    def run(self, gm):
        ctx = self.context
        if ctx.fixed_plan is not None:
            return self._apply_fixed(gm)
        methods = self._allowed_methods()
        metric = ctx.budget.metric
        total = {"flops": ctx.flops_before, "params": ctx.params_before}.get(metric)
        if metric == "latency" or self._follows_latency:
            ctx.extras["latency_before_ms"] = model_ms(ctx.reference, ctx.example_inputs, threads=self.options.latency_threads)
        if metric == "latency":
            total = ctx.extras["latency_before_ms"]
        groups, planned, fixed = [], [], total
        decisions: dict[str, Decision] = {}
        progress = Progress("planning layer", len(ctx.candidates), ctx.progress)
        for candidate in ctx.candidates.values():
            progress.step(candidate.name)
            keep = self._keep(candidate)
            fixed -= keep.cost(metric)
            choices = [] if candidate.excluded else self._choices(candidate, methods)
            if not choices:
                decisions[candidate.name] = self._decision(candidate, keep, "excluded" if candidate.excluded else "no cheaper option")
                fixed += keep.cost(metric)
                continue
            options = [keep, *choices]
            groups.append([Option(o.cost(metric), o.predicted_damage() + (i > 0) * TIE_BREAK) for i, o in enumerate(options)])
            planned.append((candidate, options))
        progress.__exit__()
        if not ctx.candidates or all(c.excluded for c in ctx.candidates.values()):
            why = "has no Conv2d or Linear layer to decompose" if not ctx.candidates else "has every candidate layer excluded"
            warnings.warn(f"fxdecomp: the model {why}; it is returned unchanged", stacklevel=2)
            groups, planned = [], []
            capacity = 0.0
        else:
            capacity = ctx.budget.fraction * total - fixed
        try:
            plan = solve_mckp(groups, capacity, max_front=self.options.max_front)
            if self._follows_latency and planned:
                plan = self._follow_latency(groups, planned, plan, capacity)
            if metric == "latency" and planned and self.options.replan_tolerance > 0:
                plan = self._replan_on_measurement(groups, planned, plan, fixed, total)
        except Infeasible as exc:
            smallest = (exc.smallest + fixed) / total
            raise BudgetError(
                f"a {metric} budget of {ctx.budget.fraction:g} cannot be reached: the smallest reachable is "
                f"{smallest:.4f} of the model's {metric} (layers that cannot be decomposed keep their cost); "
                f"ask for at least {math.ceil(smallest * 1000) / 1000:g}",
                smallest_reachable=smallest,
            ) from None
        for (candidate, options), index in zip(planned, plan):
            decisions[candidate.name] = self._decision(candidate, options[index], "budget" if index == 0 else "")
        ctx.plan = {c.name: decisions[c.name] for c in ctx.candidates.values()}
        for candidate in ctx.candidates.values():
            for site in candidate.sites:
                site.node.meta[meta.DECISION] = ctx.plan[candidate.name]
        return PassResult(gm, False)

    def _apply_fixed(self, gm):
        """Re-apply a saved plan: same methods and ranks, no search; names must match the model's layers."""
        ctx = self.context
        unknown = sorted(set(ctx.fixed_plan) - set(ctx.candidates))
        if unknown:
            raise InvalidInputError(
                f"the plan names layers this model does not have: {unknown}; known layers: {sorted(ctx.candidates)}"
            )
        for candidate in ctx.candidates.values():
            keep = self._keep(candidate)
            method, ranks = ctx.fixed_plan.get(candidate.name, ("keep", ()))
            choice = keep
            if method != "keep":
                decomposer, state = factorization(ctx, candidate, method)
                if state is None:
                    raise InvalidInputError(f"the plan's method {method!r} does not apply to layer {candidate.name!r}")
                ranks = resolve_ranks(tuple(ranks), decomposer, candidate.spec, state)
                with torch.device("meta"):
                    structure = decomposer.structure(candidate.spec, ranks)
                flops = sum(module_macs(structure, s.input_shape) for s in candidate.sites) * FLOPS_PER_MAC
                choice = Choice(method, ranks, flops, count_params(structure) + candidate.shared_params, predicted_error(ctx, candidate, method, ranks))
            ctx.plan[candidate.name] = self._decision(candidate, choice, "plan")
            for site in candidate.sites:
                site.node.meta[meta.DECISION] = ctx.plan[candidate.name]
        return PassResult(gm, False)

    def _allowed_methods(self) -> tuple[str, ...]:
        known = all_methods()
        methods = tuple(self.context.methods) if self.context.methods is not None else tuple(known)
        unknown = [m for m in methods if m not in known]
        if unknown:
            raise UnknownMethodError(f"unknown method(s) {unknown}; known methods: {known}")
        return methods

    def _keep(self, candidate: Candidate) -> Choice:
        flops = sum(site.node.meta[meta.FLOPS].flops for site in candidate.sites)
        latency = self._latency(candidate, None, ()) if self._measures_latency else None
        return Choice("keep", (), flops, count_params(candidate.layer), 0.0, latency_ms=latency)

    @property
    def _follows_latency(self) -> bool:
        return self.options.min_efficiency > 0 and self.context.budget.metric != "latency"

    @property
    def _measures_latency(self) -> bool:
        return self.context.budget.metric == "latency" or self.options.latency_filter or self._follows_latency

    def _replan_on_measurement(self, groups, planned, plan: list[int], fixed: float, total: float) -> list[int]:
        """Time the planned model; while it misses the latency budget by more than the tolerance, re-plan.

        Layers timed alone do not add up exactly to the model (fusion, caches): the
        measured / predicted ratio of the last plan rescales the layer times for the
        next solve, up to ``measure_rounds`` times.
        """
        ctx = self.context
        target = ctx.budget.fraction * total
        for _ in range(max(self.options.measure_rounds, 1)):
            predicted = fixed + sum(options[i].latency_ms for (_, options), i in zip(planned, plan))
            measured = self._measure(planned, plan)
            log.info("latency plan: predicted %.3g ms, measured %.3g ms, budget %.3g ms", predicted, measured, target)
            if abs(measured - target) <= self.options.replan_tolerance * target or predicted <= 0:
                break
            ratio = measured / predicted
            if not 0.5 <= ratio <= 2.0:  # a disturbed measurement, not a model error: keep the plan
                log.warning("latency plan measured %.3g ms against %.3g ms predicted; not re-planned", measured, predicted)
                break
            scale = ratio  # measured / summed layer times of this plan: the correction for the next solve
            try:  # the layers' share is what the ratio corrects: fixed + options = target / scale
                plan = solve_mckp(groups, target / scale - fixed, max_front=self.options.max_front)
            except Infeasible:
                break
            log.info("latency plan re-made with the layers' times scaled by %.3f", scale)
        return plan

    def _measure(self, planned, plan: list[int]) -> float:
        """onnxruntime latency of the reference with the planned options applied, in units of the first timing.

        The reference is timed again, interleaved with it: the ratio of the two, times
        the model latency measured when planning began, cancels the machine's drift
        (on 2 shared cores one model's median moves by 5-10 % from minute to minute).
        """
        ctx = self.context
        decisions = {c.name: self._decision(c, options[i], "") for (c, options), i in zip(planned, plan) if i > 0}
        variant = copy.deepcopy(ctx.reference)
        rewrite_graph(variant, ctx, decisions)
        reference_ms, variant_ms = compare_models_ms(ctx.reference, variant, ctx.example_inputs, self.options.latency_threads)
        return variant_ms / reference_ms * ctx.extras["latency_before_ms"]

    def _follow_latency(self, groups, planned, plan: list[int], capacity: float) -> list[int]:
        """Repair the FLOP plan until its predicted efficiency reaches min_efficiency, at the least damage.

        Greedy repair: switch one layer's option at a time, within the budget, taking
        the switch that raises the predicted efficiency (L0 / L) * (F / F0) most per
        unit of damage (switches that raise it and lower the damage first), until it
        reaches the target. A memory-bound classifier, which saves latency without
        FLOPs, goes first; cutting convs further, which lowers latency and FLOPs
        alike, does not help and is not chosen. Then spend what is left: switches
        that lower the damage while the budget and the target both hold. Small steps
        from the FLOP plan keep the FLOPs at the budget (a Lagrangian price on the
        constraint jumps, on this discrete problem, to far cheaper plans). If no
        switch reaches the target, the most efficient plan found is kept, with a warning.

        Layers timed alone do not add up exactly to the model (at 2 threads VGG-16's
        plan ran 37 % slower than predicted): the planned model is timed, the
        prediction rescaled by measured / predicted, and the repair repeated on
        the rescaled figures, up to ``measure_rounds`` times.
        """
        ctx, target = self.context, self.options.min_efficiency
        model_ms_before, flops_before = ctx.extras["latency_before_ms"], ctx.flops_before
        fixed_flops = flops_before - sum(options[0].flops for _, options in planned)

        correction = 1.0  # measured / predicted latency of the last plan timed

        def efficiency(saved_ms: float, flops: float) -> float:
            return model_ms_before / max(correction * (model_ms_before - saved_ms), 1e-9) * flops / flops_before

        def totals(indices: list[int]) -> tuple[float, float, float]:
            """(ms saved, FLOPs, budget cost) of a plan."""
            saved = sum(options[0].latency_ms - options[i].latency_ms for (_, options), i in zip(planned, indices))
            flops = fixed_flops + sum(options[i].flops for (_, options), i in zip(planned, indices))
            return saved, flops, sum(group[i].cost for group, i in zip(groups, indices))

        def switches(indices: list[int]):
            """(layer, option, extra damage, efficiency after) for every single-layer switch within the budget."""
            saved, flops, cost = totals(indices)
            for k, (group, (_, options)) in enumerate(zip(groups, planned)):
                now = options[indices[k]]
                for j, choice in enumerate(options):
                    if j != indices[k] and cost + group[j].cost - group[indices[k]].cost <= capacity:
                        after = efficiency(saved + now.latency_ms - choice.latency_ms, flops + choice.flops - now.flops)
                        yield k, j, group[j].damage - group[indices[k]].damage, after

        state = list(plan)
        start = efficiency(*totals(state)[:2])
        for round_ in range(max(self.options.measure_rounds, 0) + 1):
            state, _ = self._repair(state, switches, efficiency(*totals(state)[:2]), target)
            if round_ == self.options.measure_rounds:
                break
            ratio = self._measure(planned, state) / max(model_ms_before - totals(state)[0], 1e-9)
            if not 0.5 <= ratio <= 2.0 or abs(ratio - correction) <= 0.03 * correction:
                break  # a disturbed measurement, or the prediction already holds
            correction = ratio  # measured / summed layer times: the efficiency below is now the measured one
            if efficiency(*totals(state)[:2]) >= target:
                break
        log.info("latency-following plan: predicted efficiency %.3f (FLOP plan: %.3f)", efficiency(*totals(state)[:2]), start)
        return state

    @staticmethod
    def _repair(state: list[int], switches, current: float, target: float) -> tuple[list[int], float]:
        """Greedy switches up to the target efficiency, then damage-lowering ones that keep it (see _follow_latency)."""
        state = list(state)
        while current < target:
            moves = [(damage / (after - current), k, j, after) for k, j, damage, after in switches(state) if after > current + 1e-12]
            if not moves:
                warnings.warn(
                    f"fxdecomp: no plan under this budget is predicted to reach efficiency {target:g}; "
                    f"keeping the most efficient found, {current:.3f}",
                    stacklevel=4,
                )
                return state, current
            _, k, j, current = min(moves)
            state[k] = j
        while True:  # spend what is left on damage, keeping the target
            moves = [(damage, k, j, after) for k, j, damage, after in switches(state) if damage < 0 and after >= target]
            if not moves:
                return state, current
            _, k, j, current = min(moves)
            state[k] = j

    def _latency(self, candidate: Candidate, method: str | None, ranks: tuple[int, ...]) -> float:
        """The layer's (or an option's) onnxruntime latency over its call sites, cached on disk."""
        ctx = self.context
        if "layer_latency" not in ctx.extras:
            ctx.extras["layer_latency"] = LayerLatency(threads=self.options.latency_threads)
        shapes = [site.input_shape for site in candidate.sites]
        return ctx.extras["layer_latency"].sites_ms(candidate.spec, shapes, method, ranks)

    def _choices(self, candidate: Candidate, methods: tuple[str, ...]) -> list[Choice]:
        keep = self._keep(candidate)
        metric = self.context.budget.metric
        round_to = self.options.round_to
        if self._measures_latency:
            round_to = max(round_to, preferred_rank_multiple(self.options.latency_threads))
        choices = []
        for method in methods:
            if method not in methods_for(candidate.kind):
                continue
            decomposer, state = factorization(self.context, candidate, method)
            if state is None:
                continue
            steps = self.options.cp_grid if method == "cp" else self.options.grid
            if self.context.sensitivity is not None:
                steps = min(steps, self.options.sensitivity_grid)
            if self._measures_latency:
                steps = min(steps, self.options.latency_grid)
            for ranks in rank_grid(decomposer.planning_max_ranks(candidate.spec), steps, round_to):
                with torch.device("meta"):
                    structure = decomposer.structure(candidate.spec, ranks)
                flops = sum(module_macs(structure, s.input_shape) for s in candidate.sites) * FLOPS_PER_MAC
                params = count_params(structure) + candidate.shared_params  # a weight another user keeps stays
                if (params >= keep.params) if metric == "params" else (flops >= keep.flops):
                    continue  # never chosen: costs at least as much as the layer
                latency = self._latency(candidate, method, ranks) if self._measures_latency else None
                if latency is not None and latency >= keep.latency_ms:
                    continue  # measured no faster than the layer it would replace
                error = predicted_error(self.context, candidate, method, ranks)
                choice = Choice(method, ranks, flops, params, error, damage=self._output_damage(candidate, error), latency_ms=latency)
                if self.context.sensitivity is not None:
                    choice = dataclasses.replace(choice, damage=self._score_drop(candidate, choice))
                choices.append(choice)
        log.debug("%s: %d options", candidate.name, len(choices))
        return choices

    def _output_damage(self, candidate: Candidate, error: float) -> float | None:
        """error^2 in the unit of the model's outputs (output-aware calibration), else None (error^2)."""
        energies = output_energies(self.context)
        if not energies:
            return None
        # A layer the calibration could not observe counts like an average one.
        energy = energies.get(candidate.name, sum(energies.values()) / len(energies))
        return error**2 * energy

    def _score_drop(self, candidate: Candidate, choice: Choice) -> float:
        """How much the user's score falls when only this layer is decomposed this way (never below 0)."""
        ctx = self.context
        if "baseline_score" not in ctx.extras:
            ctx.extras["baseline_score"] = float(ctx.sensitivity(ctx.reference))
        variant = copy.deepcopy(ctx.reference)
        rewrite_graph(variant, ctx, {candidate.name: self._decision(candidate, choice, "")})
        return max(0.0, ctx.extras["baseline_score"] - float(ctx.sensitivity(variant)))

    def _decision(self, candidate: Candidate, choice: Choice, reason: str) -> Decision:
        keep = self._keep(candidate)
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
