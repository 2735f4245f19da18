"""Tests written to kill mutation-testing survivors in fxdecomp/training/ (tools/mutation/run.py training).

Oracles: losses recomputed in the test (cross-entropy, the Hinton KD formula),
torch's optimizer semantics (a parameter without a gradient is not stepped),
and the plan the caller asked for.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fxdecomp.errors import InvalidInputError
from fxdecomp.training import DeepTwist, distillation_loss, factorized_model, finetune

from fxdecomp.examples.vision import VGG


def test_epoch_losses_are_the_mean_over_the_epochs_batches():
    torch.manual_seed(0)
    model = nn.Linear(5, 3)
    batches = [(torch.randn(4, 5), torch.randint(0, 3, (4,))) for _ in range(3)]
    with torch.no_grad():
        expected = sum(float(F.cross_entropy(model(x), y)) for x, y in batches) / len(batches)
    history = finetune(model, batches, epochs=1, lr=0.0)  # lr 0: the model, hence each batch's loss, stays put
    assert history.steps == 3
    assert history.loss == [pytest.approx(expected, rel=1e-6)]
    assert history.task == [pytest.approx(expected, rel=1e-6)]


class _Gated(nn.Module):
    """``extra`` takes part only in batches whose inputs sum above zero."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)
        self.extra = nn.Parameter(torch.ones(2))

    def forward(self, x):
        out = self.fc(x)
        return out + self.extra if bool(x.sum() > 0) else out


def test_a_parameter_without_a_gradient_in_a_step_is_not_moved():
    # Gradients are reset to None before each step (not to zeros): Adam skips a parameter a batch did not
    # reach, instead of moving it again with the momentum of earlier batches.
    torch.manual_seed(1)
    positive = (torch.rand(3, 4) + 0.1, torch.tensor([0, 1, 0]))
    negative = (-torch.rand(3, 4) - 0.1, torch.tensor([1, 1, 0]))
    torch.manual_seed(2)
    model = _Gated()
    finetune(model, [positive], epochs=1, lr=0.1)
    after_first = model.extra.detach().clone()
    assert not torch.equal(after_first, torch.ones(2))
    torch.manual_seed(2)
    model = _Gated()
    finetune(model, [positive, negative], epochs=1, lr=0.1)
    assert torch.equal(model.extra.detach(), after_first)


def test_distillation_loss_of_float64_teacher_logits_is_computed_in_the_students_dtype():
    torch.manual_seed(2)
    student, teacher = torch.randn(6, 5), torch.randn(6, 5, dtype=torch.float64)
    loss = distillation_loss(student, teacher, temperature=2.0)
    assert loss.dtype == torch.float32
    p = F.softmax(teacher.float() / 2.0, dim=-1)
    expected = (p * (p.log() - F.log_softmax(student / 2.0, dim=-1))).sum() / 6 * 4.0
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.parametrize("temperature", [0.0, -1.5])
def test_distillation_refuses_a_temperature_that_is_not_positive_and_says_which(temperature):
    with pytest.raises(InvalidInputError, match=f"temperature must be > 0, got {temperature}"):
        distillation_loss(torch.randn(2, 3), torch.randn(2, 3), temperature=temperature)


def test_finalize_without_example_inputs_says_where_to_give_them():
    model = nn.Sequential(nn.Linear(8, 8))
    twist = DeepTwist(model, {"0": ("svd", (2,))})
    with pytest.raises(InvalidInputError, match=r"^finalize needs example_inputs \(give them here or to DeepTwist\)$"):
        twist.finalize()


def test_factorized_model_plans_with_the_methods_asked_for():
    torch.manual_seed(3)
    model, x = VGG().eval(), torch.randn(2, 3, 16, 16)
    for methods in (["svd"], ["tucker2"]):
        gm = factorized_model(model, (x,), 0.5, methods=methods)
        used = {d.method for d in gm.fxdecomp_result.decisions if d.decomposed}
        assert used and used <= set(methods)


def test_any_mapping_is_taken_as_a_plan():
    from types import MappingProxyType

    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))
    plan = {"0": ("svd", (2,)), "2": ("svd", (3,))}
    from_dict = DeepTwist(model, dict(plan), every=1)
    from_mapping = DeepTwist(model, MappingProxyType(plan), every=1)
    assert from_mapping.plan == from_dict.plan
    from_mapping.step()
    assert torch.linalg.matrix_rank(model[0].weight.detach()) == 2 and torch.linalg.matrix_rank(model[2].weight.detach()) == 3
