"""Budget(latency=...): the planner plans on onnxruntime measurements of each layer and option."""

import json
import warnings

import pytest
import torch


def test_latency_budget_plans_on_measurements(tmp_path, monkeypatch):
    """Real onnxruntime timings of every layer and option. The budget is set from what the timings reach.

    A budget out of reach names the smallest latency the timed options reach; half way
    between it and 1 the plan must decompose. The whole model's latency is timed once
    and the layers' timings come from the cache the first plan wrote, so the second plan
    sees the same figures: on a shared 2-core machine a fixed budget can be out of reach
    by noise alone (a 0.8 budget once measured 0.90 reachable).
    """
    monkeypatch.setenv("FXDECOMP_CACHE_DIR", str(tmp_path))
    import fxdecomp
    import fxdecomp.passes.plan as plan_module
    from fxdecomp.examples.vision import VGG

    timed = []

    def model_ms_once(*args, **kwargs):
        if not timed:
            timed.append(real_model_ms(*args, **kwargs))
        return timed[0]

    real_model_ms = plan_module.model_ms
    monkeypatch.setattr(plan_module, "model_ms", model_ms_once)
    torch.manual_seed(0)
    model, x = VGG(widths=(32, "M", 64, "M", 64)).eval(), torch.randn(1, 3, 16, 16)
    recipe = fxdecomp.load_recipe("default").with_options(plan={"replan_tolerance": 0.0})  # re-planning: tests below
    with pytest.raises(fxdecomp.BudgetError) as caught:
        fxdecomp.compress(model, (x,), budget=fxdecomp.Budget(latency=0.01), methods=["svd", "tucker2"], pipeline=recipe)
    reachable = caught.value.smallest_reachable
    assert 0 < reachable < 1
    assert (tmp_path / "latency.json").exists()
    budget = round((1 + reachable) / 2, 4)
    result = fxdecomp.compress(model, (x,), budget=fxdecomp.Budget(latency=budget), methods=["svd", "tucker2"], pipeline=recipe)
    assert result.budget == {"latency": budget}
    assert result.latency_before_ms == timed[0] > 0 and result.latency_after_ms > 0
    assert any(d.decomposed for d in result.decisions)
    assert '"latency_before_ms"' in json.dumps(result.to_dict())


@pytest.mark.parametrize("second_ms", [40.0, 100.0], ids=["over the budget", "disturbed"])
def test_a_replan_measured_over_the_budget_never_replaces_one_within_it(second_ms):
    """The first plan is well under its budget, so it is re-planned to spend the slack; the re-plan measures over it."""
    from types import SimpleNamespace

    from fxdecomp.planning.latency import replan_on_measurement
    from fxdecomp.planning.solver import Option, solve_mckp

    keep, cut = SimpleNamespace(latency_ms=10.0), SimpleNamespace(latency_ms=4.0)
    planned = [("a", [keep, cut]), ("b", [keep, cut])]
    groups = [[Option(10.0, 0.0), Option(4.0, 1.0)], [Option(10.0, 0.0), Option(4.0, 1.5)]]
    fixed, target = 2.0, 17.6  # 0.8 of 22 ms: one layer cut
    first = solve_mckp(groups, target - fixed)
    assert first == [1, 0]
    timings = iter([10.0, second_ms])
    options = SimpleNamespace(measure_rounds=2, replan_tolerance=0.03, max_front=50_000)
    assert replan_on_measurement(groups, planned, first, fixed, target, options, lambda _p, _plan: next(timings)) == first


class _MemoryBoundTimer:
    """Synthetic per-layer latency: 1 ms per M multiply-adds plus 0.1 ms per k weights (weights are read per run)."""

    threads = 1

    def __init__(self, threads=1, **_):
        self.threads = threads

    def sites_ms(self, spec, shapes, method=None, ranks=(), options=None):
        from fxdecomp.cost import count_params, module_macs
        from fxdecomp.decomposers import get_decomposer
        from fxdecomp.latency import original_module

        with torch.device("meta"):
            if method is None:
                module = original_module(spec)
            else:
                module = get_decomposer(spec.kind, method).structure(spec, ranks)
        macs = sum(module_macs(module, shape) for shape in shapes)
        return macs / 1e6 + count_params(module) / 1e4


