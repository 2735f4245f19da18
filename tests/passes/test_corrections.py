"""Corrections after truncation: least-squares refit of last factors, BatchNorm re-estimation, BatchNorm folding.

Oracles are computed here: each layer's calibration-set output error from the original
module's own inputs (forward hooks on the input model), the least-squares optimum through
autograd (the gradient of that error with respect to the last factor vanishes), and
BatchNorm statistics from the rewritten model's activations.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxdecomp
from fxdecomp.errors import InvalidInputError, RecipeError
from fxdecomp.frontend import capture_with_source
from fxdecomp.passes.fold_batchnorm import fold_batchnorm
from fxdecomp.recipes import Recipe, Step

from fxdecomp.examples.vision import ResNet


class Mixed(nn.Module):
    """Last factors of every kind the refit handles: 1x1 conv (svd, tucker2), 1 x kw conv with
    padding (spatial_svd), a grouped conv, a strided conv, a Linear on 3-d inputs."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 24, 3, padding=1)
        self.c2 = nn.Conv2d(24, 32, 3, padding=1, bias=False)
        self.c3 = nn.Conv2d(32, 32, 3, padding=1, groups=2)
        self.c4 = nn.Conv2d(32, 40, 3, stride=2, padding=1)
        self.fc1 = nn.Linear(40, 48)
        self.fc2 = nn.Linear(48, 10)

    def forward(self, x):
        x = F.relu(self.c2(F.relu(self.c1(x))))
        x = F.relu(self.c4(F.relu(self.c3(x))))
        x = x.flatten(2).transpose(1, 2)  # (N, positions, 40): a Linear on 3-d inputs
        return self.fc2(F.relu(self.fc1(x))).mean(1)


def _data(seed=0, batches=6, size=8):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 3, 12, 12, generator=g),) for _ in range(batches)]


def _recipe(**enabled):
    return fxdecomp.load_recipe("default").with_options(**{name: {"enabled": True, **options} for name, options in enabled.items()})


def _layer_io(model, names, batches):
    """The original modules' inputs and outputs on the calibration batches (hooks on the input model)."""
    seen = {name: [] for name in names}
    modules = dict(model.named_modules())
    handles = [modules[n].register_forward_hook(lambda m, a, out, n=n: seen[n].append((a[0].detach(), out.detach()))) for n in names]
    with torch.no_grad():
        for (x,) in batches:
            model(x)
    for h in handles:
        h.remove()
    return seen


def _layer_error(module, io):
    """sqrt(sum ||y - module(x)||^2 / sum ||y||^2) over the recorded (x, y)."""
    with torch.no_grad():
        num = sum(float((module(x).double() - y.double()).square().sum()) for x, y in io)
        den = sum(float(y.double().square().sum()) for _, y in io)
    return (num / den) ** 0.5


def _compress(model, batches, recipe, **kw):
    kw.setdefault("budget", 0.35)
    return fxdecomp.compress(model, batches[0], calibration=list(batches), pipeline=recipe, **kw)


@pytest.fixture(scope="module")
def mixed_runs():
    torch.manual_seed(0)
    model = Mixed().eval()
    batches = _data()
    plan = {"c2": ("spatial_svd", (6,)), "c3": ("svd", (5,)), "c4": ("tucker2", (8, 8)), "fc1": ("svd", (6,)), "c1": ("svd", (4,))}
    before = copy.deepcopy(model.state_dict())
    # Factors fitted to the data only where `svd` is (fit="svd"): spatial_svd's and tucker2's are then
    # weight-only, and the refit has their output error to remove (data-fitted ones are near its optimum).
    unfitted = {"plan": {"fit": "svd"}}
    plain = _compress(model, batches, fxdecomp.load_recipe("default").with_options(**unfitted), plan=plan)
    corrected = _compress(model, batches, _recipe(correct_factors={"ridge": 0.0}).with_options(**unfitted), plan=plan)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the input model is never modified
    return model, batches, plan, plain, corrected


def test_least_squares_lowers_every_layer_error_on_the_calibration_set(mixed_runs):
    model, batches, plan, plain, corrected = mixed_runs
    io = _layer_io(model, list(plan), batches)
    records = corrected.graph_module.meta["fxdecomp.corrections"].layers
    assert set(records) == set(plan)
    for name in plan:
        before = _layer_error(plain.graph_module.get_submodule(name), io[name])
        after = _layer_error(corrected.graph_module.get_submodule(name), io[name])
        assert after <= before * (1 + 1e-6), (name, before, after)
        if records[name].accepted:
            assert after < 0.999 * before, (name, before, after)  # min_gain 1e-3
        else:  # already the least-squares factor (an input-whitened svd is): left as it was
            plain_factor, factor = plain.graph_module.get_submodule(name)[-1], corrected.graph_module.get_submodule(name)[-1]
            assert torch.equal(plain_factor.weight, factor.weight), name
        assert records[name].error_before == pytest.approx(before, rel=1e-3)
        assert records[name].error_after == pytest.approx(after, rel=1e-3)
    assert sum(r.accepted for r in records.values()) >= 4


