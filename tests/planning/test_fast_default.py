"""The default plan (#16 item 6): ranks rounded to the CPU's block, plans on a static onnxruntime latency model.

Every test but the unwritable-cache one (marked host_latency: its probes are
timed) pins the static model's rates and forbids any onnxruntime timing, so the plan is deterministic and the checks recompute
the rules by hand: ranks on the adaptive multiple, the FLOP budget, every
chosen option predicted faster than its layer, and a memory-bound Linear
decomposed because the model says it dominates the latency.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

import fxdecomp
from fxdecomp.decomposers import get_decomposer
from fxdecomp.errors import RecipeError
from fxdecomp.layer_spec import layer_spec
from fxdecomp.onnxrt import static_model
from fxdecomp.onnxrt.static_model import Rates, StaticLatency, fit_rates, predict_ms, probes
from fxdecomp.planning.grid import bond_multiple

RATES = Rates(macs_per_ms=1e8, output_macs=100.0, bytes_per_ms=2e6, block=16)


@pytest.fixture
def no_timing(monkeypatch):
    """The static model's rates pinned to RATES; any onnxruntime timing fails the test."""

    def timed(*args, **kwargs):
        raise AssertionError("the default recipe timed something in onnxruntime")

    monkeypatch.setattr(static_model, "calibrate", lambda *a, **k: RATES)
    monkeypatch.setattr("fxdecomp.onnxrt.layer_cache.LayerLatency._measure", timed)
    monkeypatch.setattr("fxdecomp.passes.plan.model_ms", timed)
    monkeypatch.setattr("fxdecomp.passes.plan.compare_models_ms", timed)
    monkeypatch.setattr("fxdecomp.latency.model_ms", timed)
    monkeypatch.setattr("fxdecomp.passes.plan.preferred_rank_multiple", lambda threads=1: RATES.block)


def _hand_ms(module: nn.Module, shape) -> float:
    """The static model's formula, written out for one plain Conv2d (channels padded to 16) or Linear."""
    if isinstance(module, nn.Linear):
        return max(module.in_features * module.out_features / RATES.macs_per_ms,
                   module.weight.numel() * 4 / RATES.bytes_per_ms)
    out = module(torch.zeros(shape)).shape
    pad = lambda c: c if c < 8 else 16 * math.ceil(c / 16)  # noqa: E731
    positions = out[-1] * out[-2]
    macs = positions * pad(module.in_channels) * pad(module.out_channels) * module.kernel_size[0] * module.kernel_size[1]
    return (macs + RATES.output_macs * positions * pad(module.out_channels)) / RATES.macs_per_ms


def test_static_model_follows_its_formula():
    for module, shape in [
        (nn.Conv2d(20, 24, 3, padding=1), (1, 20, 10, 10)),
        (nn.Conv2d(64, 33, (3, 1), padding=(1, 0)), (1, 64, 9, 7)),
        (nn.Conv2d(3, 16, 3, stride=2), (1, 3, 17, 17)),
        (nn.Linear(1000, 300), (1, 1000)),
    ]:
        assert predict_ms(module, shape, RATES) == pytest.approx(_hand_ms(module, shape), rel=1e-9)
    # a structure is the sum of its nodes: svd of a conv is a kxk conv to r channels, then a 1x1 back
    spec = layer_spec(nn.Conv2d(64, 64, 3, padding=1))
    model = StaticLatency(rates=RATES)
    expected = _hand_ms(nn.Conv2d(64, 17, 3, padding=1), (1, 64, 8, 8)) + _hand_ms(nn.Conv2d(17, 64, 1), (1, 17, 8, 8))
    assert model.layer_ms(spec, (1, 64, 8, 8), "svd", (17,)) == pytest.approx(expected)
    # rank 17 pays for 32 channels: no faster than rank 32
    assert model.layer_ms(spec, (1, 64, 8, 8), "svd", (17,)) == pytest.approx(model.layer_ms(spec, (1, 64, 8, 8), "svd", (32,)))
    # a Linear called on one vector (as detection heads do, torch allows 1-d inputs) costs one row
    linear = layer_spec(nn.Linear(32, 4))
    assert model.layer_ms(linear, (32,)) == pytest.approx(_hand_ms(nn.Linear(32, 4), (1, 32)), rel=1e-9)
    assert model.layer_ms(linear, (32,), "svd", (2,)) == model.layer_ms(linear, (1, 32), "svd", (2,))


