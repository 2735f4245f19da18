"""Training: fine-tuning with distillation, DeepTwist, factorized training from scratch."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxdecomp
from fxdecomp.errors import InvalidInputError, UnsupportedLayerError
from fxdecomp.layer_spec import layer_spec
from fxdecomp.training import (
    DeepTwist,
    Distiller,
    dense_weight,
    distillation_loss,
    factorized_model,
    finetune,
    init_factors,
    low_rank,
)

from fxdecomp.examples.vision import VGG, Functional, SharedLayer


def snapshot(model: nn.Module) -> dict:
    """Everything "never modified" covers: tensors, training flags, requires_grad flags."""
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        "training": [m.training for m in model.modules()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["training"] == before["training"]
    assert after["requires_grad"] == before["requires_grad"]
    assert after["state"].keys() == before["state"].keys()
    for key, value in before["state"].items():
        assert torch.equal(after["state"][key], value), key


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


class Wrapper(nn.Module):
    """One layer under a qualified name, with a nonlinearity after it."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.body = nn.Sequential(layer, nn.Tanh())

    def forward(self, x):
        return self.body(x)


def truncated_svd(weight: torch.Tensor, rank: int) -> torch.Tensor:
    """The best rank-``rank`` approximation (Eckart-Young) of the weight lowered to out x (in * kh * kw)."""
    matrix = weight.detach().double().reshape(weight.shape[0], -1)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return ((u[:, :rank] * s[:rank]) @ vh[:rank]).reshape(weight.shape).to(weight.dtype)


def layer_input(layer: nn.Module, batch: int = 3) -> torch.Tensor:
    if isinstance(layer, nn.Linear):
        return torch.randn(batch, layer.in_features)
    return torch.randn(batch, layer.in_channels, 11, 13)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor) -> None:
    optimizer.zero_grad()
    model(x).square().mean().backward()
    optimizer.step()


# ---- DeepTwist ---------------------------------------------------------------------------

CONV = lambda: nn.Conv2d(8, 12, 3, padding=1)  # noqa: E731
CASES = [
    (CONV, "svd", (3,)),
    (CONV, "tucker2", (3, 4)),
    (CONV, "cp", (5,)),
    (CONV, "spatial_svd", (4,)),
    (CONV, "tt", (3, 6, 4)),
    (CONV, "tiled_svd", (2, 3, 2, 3)),
    (lambda: nn.Conv2d(8, 12, (3, 5), stride=2, padding="valid", dilation=(2, 1), bias=False), "svd", (4,)),
    (lambda: nn.Conv2d(8, 12, 4, padding="same", padding_mode="reflect"), "tucker2", (4, 5)),
    (lambda: nn.Conv2d(8, 12, 3, stride=2, padding=1, padding_mode="circular"), "spatial_svd", (5,)),
    (lambda: nn.Conv2d(8, 12, 3, padding=1, groups=2), "svd", (2,)),
    (lambda: nn.Conv2d(8, 12, 3, padding=1, groups=2), "cp", (4,)),
    (lambda: nn.Linear(24, 16), "svd", (5,)),
    (lambda: nn.Linear(24, 16), "tt", (2, 4)),
    (lambda: nn.Linear(24, 16, bias=False), "tiled_svd", (3, 4, 2, 3)),
]


@pytest.mark.parametrize("make, method, ranks", CASES, ids=[f"{m}-{i}" for i, (_, m, _) in enumerate(CASES)])
def test_distortion_is_decompose_then_reconstruct(make, method, ranks):
    torch.manual_seed(0)
    model = Wrapper(make())
    layer = model.body[0]
    weight, bias = layer.weight, layer.bias
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    twist = DeepTwist(model, {"body.0": (method, ranks)}, every=1)
    x = layer_input(layer)
    train_step(model, optimizer, x)
    before = copy.deepcopy(layer)  # the layer with its current (trained) weights
    assert twist.step() is True

    assert layer.weight is weight and layer.bias is bias  # same Parameters: the optimizer keeps working
    if bias is not None:
        assert torch.equal(layer.bias, before.bias)
    reference = fxdecomp.decompose_layer(before, method, ranks)
    probe = layer_input(layer, batch=4)
    with torch.no_grad():
        assert relative(layer(probe), reference(probe)) < 1e-5
        assert relative(layer.weight, before.weight) > 1e-3  # a real, low-rank change
    distorted = layer.weight.detach().clone()
    train_step(model, optimizer, x)  # training goes on with the user's optimizer
    assert not torch.equal(layer.weight, distorted)


