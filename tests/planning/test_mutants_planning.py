"""Tests written to kill mutation-testing survivors in fxdecomp/planning/ and passes/plan.py
(tools/mutation/run.py planning).
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import fxdecomp
import fxdecomp.passes.plan as plan_pass
from fxdecomp.passes.plan import PlanPass

from fxdecomp.examples.vision import VGG


# "static": the default recipe's static-latency plan; "flops-only": the FLOP plan of run() (nothing timed).
@pytest.mark.parametrize("plan_options", [{}, {"min_efficiency": 0.0, "round_to": 1}], ids=["static", "flops-only"])
def test_sensitivity_scores_the_reference_once_then_each_option_with_only_its_layer_decomposed(plan_options):
    torch.manual_seed(0)
    model, x = VGG().eval(), torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = model(x)
    seen = []

    def score(module):
        """A user's metric: minus the relative output error against the original model."""
        with torch.no_grad():
            error = float((module(x) - expected).norm() / expected.norm())
        seen.append((set(module.state_dict()), error))
        return -error

    pipeline = fxdecomp.load_recipe("default").with_options(plan=plan_options)
    result = fxdecomp.compress(model, (x,), budget=0.5, methods=["svd"], sensitivity=score, pipeline=pipeline)
    assert result.flops_after <= 0.5 * result.flops_before
    (baseline_keys, baseline_error), *variants = seen
    assert baseline_error < 1e-6  # the baseline is the reference itself, scored first and once
    assert len(variants) > len(result.decisions)
    names = {d.name for d in result.decisions}
    for keys, error in variants:
        gone = {k.rsplit(".", 1)[0] for k in baseline_keys - keys}
        assert len(gone) == 1 and gone <= names  # exactly one layer decomposed in each scored variant
        assert error > 0.0


def test_model_latency_before_is_timed_on_the_plans_provider(monkeypatch):
    calls = []

    def model_ms(reference, example_inputs, *, threads, provider, provider_options):
        calls.append((reference, example_inputs, threads, provider, provider_options))
        return 7.5

    monkeypatch.setattr(plan_pass, "model_ms", model_ms)
    reference, inputs = torch.nn.Linear(2, 2), (torch.randn(1, 2),)
    ctx = SimpleNamespace(reference=reference, example_inputs=inputs)
    for provider, expected in (("", None), ("CPUExecutionProvider", "CPUExecutionProvider")):
        options = dict(provider=provider, provider_options={"intra_op_num_threads": 1}, latency_threads=3)
        planner = PlanPass(ctx, **options)
        planner._timer = None  # as run() starts
        assert planner._model_ms_before() == 7.5
        assert calls.pop() == (reference, inputs, 3, expected, {"intra_op_num_threads": 1})


def test_follow_latency_rescales_sub_millisecond_predictions_by_measured_over_predicted():
    """A 0.5 ms model: the plan's measured latency is 1.5x the layer sum, so the corrected efficiency of the
    first repair (1.286 / 1.5 < 1.2) misses the target and the repair goes on to cut the second layer too."""
    import pytest

    from fxdecomp.planning.grid import Choice
    from fxdecomp.planning.latency import follow_latency
    from fxdecomp.planning.solver import Option

    def choice(latency_ms, flops):
        return Choice("svd", (1,), flops, 0, 0.0, latency_ms=latency_ms)

    planned = [("a", [choice(0.2, 40), choice(0.05, 30)]), ("b", [choice(0.2, 40), choice(0.15, 35)])]
    groups = [[Option(40, 0.0), Option(30, 1.0)], [Option(40, 0.0), Option(35, 0.1)]]
    timed = []

    def measure(planned_, state):
        timed.append(list(state))
        saved = sum(c[0].latency_ms - c[i].latency_ms for (_, c), i in zip(planned_, state))
        return 1.5 * (0.5 - saved)

    options = SimpleNamespace(min_efficiency=1.2, measure_rounds=2, repair_damage=0.0)  # 0: no damage ceiling
    with pytest.warns(UserWarning, match="no plan under this budget is predicted to reach efficiency 1.2"):
        state = follow_latency(groups, planned, [0, 0], 1000.0, model_ms_before=0.5, flops_before=100,
                               options=options, measure=measure)
    # Predicted (uncorrected) efficiencies: [1, 0] 0.5 / 0.35 * 0.9 = 1.286, [1, 1] 0.5 / 0.3 * 0.85 = 1.417.
    assert timed == [[1, 0], [1, 1]]
    assert state == [1, 1]