def test_rates_are_recovered_from_probe_times():
    times = []
    for spec, shape in probes():
        with torch.device("cpu"):
            module = nn.Linear(spec.in_features, spec.out_features) if spec.kind == "linear" else nn.Conv2d(
                spec.in_channels, spec.out_channels, spec.kernel_size, padding=spec.pads[0]
            )
        times.append(_hand_ms(module, shape))
    fitted = fit_rates(times, block=16)
    assert fitted.macs_per_ms == pytest.approx(RATES.macs_per_ms, rel=1e-6)
    assert fitted.output_macs == pytest.approx(RATES.output_macs, rel=1e-6)
    assert fitted.bytes_per_ms == pytest.approx(RATES.bytes_per_ms, rel=1e-6)
    with pytest.raises(fxdecomp.FxDecompError, match="three positive"):
        fit_rates([1.0, 0.0, 2.0], block=16)


def _model():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(),
        nn.Conv2d(64, 96, 3, padding=1), nn.ReLU(),
        nn.Conv2d(96, 24, 3, padding=1), nn.ReLU(),
        nn.Conv2d(24, 24, 3, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(24 * 8 * 8, 512), nn.ReLU(), nn.Linear(512, 10),
    ).eval(), torch.randn(1, 3, 8, 8)


def _inputs(model, x):
    shapes = {}
    def record(name):
        def hook(module, inputs, output):
            shapes.setdefault(name, tuple(inputs[0].shape))
        return hook

    hooks = [m.register_forward_hook(record(n)) for n, m in model.named_modules()]
    with torch.no_grad():
        model(x)
    for hook in hooks:
        hook.remove()
    return shapes


def _compress(model, x, budget, recipe="default", calibrate=None, **plan):
    pipeline = fxdecomp.load_recipe(recipe).with_options(plan=plan, **({"calibrate": calibrate} if calibrate else {}))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the default recipe warns about nothing here
        return fxdecomp.compress(model, (x,), budget=budget, pipeline=pipeline)


