"""The plan pass: one global choice of method and ranks per candidate under the budget.

For every candidate it lists the options (keep, or each allowed method on a grid
of ranks), each with its cost (FLOPs, 2 per multiply-add, over every call;
parameters; or onnxruntime milliseconds measured per layer) and damage (the
squared predicted relative error; with output-aware calibration, that times the
layer's output energy as the model's outputs see it, so damages of different
layers are in one unit; or the score drop of a sensitivity callback),
drops options that are not cheaper than the layer, and solves the multiple-choice
knapsack (`fxdecomp.planning.solver`). The whole model's cost counts, undecomposable ops included.

With ``min_efficiency`` a FLOP (or parameter) plan is also made to turn into
latency: every option is timed in onnxruntime, and if the plan's predicted
efficiency (speed-up / FLOP reduction, from the measured model minus the
replaced layers plus their replacements) falls short, the plan is repaired one
layer switch at a time, the switch that buys the most efficiency per unit of
damage first, until it holds (`fxdecomp.planning.latency.follow_latency`). Layers whose latency is out of proportion to
their FLOPs, such as VGG-16's memory-bound classifier, are then decomposed
too; the FLOP budget still holds.

The repair raises the plan's summed damage to at most ``repair_damage`` times the
FLOP plan's, so it never overrides a sensitivity callback that scores an option
far worse than the plan.

With ``latency_model = "static"`` (the default recipe) those latencies are not
timed but predicted by `fxdecomp.onnxrt.static_model.StaticLatency` (three probe
layers timed once per CPU and thread count, cached on disk), the model's latency
before is the sum of its candidates' predictions, and nothing is re-timed; a
latency budget, a device table or another execution provider always times.
``round_to = 0`` rounds ranks to this CPU's SIMD block (`preferred_rank_multiple`),
adapted to small bonds (`fxdecomp.planning.grid.bond_multiple`).

This pass is the wrapper: the planning itself is plain functions in
`fxdecomp.planning`; the pass owns the onnxruntime timings (the reference
model, each option, each planned variant) and hands them in as functions.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import warnings
from dataclasses import dataclass, field
from typing import Any

from torch.fx.passes.infra.pass_base import PassResult

from ..errors import BudgetError, RecipeError
from ..graph.rewrite import rewrite_graph
from ..latency import LayerLatency, compare_models_ms, model_ms
from ..onnxrt import LatencyTable, measured_rank_multiple, preferred_rank_multiple
from ..onnxrt.static_model import StaticLatency
from ..onnxrt.table import LatencyTableError
from ..planning.budget import allowed_methods, model_total
from ..planning.factors import FIT_MODES
from ..planning.grid import Choice, rank_grid  # noqa: F401  (re-exported)
from ..planning.latency import follows_latency, measures_latency
from ..planning.replay import replay
from ..planning.search import TIE_BREAK, search  # noqa: F401  (re-exported)
from ..planning.sensitivity import score_drops
from ..records import LatencyRecord, Plan
from .base import Pass, register_pass


log = logging.getLogger("fxdecomp")
LATENCY_MODELS = ("measured", "static")


def auto_round_to(options) -> int:
    """The plan's rank multiple: ``round_to``, or with ``round_to = 0`` this CPU's SIMD block (`preferred_rank_multiple`)."""
    return options.round_to if options.round_to >= 1 else preferred_rank_multiple(options.latency_threads)


@register_pass
class PlanPass(Pass):
    name = "plan"
    requires = ("candidates", "cost")
    provides = ("plan", "latency")

    @dataclass(frozen=True)
    class Options:
        grid: int = 24  # rank grid points per method
        cp_grid: int = 4  # CP needs an ALS run per rank: a coarser grid
        sensitivity_grid: int = 6  # ranks per method scored by the sensitivity callback
        round_to: int = 1  # round ranks up to a multiple (8 or 16 suit SIMD kernels); 0: this CPU's SIMD block
        max_front: int = 50_000  # Pareto front size beyond which the solver thins it (see planner)
        latency_grid: int = 6  # ranks per method measured in onnxruntime (latency budgets)
        latency_threads: int = 1  # onnxruntime intra-op threads of the target
        latency_filter: bool = False  # drop options that measure no faster than their layer, whatever the budget
        min_efficiency: float = 0.0  # FLOP / parameter budgets: predicted speed-up / FLOP reduction to reach (0: off)
        repair_damage: float = 2.0  # min_efficiency: the repaired plan's damage at most this times the FLOP plan's (0: no limit)
        replan_tolerance: float = 0.03  # latency budgets: re-plan if the measured plan misses by more (0: never)
        measure_rounds: int = 2  # latency budgets and min_efficiency: plans timed whole to correct the layer sum
        provider: str = ""  # onnxruntime execution provider of latency timings ("": the CPU provider, or the table's)
        provider_options: dict[str, Any] = field(default_factory=dict)  # that provider's options
        latency_table: str = ""  # a table measured on the device (device_bench.py): plan on it instead of timing here
        fit: str = "data"  # with calibration: "data" fits every data-aware method's factors, "svd" only svd's, "weights" none
        # Where FLOP / parameter plans get option latencies (latency_filter, min_efficiency): "measured" times each in
        # onnxruntime (cached); "static" predicts them (fxdecomp.onnxrt.static_model, calibrated once per CPU, cached).
        latency_model: str = "measured"

    def run(self, gm):
        ctx, options = self.context, self.options
        self._timer = None  # the per-layer onnxruntime timer, made on first use
        if options.fit not in FIT_MODES:
            raise RecipeError(f"plan: option fit={options.fit!r} is not one of {list(FIT_MODES)}")
        if options.repair_damage != 0 and options.repair_damage < 1:
            raise RecipeError(
                f"plan: option repair_damage={options.repair_damage!r} must be 0 (no limit) or at least 1 (below 1 the "
                "FLOP plan itself is over the ceiling and nothing can be repaired)"
            )
        ctx.factorizations.fit = options.fit  # read by every later factorisation (the rewrite's too)
        if ctx.fixed_plan is not None:
            ctx.provide("plan", Plan(replay(ctx, ctx.fixed_plan)))
            ctx.provide("latency", LatencyRecord(None, options.latency_threads, provider=options.provider, provider_options=options.provider_options))
            return PassResult(gm, False)
        if ctx.budget is None:
            raise BudgetError("the plan pass needs a budget (or a saved plan to re-apply); give compress(..., budget=...)")
        metric = ctx.budget.metric
        if options.latency_model not in LATENCY_MODELS:
            raise RecipeError(f"plan option latency_model must be one of {LATENCY_MODELS}, got {options.latency_model!r}")
        if self._static(metric):
            return self._run_static(gm)
        from_table = bool(options.latency_table)
        before_ms = None
        if metric == "latency" or follows_latency(options, metric):
            before_ms = self._model_ms_before()
        timed = measures_latency(options, metric)
        # The rank multiple the target rewards, from its timings (cached here, or the device table's). This CPU's
        # SIMD block (round_to = 0) is a prior for this CPU only, not for a device table or another provider.
        floor = auto_round_to(options) if self._for_this_cpu() or options.round_to != 0 else 1
        round_to = max(floor, measured_rank_multiple(self.timer)) if timed else floor

        def measure(decisions):
            """onnxruntime latency of the reference with ``decisions`` applied, in units of the first timing.

            The reference is timed again, interleaved with it: the ratio of the two, times
            the model latency measured when planning began, cancels the machine's drift
            (on 2 shared cores one model's median moves by 5-10 % from minute to minute).
            """
            variant = copy.deepcopy(ctx.reference)
            rewrite_graph(variant, ctx, decisions)
            reference_ms, variant_ms = compare_models_ms(
                ctx.reference, variant, ctx.example_inputs, options.latency_threads,
                provider=options.provider or None, provider_options=options.provider_options,
            )
            return variant_ms / reference_ms * before_ms

        decisions = search(
            ctx,
            allowed_methods(ctx.methods),
            # A table's device cannot be timed from here: no re-plan on measurement.
            dataclasses.replace(options, measure_rounds=0, replan_tolerance=0.0) if from_table else options,
            total=model_total(metric, ctx.cost, before_ms),
            round_to=round_to,
            layer_ms=self._layer_ms if timed else None,
            measure=measure,
            latency_before_ms=before_ms,
            score=score_drops(ctx) if ctx.sensitivity is not None else None,
        )
        predicted_after = None
        if from_table and before_ms is not None:  # the device's latency, predicted from the table
            predicted_after = before_ms - sum(
                self._layer_ms(ctx.candidates[name], None, ()) - self._layer_ms(ctx.candidates[name], d.method, d.ranks)
                for name, d in decisions.items()
                if d.decomposed
            )
        ctx.provide("plan", Plan(decisions))
        ctx.provide(
            "latency",
            LatencyRecord(
                before_ms, options.latency_threads, self._timer, options.provider, options.provider_options, predicted_after
            ),
        )
        return PassResult(gm, False)

    def _static(self, metric: str) -> bool:
        """Plan on the static latency model: asked for, a FLOP or parameter budget, on this machine's CPU provider."""
        options = self.options
        return (
            options.latency_model == "static" and metric != "latency" and measures_latency(options, metric)
            and self._for_this_cpu()
        )

    def _for_this_cpu(self) -> bool:
        """The plan's target is the CPU running compress: no device table, onnxruntime's CPU provider."""
        return not self.options.latency_table and self.options.provider in ("", "CPUExecutionProvider")

    def _run_static(self, gm):
        """The FLOP / parameter plan with option latencies predicted by `StaticLatency`: nothing is timed but its probes.

        The model's latency before is the sum of its candidates' predictions (the rest of the model
        is taken as fixed and small); the plan is never re-timed (``measure_rounds`` 0).
        """
        ctx, options = self.context, self.options
        self._timer = StaticLatency(threads=options.latency_threads)
        before_ms = sum(self._layer_ms(c, None, ()) for c in ctx.candidates.values())
        with warnings.catch_warnings(record=True) as caught:  # a prediction short of the target: logged, not warned
            warnings.simplefilter("always")
            try:
                decisions = self._search_static(before_ms)
            except BudgetError:
                # The budget comes first: rounded ranks and options predicted faster than their layer cannot reach
                # it (small layers), so plan on FLOPs alone, on every rank; its error names the smallest reachable.
                log.warning("fxdecomp: no plan on rounded, predicted-faster options reaches this budget; planned on FLOPs alone")
                decisions = self._search_flops_only()
        for warning in caught:
            if "predicted to reach efficiency" in str(warning.message):
                log.info("%s", warning.message)
            else:
                warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
        ctx.provide("plan", Plan(decisions))
        ctx.provide("latency", LatencyRecord(None, options.latency_threads, self._timer))
        return PassResult(gm, False)

    def _search_flops_only(self):
        ctx, options = self.context, self.options
        flops_only = dataclasses.replace(options, round_to=1, min_efficiency=0.0, latency_filter=False)
        return search(
            ctx, allowed_methods(ctx.methods), flops_only, total=model_total(ctx.budget.metric, ctx.cost, None), round_to=1,
            score=score_drops(ctx) if ctx.sensitivity is not None else None,
        )

    def _search_static(self, before_ms: float):
        ctx, options = self.context, self.options

        def measure(decisions):
            raise AssertionError("a static plan is never timed")  # measure_rounds is 0

        # Predictions cost arithmetic only: the full rank grid, not the coarser one (latency_grid) timing needs.
        predicted = dataclasses.replace(
            options, measure_rounds=0, replan_tolerance=0.0, latency_grid=max(options.grid, options.latency_grid)
        )
        return search(
            ctx,
            allowed_methods(ctx.methods),
            predicted,
            total=model_total(ctx.budget.metric, ctx.cost, None),
            round_to=auto_round_to(options),
            layer_ms=self._layer_ms,
            measure=measure,
            latency_before_ms=before_ms,
            score=score_drops(ctx) if ctx.sensitivity is not None else None,
        )

    @property
    def timer(self):
        """Where latencies come from: the device's table (``latency_table``), else onnxruntime here (cached on disk)."""
        if self._timer is None:
            options = self.options
            if options.latency_table:
                table = LatencyTable(options.latency_table)
                threads = options.latency_threads if options.latency_threads != 1 else None
                table.check_setup(options.provider or None, options.provider_options or None, threads)
                self._timer = table
            else:
                self._timer = LayerLatency(
                    threads=options.latency_threads, provider=options.provider or None, provider_options=options.provider_options
                )
        return self._timer

    def _model_ms_before(self) -> float:
        """The whole model's latency: from the device's table, or timed here on the plan's provider."""
        timer, ctx, options = self.timer, self.context, self.options  # a bad provider or table fails here, before any export
        if options.latency_table:
            return timer.model_ms([tuple(x.shape) for x in ctx.example_inputs])
        provider = dict(provider=options.provider or None, provider_options=options.provider_options)
        return model_ms(ctx.reference, ctx.example_inputs, threads=options.latency_threads, **provider)

    def _layer_ms(self, candidate, method, ranks) -> float:
        """The layer's (or an option's) latency over its call sites: timed here (cached on disk), or from the table."""
        try:
            return self.timer.sites_ms(candidate.spec, [site.input_shape for site in candidate.sites], method, ranks)
        except LatencyTableError as exc:
            raise LatencyTableError(f"layer {candidate.name!r}: {exc}") from None