def test_a_plan_of_the_wrong_type_is_named_in_the_error():
    import pytest

    from fxdecomp.errors import InvalidInputError
    from fxdecomp.planning.replay import normalize_plan

    for bad, name in ((42, "int"), (3.5, "float"), ("svd", "str")):
        with pytest.raises(InvalidInputError, match=f"^cannot read a plan from {name}; give result.decisions"):
            normalize_plan(bad)


def test_decisions_record_the_calls_and_why_a_layer_was_kept():
    from fxdecomp.examples.vision import SharedLayer

    torch.manual_seed(0)
    model, x = SharedLayer().eval(), torch.randn(2, 3, 16, 16)
    result = fxdecomp.compress(model, (x,), budget=0.9, methods=["svd"], exclude=["head"])
    sites = {}  # call sites counted on torch.fx's own trace
    for node in torch.fx.symbolic_trace(model).graph.nodes:
        if node.op == "call_module":
            sites[node.target] = sites.get(node.target, 0) + 1
    by_name = {d.name: d for d in result.decisions}
    assert by_name["shared"].calls == sites["shared"] == 2
    assert by_name["head"].reason == "excluded"
    kept = [d for d in result.decisions if not d.decomposed and d.name != "head"]
    assert kept, "budget 0.9 keeps some layer"
    assert all(d.reason == "budget" for d in kept)


def test_output_aware_calibrated_plan_meets_the_budget_and_reports_the_true_error():
    # Runs the calibrated paths of the planner: whitened factorizations, predicted errors on the
    # calibration data, and the output energies that weight them.
    torch.manual_seed(5)
    model, x = VGG().eval(), torch.randn(2, 3, 16, 16)
    batches = [(torch.randn(4, 3, 16, 16),) for _ in range(2)]
    recipe = fxdecomp.load_recipe("default").with_options(calibrate={"output_aware": True})
    result = fxdecomp.compress(model, (x,), budget=0.5, methods=["svd", "tucker2"], calibration=batches, pipeline=recipe)
    assert result.flops_after <= 0.5 * result.flops_before
    assert result.flops_after == fxdecomp.count_flops(result.graph_module, (x,))
    with torch.no_grad():
        expected, got = model(x).double(), result.graph_module(x).double()
    import pytest

    assert result.output_error == pytest.approx(float((got - expected).norm() / expected.norm()), rel=1e-4)
    assert any(d.decomposed for d in result.decisions)


def test_weight_only_factors_get_their_error_measured_on_input_only_calibration():
    """fit="weights" with input-only calibration: the planner's error is the decomposed layer's output error on that data."""
    torch.manual_seed(5)
    model = torch.nn.Sequential(torch.nn.Conv2d(6, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(16, 16, 3, padding=1)).eval()
    batches = [(torch.randn(4, 6, 8, 8, generator=torch.Generator().manual_seed(s)),) for s in range(3)]
    recipe = fxdecomp.load_recipe("default").with_options(plan={"fit": "weights"}, calibrate={"output_aware": False})
    result = fxdecomp.compress(model, batches[0], methods=["tucker2"], calibration=batches,
                               plan={"0": ("keep", ()), "2": ("tucker2", (6, 6))}, pipeline=recipe)
    decision = next(d for d in result.decisions if d.name == "2")
    with torch.no_grad():
        inputs = torch.cat([model[1](model[0](b[0])) for b in batches])
        layer, new = model[2], result.graph_module.get_submodule("2")
        bias = layer.bias[None, :, None, None]
        want, got = layer(inputs) - bias, new(inputs) - bias  # the error of W x (what the Gram matrices measure)
    measured = float((got - want).norm() / want.norm())
    assert measured > 0.05  # rank 6 of 16: a real error, not a rounding one
    assert decision.error == pytest.approx(measured, rel=0.1)  # on damped calibration statistics, as in test_fitted_methods


def test_a_budget_rounded_ranks_cannot_reach_falls_back_to_a_flop_plan_and_says_so():
    """8-channel convs with ranks rounded to 16: no rounded option saves FLOPs, so the plan falls back to every rank."""
    import logging

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3, padding=1)).eval()
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("fxdecomp")
    logger.addHandler(handler)
    try:
        result = fxdecomp.compress(model, (torch.randn(1, 8, 8, 8),), budget=0.3,
                                   pipeline=fxdecomp.load_recipe("cpu").with_options(plan={"round_to": 16}))
    finally:
        logger.removeHandler(handler)
    assert result.flops_after <= 0.3 * result.flops_before
    decomposed = [d for d in result.decisions if d.ranks]
    assert decomposed and all(r % 16 for d in decomposed for r in d.ranks)  # ranks below the rounding: the fallback's
    messages = [r.getMessage() for r in records]
    assert any("no plan on rounded, predicted-faster options reaches this budget; planned on FLOPs alone" in m for m in messages), messages