def test_min_efficiency_makes_a_flop_plan_follow_latency(monkeypatch):
    """A memory-bound classifier: negligible FLOPs, most of the latency. FLOPs alone leave it; min_efficiency does not."""
    import fxdecomp
    import fxdecomp.passes.plan as plan_module
    from fxdecomp.layer_spec import layer_spec
    from fxdecomp.examples.vision import VGG

    torch.manual_seed(0)
    model, x = VGG(widths=(32, "M", 64, "M", 64)).eval(), torch.randn(1, 3, 16, 16)
    input_shapes = {}
    def record(module, inputs, _output):
        input_shapes.setdefault(module, tuple(inputs[0].shape))

    hooks = [m.register_forward_hook(record) for m in model.modules()]
    with torch.no_grad():
        model(x)
    for hook in hooks:
        hook.remove()
    timer = _MemoryBoundTimer()
    layers_ms = sum(
        timer.sites_ms(layer_spec(m), [input_shapes[m]]) for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))
    )
    monkeypatch.setattr(plan_module, "LayerLatency", _MemoryBoundTimer)
    monkeypatch.setattr(plan_module, "model_ms", lambda *a, **k: layers_ms + 1.0)
    monkeypatch.setattr(plan_module, "compare_models_ms", lambda *a, **k: (layers_ms + 1.0, layers_ms + 1.0))
    monkeypatch.setattr("fxdecomp.latency.model_ms", lambda *a, **k: 1.0)  # the verify pass's timing

    def compress(min_efficiency):
        recipe = _recipe_with({"min_efficiency": min_efficiency, "round_to": 1})
        return fxdecomp.compress(model, (x,), budget=0.5, methods=["svd"], pipeline=recipe)

    flops_only, following = compress(0.0), compress(0.95)
    assert not any(d.decomposed for d in flops_only.decisions if d.op == "linear")
    assert any(d.decomposed for d in following.decisions if d.op == "linear")
    assert following.flops_after <= 0.5 * following.flops_before
    assert following.flops_ratio >= 0.9 * flops_only.flops_ratio  # repaired, not collapsed to a far cheaper plan
    assert following.latency_before_ms == layers_ms + 1.0

    def predicted_efficiency(result):
        saved = sum(
            timer.sites_ms(layer_spec(m), [input_shapes[m]]) - timer.sites_ms(layer_spec(m), [input_shapes[m]], d.method, d.ranks)
            for name, m in model.named_modules()
            for d in result.decisions
            if d.name == name and d.decomposed
        )
        total = layers_ms + 1.0
        return total / (total - saved) * result.flops_ratio

    assert predicted_efficiency(flops_only) < 0.95 <= predicted_efficiency(following)


def _recipe_with(plan_options):
    import fxdecomp

    return fxdecomp.load_recipe("default").with_options(plan={"latency_model": "measured", **plan_options})


def _leaf_ms(module, x):
    """_MemoryBoundTimer's figure for a whole model: every Conv2d / Linear call, plus 1 ms for the rest."""
    from fxdecomp.cost import count_params, module_macs

    total = [1.0]

    def add(layer, inputs, _output):
        total[0] += module_macs(layer, tuple(inputs[0].shape)) / 1e6 + count_params(layer) / 1e4

    hooks = [m.register_forward_hook(add) for m in module.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    with torch.no_grad():
        module(x)
    for hook in hooks:
        hook.remove()
    return total[0]


@pytest.fixture
def slower_than_its_layers(monkeypatch):
    """(model, x) whose decomposed variants run 25 % slower, whole, than _MemoryBoundTimer's layer sum predicts."""
    import fxdecomp.passes.plan as plan_module
    from fxdecomp.examples.vision import VGG

    torch.manual_seed(0)
    model, x = VGG(widths=(32, "M", 64, "M", 64)).eval(), torch.randn(1, 3, 16, 16)
    original_ms = _leaf_ms(model, x)

    def measured(module, inputs, threads=1, **_):
        ms = _leaf_ms(module, inputs[0])
        return ms if abs(ms - original_ms) < 1e-9 else 1.25 * ms

    monkeypatch.setattr(plan_module, "LayerLatency", _MemoryBoundTimer)
    monkeypatch.setattr(plan_module, "model_ms", measured)
    monkeypatch.setattr(plan_module, "compare_models_ms", lambda a, b, inputs, threads=1, **_: (measured(a, inputs), measured(b, inputs)))
    monkeypatch.setattr("fxdecomp.latency.model_ms", measured)
    return model, x


def test_a_latency_plan_that_measures_slower_than_predicted_is_replanned(slower_than_its_layers):
    """The compressed model runs 25 % slower than its layers timed alone: one re-plan brings it back to the budget."""
    import fxdecomp

    model, x = slower_than_its_layers

    def compress(tolerance):
        recipe = _recipe_with({"replan_tolerance": tolerance, "round_to": 1})
        return fxdecomp.compress(model, (x,), budget=fxdecomp.Budget(latency=0.6), methods=["svd"], pipeline=recipe)

    once, replanned = compress(0.0), compress(0.03)
    assert once.latency_after_ms / once.latency_before_ms > 0.6 * 1.1
    assert replanned.latency_after_ms / replanned.latency_before_ms <= 0.6 * 1.03


def test_min_efficiency_corrects_its_prediction_with_a_measurement(slower_than_its_layers):
    """The planned model runs 25 % slower than its layers timed alone: measuring it makes the plan reach the target anyway."""
    import fxdecomp

    model, x = slower_than_its_layers

    def measured_efficiency(rounds):
        recipe = _recipe_with({"min_efficiency": 0.8, "measure_rounds": rounds, "round_to": 1})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = fxdecomp.compress(model, (x,), budget=0.5, methods=["svd"], pipeline=recipe)
        assert result.flops_after <= 0.5 * result.flops_before
        return result.latency_before_ms / result.latency_after_ms * result.flops_ratio

    assert measured_efficiency(0) < 0.8 <= measured_efficiency(2)