@pytest.mark.parametrize("make, method, ranks", CASES, ids=[f"{m}-{i}" for i, (_, m, _) in enumerate(CASES)])
def test_dense_weight_read_off_the_module_is_the_closed_form(make, method, ranks):
    torch.manual_seed(1)
    layer = make()
    approx = low_rank(layer, method, ranks)
    module = approx.build(layer.bias.detach() if layer.bias is not None else None)
    read = dense_weight(module, layer_spec(layer))  # impulse response, any padding mode
    assert read.shape == layer.weight.shape and relative(read.float(), approx.weight) < 1e-5


def test_distortion_lowers_the_rank():
    model = Wrapper(nn.Linear(32, 24))
    DeepTwist(model, {"body.0": ("svd", (5,))}).distort()
    assert torch.linalg.matrix_rank(model.body[0].weight.detach()) == 5


def test_distortion_only_every_s_d_steps():
    torch.manual_seed(1)
    model = VGG(widths=(8, "M", 16))
    plan = {"features.0": ("svd", (2,)), "features.3": ("tucker2", (3, 4)), "classifier.1": ("svd", (4,))}
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    twist = DeepTwist(model, plan, every=3)
    x = torch.randn(4, 3, 8, 8)
    distorted = []
    for _ in range(7):
        train_step(model, optimizer, x)
        trained = {name: copy.deepcopy(model.get_submodule(name)) for name in plan}
        distorted.append(twist.step())
        changed = not torch.equal(model.features[3].weight, trained["features.3"].weight)
        assert changed == distorted[-1]
        if distorted[-1]:
            # Every distortion is a fresh low-rank reconstruction of the weights of that moment.
            for name in ("features.0", "classifier.1"):
                rank = plan[name][1][0]
                assert relative(model.get_submodule(name).weight.detach(), truncated_svd(trained[name].weight, rank)) < 1e-5, name
            reference = fxdecomp.decompose_layer(trained["features.3"], "tucker2", (3, 4))
            probe = torch.randn(2, 8, 6, 6)
            with torch.no_grad():
                assert relative(model.features[3](probe), reference(probe)) < 1e-5
    assert distorted == [False, False, True, False, False, True, False]
    assert (twist.steps, twist.distortions) == (7, 2)