def test_least_squares_refit_is_the_least_squares_optimum(mixed_runs):
    """With ridge 0 the last factor satisfies the normal equations: the calibration error's gradient
    with respect to it (autograd, through the real modules) is ~0, against the uncorrected one's."""
    model, batches, plan, plain, corrected = mixed_runs
    io = _layer_io(model, list(plan), batches)

    def gradient_norm(gm, name):
        factors = copy.deepcopy(gm.get_submodule(name))
        last = factors[-1]
        loss = sum((factors(x) - y).double().square().sum() for x, y in io[name])
        params = [p for p in (last.weight, last.bias) if p is not None]
        return float(torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)]).norm())

    records = corrected.graph_module.meta["fxdecomp.corrections"].layers
    for name in (n for n in plan if records[n].accepted):
        assert gradient_norm(corrected.graph_module, name) < 1e-3 * gradient_norm(plain.graph_module, name), name


def test_least_squares_adds_a_bias_only_where_allowed(mixed_runs):
    _, _, _, plain, corrected = mixed_runs
    assert plain.graph_module.get_submodule("c2")[-1].bias is None  # spatial_svd of a conv without bias
    assert corrected.graph_module.get_submodule("c2")[-1].bias is not None


def test_least_squares_changes_nothing_at_full_rank():
    torch.manual_seed(1)
    model = Mixed().eval()
    batches = _data(seed=1, batches=3)
    plan = {"c2": ("spatial_svd", (24 * 3,)), "c3": ("svd", (16,)), "fc1": ("svd", (40,))}
    plain = _compress(model, batches, "default", plan=plan)
    corrected = _compress(model, batches, _recipe(correct_factors={}), plan=plan)
    records = corrected.graph_module.meta["fxdecomp.corrections"].layers
    assert set(records) == set(plan) and not any(r.accepted for r in records.values())
    for key, value in plain.graph_module.state_dict().items():
        assert torch.equal(value, corrected.graph_module.state_dict()[key]), key


def test_corrections_replay_a_generator_and_are_off_in_the_default_recipe():
    torch.manual_seed(2)
    model = Mixed().eval()
    batches = _data(seed=2, batches=4)
    result = fxdecomp.compress(model, batches[0], budget=0.4, calibration=(b for b in batches), pipeline="corrected")
    assert any(r.accepted for r in result.graph_module.meta["fxdecomp.corrections"].layers.values())
    default = fxdecomp.compress(model, batches[0], budget=0.4, calibration=(b for b in batches))
    assert "fxdecomp.corrections" not in default.graph_module.meta
    compressed = _compress(model, batches, _recipe(correct_factors={"inputs": "compressed", "update": "bias"}), budget=0.4)
    assert compressed.graph_module.meta["fxdecomp.corrections"].layers
    with pytest.raises(RecipeError, match="inputs must be one of"):
        _compress(model, batches, _recipe(correct_factors={"inputs": "both"}), budget=0.4)


def _perturbed_resnet(seed=3):
    torch.manual_seed(seed)
    model = ResNet()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return model.eval()


def _batch_statistics(model, name, batches):
    """Mean over batches of each batch's channel mean and unbiased variance at ``name``'s input."""
    means, variances = [], []

    def record(module, args, output):
        means.append(args[0].mean((0, 2, 3)))
        variances.append(args[0].var((0, 2, 3), unbiased=True))

    hook = model.get_submodule(name).register_forward_hook(record)
    with torch.no_grad():
        for (x,) in batches:
            model(x)
    hook.remove()
    return torch.stack(means).mean(0), torch.stack(variances).mean(0)