@pytest.mark.parametrize("budget", [0.5, 0.3])
def test_default_plan_rounds_filters_and_keeps_the_budget(no_timing, budget):
    model, x = _model()
    result = _compress(model, x, budget)
    modules, shapes = dict(model.named_modules()), _inputs(model, x)
    timer = StaticLatency(rates=RATES)
    decomposed = [d for d in result.decisions if d.decomposed]
    assert decomposed
    for d in decomposed:
        spec = layer_spec(modules[d.name])
        maxima = get_decomposer(spec.kind, d.method).planning_max_ranks(spec)
        for rank, maximum in zip(d.ranks, maxima):
            # the rule: a multiple of 16 where the bond holds 4 of them, else of the largest power of two <= maximum / 4
            multiple = 16 if maximum >= 64 else 2 ** int(math.log2(max(maximum // 4, 1)))
            assert rank == maximum or rank % multiple == 0, (d.name, d.method, d.ranks, maxima)
        # the filter: never an option the model predicts no faster than its layer
        assert timer.layer_ms(spec, shapes[d.name], d.method, d.ranks) < timer.layer_ms(spec, shapes[d.name])
    assert fxdecomp.count_flops(result.graph_module, (x,)) <= budget * fxdecomp.count_flops(model, (x,))
    assert result.latency_before_ms is None  # nothing was timed


def test_default_plan_decomposes_a_memory_bound_linear(no_timing):
    """The Linear holds ~0.3 % of the FLOPs and (per the model) most of the latency: a FLOP-only plan keeps it."""
    model, x = _model()
    modules, shapes = dict(model.named_modules()), _inputs(model, x)
    timer = StaticLatency(rates=RATES)
    flops_before = fxdecomp.count_flops(model, (x,))

    def predicted_efficiency(result):
        layers = {n: timer.layer_ms(layer_spec(m), shapes[n]) for n, m in modules.items() if isinstance(m, (nn.Conv2d, nn.Linear))}
        after = {d.name: timer.layer_ms(layer_spec(modules[d.name]), shapes[d.name], d.method, d.ranks) for d in result.decisions if d.decomposed}
        before_ms, after_ms = sum(layers.values()), sum(after.get(n, ms) for n, ms in layers.items())
        return before_ms / after_ms * fxdecomp.count_flops(result.graph_module, (x,)) / flops_before

    flop_only = _compress(model, x, 0.5, min_efficiency=0.0)
    default = _compress(model, x, 0.5)
    linear = {d.name: d for d in default.decisions if d.op == "linear"}
    assert not any(d.decomposed for d in flop_only.decisions if d.op == "linear")
    assert linear["9"].decomposed
    assert predicted_efficiency(flop_only) < 0.9 <= predicted_efficiency(default)
    assert default.flops_after <= 0.5 * default.flops_before


def test_bond_multiple_and_recipe_switches(no_timing):
    assert [bond_multiple(m, 16) for m in (1, 3, 8, 16, 32, 63, 64, 4096)] == [1, 1, 2, 4, 8, 8, 16, 16]
    assert bond_multiple(4096, 8) == 8
    model, x = _model()
    with pytest.raises(RecipeError, match="latency_model"):
        _compress(model, x, 0.5, latency_model="guess")
    hardware = dict(next(s for s in fxdecomp.load_recipe("hardware").steps if s.name == "plan").options)
    assert hardware["latency_model"] == "measured" and hardware["round_to"] == 16


def test_a_budget_only_small_ranks_reach_falls_back_to_flops_alone(no_timing):
    """Rounding and the latency filter must not make a budget unreachable: below what they reach, every rank is used."""
    model, x = _model()
    with pytest.raises(fxdecomp.BudgetError) as caught:
        _compress(model, x, 0.001, round_to=1, min_efficiency=0.0)
    smallest = caught.value.smallest_reachable  # the FLOP-only plan's floor
    with pytest.raises(fxdecomp.BudgetError) as again:
        _compress(model, x, 0.001)
    assert again.value.smallest_reachable == pytest.approx(smallest)
    result = _compress(model, x, smallest * 1.01)
    assert fxdecomp.count_flops(result.graph_module, (x,)) <= smallest * 1.01 * fxdecomp.count_flops(model, (x,))


def test_plain_compress_follows_latency_and_the_flops_recipe_does_not(no_timing):
    """compress(model, x, budget) with no recipe named is the latency-following plan; "flops" is the plain FLOP plan."""
    model, x = _model()
    plain = fxdecomp.compress(model, (x,), budget=0.5)
    default, cpu = _compress(model, x, 0.5), _compress(model, x, 0.5, recipe="cpu")
    flops = _compress(model, x, 0.5, recipe="flops")
    flop_only = _compress(model, x, 0.5, round_to=1, min_efficiency=0.0, calibrate={"weight_damage": "squared"})
    plan = lambda result: [(d.name, d.method, d.ranks) for d in result.decisions]  # noqa: E731
    assert plan(plain) == plan(default) == plan(cpu)
    assert plan(flops) == plan(flop_only) != plan(default)
    assert any(d.decomposed and d.op == "linear" for d in plain.decisions)  # the memory-bound Linear, see above


def _repair(groups, latencies, plan, capacity, repair_damage):
    """follow_latency on hand-made options: ``latencies[k][i]`` ms and FLOPs equal to the budget cost."""
    from types import SimpleNamespace

    from fxdecomp.planning.latency import follow_latency

    planned = [(None, [SimpleNamespace(latency_ms=ms, flops=o.cost) for ms, o in zip(times, group)])
               for times, group in zip(latencies, groups)]
    options = SimpleNamespace(min_efficiency=0.9, repair_damage=repair_damage, measure_rounds=0)
    flops_before = sum(group[0].cost for group in groups)
    model_ms_before = sum(times[0] for times in latencies)
    return follow_latency(groups, planned, plan, capacity, model_ms_before=model_ms_before, flops_before=flops_before,
                          options=options, measure=None)


def test_the_latency_repair_never_overrides_the_damage_it_minimises():
    """Only decomposing the protected layer raises the efficiency; its damage (a sensitivity score of 100) is far over
    the FLOP plan's, so the repair keeps it, unless the ceiling is lifted (repair_damage = 0)."""
    from fxdecomp.planning.solver import Option

    groups = [
        [Option(100.0, 0.0), Option(50.0, 0.01)],  # a conv: the FLOP plan halves it
        [Option(1.0, 0.0), Option(0.5, 100.0)],  # a memory-bound Linear the user's metric protects
    ]
    latencies = [[10.0, 5.0], [10.0, 1.0]]
    flop_plan = [1, 0]  # FLOPs 51 of 101; latency 15 of 20 ms: efficiency 20/15 * 51/101 = 0.67
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _repair(groups, latencies, flop_plan, 51.0, repair_damage=2.0) == [1, 0]
    assert "predicted to reach efficiency 0.9" in str(caught[0].message)
    assert _repair(groups, latencies, flop_plan, 51.0, repair_damage=0.0) == [1, 1]  # no limit: 20/6 * 50.5/101 = 1.67
    # a protected layer whose damage the ceiling allows (2 x 0.01) is taken
    groups[1][1] = Option(0.5, 0.01)
    assert _repair(groups, latencies, flop_plan, 51.0, repair_damage=2.0) == [1, 1]


def test_a_repair_short_of_the_target_keeps_only_the_steps_worth_their_damage():
    """Out of reach of 0.9, each greedy step is priced pro rata: the share of the gap to the target it closes must be at
    least the share of the damage allowance (2 x the FLOP plan's) it spends. The FLOP plan: efficiency 30/25 * 52/102
    = 0.612, damage 0.01. Step 1, a memory-bound Linear: 0.797 (64 % of the gap) for half the allowance: kept. Step 2:
    0.811 (69 %) for 90 % of it: not kept. With a Linear that saves little, no step is worth it: the FLOP plan stays."""
    from fxdecomp.planning.solver import Option

    groups = [
        [Option(100.0, 0.0), Option(50.0, 0.01)],  # a conv the FLOP plan halves
        [Option(1.0, 0.0), Option(0.5, 0.005)],  # a memory-bound Linear: much latency for its damage
        [Option(1.0, 0.0), Option(0.5, 0.004)],  # a Linear that saves little
    ]
    flop_plan = [1, 0, 0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _repair(groups, [[10.0, 5.0], [10.0, 4.0], [10.0, 9.5]], flop_plan, 52.0, repair_damage=2.0) == [1, 1, 0]
        assert _repair(groups, [[10.0, 5.0], [10.0, 9.0], [10.0, 9.5]], flop_plan, 52.0, repair_damage=2.0) == flop_plan
    assert len(caught) == 2 and all("predicted to reach efficiency 0.9" in str(w.message) for w in caught)
    # Without a ceiling every step is kept: the user traded any damage for latency.
    assert _repair(groups, [[10.0, 5.0], [10.0, 4.0], [10.0, 9.5]], flop_plan, 52.0, repair_damage=0.0) == [1, 1, 1]


def test_a_repair_put_out_of_reach_by_a_measured_round_keeps_the_steps_of_every_round():
    """Round 0 reaches the target on the layers' predicted times; the planned model then measures 2x slower than their
    sum, the target is out of reach, and round 1 finds no step: the pro-rata choice is among round 0's steps too."""
    from types import SimpleNamespace

    from fxdecomp.planning.latency import follow_latency
    from fxdecomp.planning.solver import Option

    groups = [[Option(100.0, 0.0), Option(50.0, 0.01)], [Option(1.0, 0.0), Option(0.5, 0.005)]]
    latencies = [[10.0, 5.0], [10.0, 2.0]]
    planned = [(None, [SimpleNamespace(latency_ms=ms, flops=o.cost) for ms, o in zip(t, g)]) for t, g in zip(latencies, groups)]

    def measure(planned_, plan):
        return 2.0 * sum(choices[i].latency_ms for (_, choices), i in zip(planned_, plan))

    for rounds in (0, 1, 2):
        options = SimpleNamespace(min_efficiency=0.9, repair_damage=2.0, measure_rounds=rounds)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            plan = follow_latency(groups, planned, [1, 0], 51.0, model_ms_before=20.0, flops_before=101,
                                  options=options, measure=measure)
        assert plan == [1, 1], rounds


def test_repair_damage_must_be_zero_or_at_least_one(no_timing):
    model, x = _model()
    for bad in (-1.0, 0.5):
        with pytest.raises(RecipeError, match="repair_damage"):
            _compress(model, x, 0.5, repair_damage=bad)


def test_the_static_plan_searches_the_full_rank_grid(no_timing, monkeypatch):
    """Predictions cost no timing: the default plan looks at `grid` ranks per method, not the coarser `latency_grid`."""
    model, x = _model()
    asked = set()
    real = StaticLatency.layer_ms

    def spy(self, spec, shape, method=None, ranks=(), options=None):
        if method == "svd" and getattr(spec, "out_features", 0) == 512:
            asked.add(tuple(ranks))
        return real(self, spec, shape, method, ranks, options)

    monkeypatch.setattr(StaticLatency, "layer_ms", spy)
    _compress(model, x, 0.5)
    from fxdecomp.passes.plan import PlanPass

    options = PlanPass.Options()
    assert len(asked) > options.latency_grid


@pytest.mark.host_latency  # the probes are really timed, and cached
def test_an_unwritable_cache_folder_warns_and_plans(tmp_path, monkeypatch):
    """The default recipe times its probes once and caches them; a cache folder that cannot be written is no error."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("FXDECOMP_CACHE_DIR", str(blocker / "cache"))
    model, x = _model()
    with pytest.warns(UserWarning, match="cannot write the latency cache"):
        result = fxdecomp.compress(model, (x,), budget=0.5)
    assert result.flops_after <= 0.5 * result.flops_before
    assert blocker.read_text() == "not a folder"