def test_finalize_matches_the_model_after_the_last_distortion():
    torch.manual_seed(2)
    model = VGG(widths=(8, "M", 16, "M", 16))
    x = torch.randn(3, 3, 16, 16)
    plan = {
        "features.0": ("spatial_svd", (3,)),
        "features.3": ("cp", (6,)),
        "features.6": ("tt", (4, 8, 4)),
        "classifier.1": ("tiled_svd", (4, 4, 4, 4)),
        "classifier.3": ("svd", (3,)),
    }
    twist = DeepTwist(model, plan, example_inputs=(x,), every=2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(5):
        train_step(model, optimizer, x)
        twist.step()
    trained = copy.deepcopy(model)
    gm = twist.finalize()
    with torch.no_grad():
        distorted, decomposed, undistorted = model(x), gm(x), trained(x)
    assert relative(decomposed, distorted) < 1e-5
    assert relative(undistorted, distorted) > 1e-4  # finalize did distort the trained weights
    assert {d.name: (d.method, d.ranks) for d in twist.result.decisions if d.decomposed} == plan
    assert isinstance(gm.get_submodule("features.3"), nn.Sequential)


def test_plan_from_compress_and_from_a_budget():
    torch.manual_seed(3)
    model = SharedLayer()  # one conv called twice: one candidate, one weight to distort
    x = torch.randn(2, 3, 8, 8)
    before = snapshot(model)
    result = fxdecomp.compress(model, (x,), budget=0.5, methods=("svd", "tucker2"))
    from_budget = DeepTwist(model, 0.5, (x,), methods=("svd", "tucker2"))
    assert_unchanged(model, before)  # planning does not touch the model
    planned = {d.name: (d.method, d.ranks) for d in result.decisions if d.decomposed}
    assert planned and from_budget.plan == {d.name: (d.method, d.ranks) for d in result.decisions}
    for plan in (result, result.decisions, result.to_dict(), result.to_dict()["decisions"]):
        twist = DeepTwist(copy.deepcopy(model), plan)
        assert {n: (m, r) for n, (_, m, r) in twist.layers.items()} == planned
    gm = from_budget.finalize()
    with torch.no_grad():
        assert relative(gm(x), model(x)) < 1e-5


def test_deeptwist_refuses_bad_input():
    model = VGG()
    for every in (0, -3, 1.5, True):
        with pytest.raises(InvalidInputError, match="every"):
            DeepTwist(model, {"features.0": ("svd", (2,))}, every=every)
    with pytest.raises(InvalidInputError, match="does not have: 'features.99'"):
        DeepTwist(model, {"features.99": ("svd", (2,))})
    with pytest.raises(InvalidInputError, match="does not have"):
        DeepTwist(model, {"nope": ("keep", ())})
    with pytest.raises(UnsupportedLayerError, match="does not apply to linear"):
        DeepTwist(model, {"classifier.1": ("tucker2", (2, 2))})
    with pytest.raises(InvalidInputError, match="rank"):
        DeepTwist(model, {"features.0": ("svd", (2, 3))})
    with pytest.raises(InvalidInputError, match="example_inputs"):
        DeepTwist(model, 0.5)
    with pytest.raises(InvalidInputError, match="example_inputs"):
        DeepTwist(model, {"features.0": ("svd", (2,))}).finalize()
    functional = Functional()
    with pytest.raises(UnsupportedLayerError, match="functional"):
        DeepTwist(functional, {"fc1_weight": ("svd", (4,))})
    with pytest.raises(UnsupportedLayerError, match="functional"):
        DeepTwist(functional, 0.5, (torch.randn(2, 3, 16, 16),), methods=("svd",))


# ---- fine-tuning and distillation ---------------------------------------------------------


def test_distillation_loss_is_hinton_kd():
    torch.manual_seed(4)
    student, teacher, t = torch.randn(5, 7), torch.randn(5, 7), 3.0
    p_teacher = F.softmax(teacher / t, -1)
    expected = (p_teacher * (p_teacher.log() - F.log_softmax(student / t, -1))).sum(-1).mean() * t * t
    assert torch.allclose(distillation_loss(student, teacher, t), expected, atol=1e-6)
    assert float(distillation_loss(teacher, teacher, t)) == pytest.approx(0.0, abs=1e-6)
    sequence = distillation_loss(student.reshape(5, 1, 7), teacher.reshape(5, 1, 7), t)  # classes on the last dim
    assert torch.allclose(sequence, expected, atol=1e-6)
    with pytest.raises(InvalidInputError):
        distillation_loss(student, teacher[:, :3], t)


def test_distiller_mixes_losses_and_runs_the_teacher_in_eval_mode():
    torch.manual_seed(5)
    teacher = nn.Sequential(nn.Linear(6, 16), nn.Dropout(0.5), nn.Linear(16, 4)).train()
    student = nn.Linear(6, 4)
    x, y = torch.randn(8, 6), torch.randint(0, 4, (8,))
    distiller = Distiller(student, teacher, temperature=2.0, alpha=0.25)
    loss, parts = distiller(x, y)
    with torch.no_grad():
        expected_teacher = copy.deepcopy(teacher).eval()(x)
    assert torch.equal(distiller.teacher_logits(x), expected_teacher)  # no dropout: eval mode
    assert teacher.training  # ... and its mode is given back
    expected = 0.25 * distillation_loss(student(x), expected_teacher, 2.0) + 0.75 * F.cross_entropy(student(x), y)
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
    assert set(parts) == {"loss", "task", "distill"}
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    pure, parts = distiller(x, None)
    assert float(pure) == pytest.approx(parts["distill"]) and "task" not in parts
    with pytest.raises(InvalidInputError, match="teacher"):
        Distiller(student)(x, None)
    with pytest.raises(InvalidInputError):
        Distiller(student, student)


def test_finetune_with_a_teacher_lowers_the_distillation_loss():
    torch.manual_seed(6)
    teacher = VGG(widths=(8, "M", 16, "M", 16))
    with torch.no_grad():
        teacher.classifier[3].weight.mul_(20)  # confident logits: something to distil
    images = torch.randn(96, 3, 16, 16)
    labels = teacher(images).argmax(1).detach()
    batches = [(images[i : i + 32], labels[i : i + 32]) for i in range(0, 96, 32)]
    student = fxdecomp.compress(teacher, (images[:2],), budget=0.2, methods=("svd",)).graph_module
    held_out = torch.randn(64, 3, 16, 16)
    teacher.train()
    before = snapshot(teacher)

    def kd() -> float:
        with torch.no_grad():
            return float(distillation_loss(student(held_out), teacher.eval()(held_out), 4.0))

    start = kd()
    teacher.train()
    history = finetune(student, batches, epochs=15, lr=1e-3, teacher=teacher, alpha=0.9, progress=False)
    teacher.train()
    assert_unchanged(teacher, before)
    assert len(history.loss) == len(history.distill) == len(history.task) == 15 and history.steps == 45
    assert history.distill[-1] < 0.3 * history.distill[0]
    assert start > 0.1 and kd() < 0.3 * start
    assert not student.training  # its mode is given back


def test_finetune_data_forms_progress_and_max_steps(capsys):
    torch.manual_seed(7)
    model = nn.Linear(4, 3)
    x, y = torch.randn(12, 4), torch.randint(0, 3, (12,))
    seen = []

    def by_epoch(epoch):
        seen.append(epoch)
        return iter([(x[:6], y[:6]), (x[6:], y[6:])])

    history = finetune(model, by_epoch, epochs=3, progress=True)
    assert seen == [0, 1, 2] and history.steps == 6 and len(history.loss) == 3
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 3 and lines[0].startswith("fxdecomp finetune: epoch 1/3")
    finetune(model, lambda: iter([((x,), y)]), epochs=2, progress=False)  # tuple inputs, no-argument callable
    assert capsys.readouterr().err == ""
    assert finetune(model, [(x[:4], y[:4])] * 5, epochs=4, max_steps=7).steps == 7
    with pytest.raises(InvalidInputError, match="iterator"):
        finetune(model, ((x, y) for _ in range(2)), epochs=2)
    with pytest.raises(InvalidInputError, match="pair"):
        finetune(model, [x], epochs=1)
    with pytest.raises(InvalidInputError, match="epochs"):
        finetune(model, [(x, y)], epochs=0)


# ---- factorized training from scratch -----------------------------------------------------


def jacobian_weight(module: nn.Module, layer: nn.Module) -> torch.Tensor:
    """The dense weight of a decomposed module, independently of fxdecomp: its Jacobian on one window."""
    if isinstance(layer, nn.Linear):
        return torch.autograd.functional.jacobian(lambda v: module(v), torch.zeros(layer.in_features))
    kh, kw = layer.kernel_size
    window = torch.zeros(1, layer.in_channels, kh, kw)
    full = torch.autograd.functional.jacobian(lambda v: module(v)[0, :, 0, 0], window)[:, 0]  # (T, S, kh, kw)
    g, t, s = layer.groups, layer.out_channels // layer.groups, layer.in_channels // layer.groups
    return torch.cat([full[i * t : (i + 1) * t, i * s : (i + 1) * s] for i in range(g)])  # each group's block


VARIANCE_CASES = [
    (lambda: nn.Conv2d(32, 48, 3), ["svd", "tucker2", "cp", "spatial_svd", "tt", "tiled_svd"]),
    (lambda: nn.Conv2d(16, 64, (3, 5), bias=False), ["svd", "tucker2", "cp", "spatial_svd", "tt", "tiled_svd"]),
    (lambda: nn.Conv2d(32, 32, 3, groups=4), ["svd", "tucker2", "cp", "spatial_svd"]),
    (lambda: nn.Linear(192, 96), ["svd", "tt", "tiled_svd"]),
]


@pytest.mark.parametrize("make, methods", VARIANCE_CASES, ids=["conv3x3", "conv3x5", "grouped", "linear"])
@pytest.mark.parametrize("fraction", [0.15, 0.5])
def test_factorized_init_has_the_default_init_variance(make, methods, fraction):
    layer = make()
    spec = layer_spec(layer)
    fan_in = layer.weight[0].numel()
    target = 1.0 / (3.0 * fan_in)  # PyTorch's kaiming_uniform(a=sqrt(5))
    for method in methods:
        module = fxdecomp.decompose_layer(layer, method, fraction)
        variances = []
        for seed in range(12):
            init_factors(module, spec, torch.Generator().manual_seed(seed))
            with torch.no_grad():
                variances.append(float(jacobian_weight(module, layer).square().mean()))
        ratio = sum(variances) / len(variances) / target
        assert abs(ratio - 1.0) < 0.15, (method, module.fxdecomp_ranks, ratio)
        bias = fxdecomp.decomposers.base.final_layer(module).bias
        if bias is not None:
            assert bias.abs().max() <= 1 / math.sqrt(fan_in) and bias.std() > 0.3 / math.sqrt(fan_in)


def test_factorized_init_keeps_the_structural_zeros():
    layer = nn.Linear(32, 16)
    module = fxdecomp.decompose_layer(layer, "tiled_svd", (2, 5, 5, 3))  # tiles of lower rank are zero-padded
    zeros = [p == 0 for p in (module.right, module.left)]
    init_factors(module, layer_spec(layer), torch.Generator().manual_seed(0))
    assert all(torch.equal(p == 0, z) for p, z in zip((module.right, module.left), zeros))
    assert int(zeros[0].sum()) > 0


def test_factorized_model_end_to_end():
    torch.manual_seed(8)
    model = VGG(widths=(8, "M", 16, "M", 16))
    x = torch.randn(2, 3, 16, 16)
    before = snapshot(model)
    gm = factorized_model(model, (x,), budget=0.5, methods=("svd", "tucker2"), seed=3)
    assert_unchanged(model, before)
    decisions = gm.fxdecomp_result.decisions
    assert any(d.decomposed for d in decisions)
    trained = fxdecomp.compress(model, (x,), plan=decisions).graph_module
    assert trained.state_dict().keys() == gm.state_dict().keys()  # the same structure ...
    for key, value in trained.state_dict().items():  # ... and nothing of the trained values
        assert not torch.equal(value, gm.state_dict()[key]), key
    again = factorized_model(model, (x,), plan=decisions, seed=3)
    other = factorized_model(model, (x,), plan=decisions, seed=4)
    with torch.no_grad():
        assert torch.equal(again(x), gm(x)) and not torch.equal(other(x), gm(x))
    kept = factorized_model(model, (x,), plan=decisions, seed=3, reinit_rest=False)
    kept_names = [d.name for d in decisions if not d.decomposed]
    for name in kept_names:
        assert torch.equal(kept.get_submodule(name).weight, model.get_submodule(name).weight)
    with pytest.raises(InvalidInputError, match="exactly one"):
        factorized_model(model, (x,))
    with pytest.raises(UnsupportedLayerError, match="functional"):
        factorized_model(Functional(), (torch.randn(2, 3, 16, 16),), plan={"fc1_weight": ("svd", (4,))})