def test_batchnorm_statistics_match_the_rewritten_models_activations():
    model = _perturbed_resnet()
    g = torch.Generator().manual_seed(4)
    batches = [(torch.randn(6, 3, 16, 16, generator=g),) for _ in range(4)]
    # Only layers.1.conv2 decomposed: its BatchNorm is the only one re-estimated, so the others stay
    # in eval mode and the statistics of its input are those of the rewritten model as it runs.
    plan = {"layers.1.conv2": ("svd", (6,))}
    before = copy.deepcopy(model.state_dict())
    plain = _compress(model, batches, "default", plan=plan)
    fixed = _compress(model, batches, _recipe(reestimate_batchnorm={}), plan=plan)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert fixed.graph_module.meta["fxdecomp.batchnorm_stats"].batchnorms == ("layers.1.bn2",)
    mean, var = _batch_statistics(plain.graph_module, "layers.1.bn2", batches)
    bn = fixed.graph_module.get_submodule("layers.1.bn2")
    torch.testing.assert_close(bn.running_mean, mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var, var, rtol=1e-5, atol=1e-6)
    assert not bn.training and bn.momentum == model.layers[1].bn2.momentum
    for name in ("layers.0.bn2", "layers.1.bn1", "stem.1"):  # not after a decomposed layer: untouched
        for buffer in ("running_mean", "running_var"):
            assert torch.equal(getattr(fixed.graph_module.get_submodule(name), buffer), before[f"{name}.{buffer}"])
    plain_bn = plain.graph_module.get_submodule("layers.1.bn2")
    assert torch.equal(plain_bn.running_mean, before["layers.1.bn2.running_mean"])  # the plain result keeps the original's
    # mode "shift": the trained statistics moved by the drift between the original's and the rewritten's activations.
    shifted = _compress(model, batches, _recipe(reestimate_batchnorm={"mode": "shift"}), plan=plan).graph_module.get_submodule("layers.1.bn2")
    original_mean, original_var = _batch_statistics(model, "layers.1.bn2", batches)
    torch.testing.assert_close(shifted.running_mean, before["layers.1.bn2.running_mean"] + mean - original_mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(shifted.running_var, before["layers.1.bn2.running_var"] * var / original_var, rtol=1e-4, atol=1e-6)


def test_fold_batchnorm_keeps_outputs_and_leaves_no_batchnorm():
    model = _perturbed_resnet(seed=5)
    x = torch.randn(4, 3, 16, 16)
    kept = fxdecomp.compress(model, (x,), budget=1.0, pipeline=_recipe(fold_batchnorm={}))
    bns = [n for n, m in kept.graph_module.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert bns == []
    with torch.no_grad():
        torch.testing.assert_close(kept.graph_module(x), model(x), rtol=1e-4, atol=1e-5)
    small = fxdecomp.compress(model, (x,), budget=0.5, pipeline=_recipe(fold_batchnorm={}))
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in small.graph_module.modules())
    assert small.flops_after <= 0.5 * small.flops_before * 1.01


def test_fold_batchnorm_folds_efficientnet_static_padding_convs():
    import efficientnet_lite_pytorch as efficientnet  # a declared test dependency: missing is a failure

    torch.manual_seed(6)
    model = efficientnet.EfficientNet.from_name("efficientnet-lite0", image_size=64).eval()
    x = torch.randn(2, 3, 64, 64)
    gm, _, _ = capture_with_source(model, (x,), "fx", "auto")  # fxdecomp's tracer: convs stay modules
    folded, count = fold_batchnorm(gm, (x,))
    assert count == sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-4)


def test_fold_batchnorm_refuses_training_mode_and_a_late_position():
    model = _perturbed_resnet(seed=7).train()
    x = torch.randn(4, 3, 16, 16)
    with pytest.raises(InvalidInputError, match="model.eval"):  # compress captures an eval copy; a direct call may not
        fold_batchnorm(torch.fx.symbolic_trace(model), (x,))
    steps = [s for s in fxdecomp.load_recipe("default").steps if s.name != "fold_batchnorm"]
    late = steps[:2] + [Step("fold_batchnorm", {})] + steps[2:]
    with pytest.raises(RecipeError, match="before find_candidates"):
        fxdecomp.compress(model.eval(), (x,), budget=0.5, pipeline=Recipe("late", "", tuple(late)))


def test_keep_the_model_mode_carries_folding_and_batchnorm_statistics():
    model = _perturbed_resnet(seed=8)
    g = torch.Generator().manual_seed(9)
    batches = [(torch.randn(6, 3, 16, 16, generator=g),) for _ in range(3)]
    recipe = _recipe(fold_batchnorm={})
    folded = _compress(model, batches, recipe, budget=0.5)
    kept = folded.apply_to(model)  # no example inputs: the copy must be right by construction
    fixed = _compress(model, batches, _recipe(reestimate_batchnorm={}, correct_factors={}), budget=0.5)
    kept_fixed = fixed.apply_to(model)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(kept(x), folded.graph_module(x), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(kept_fixed(x), fixed.graph_module(x), rtol=1e-4, atol=1e-5)
    assert type(kept) is type(model) and isinstance(kept.layers[0].bn1, nn.Identity)
