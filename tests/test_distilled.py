"""fxdecomp.distilled_batches: inputs whose BatchNorm statistics match the running ones (ZeroQ)."""

import pytest
import torch
from torch import nn

import fxdecomp
from fxdecomp.errors import InvalidInputError
from tests.cli_factory import bn_cnn


def _distance(net: nn.Module, x: torch.Tensor) -> float:
    """The ZeroQ loss recomputed here: each BatchNorm input's channel mean / std against the running ones."""
    seen = []
    handles = [m.register_forward_pre_hook(lambda m, a: seen.append((m, a[0]))) for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        net(x)
    for h in handles:
        h.remove()
    total = 0.0
    for bn, v in seen:
        total += float((v.mean((0, 2, 3)) - bn.running_mean).norm() + (v.var((0, 2, 3), unbiased=False).add(bn.eps).sqrt() - bn.running_var.add(bn.eps).sqrt()).norm())
    return total


def test_distilled_inputs_match_the_batchnorm_statistics_and_leave_the_model_alone():
    net = bn_cnn()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    example = torch.randn(2, 3, 12, 12)
    batches = fxdecomp.distilled_batches(net, (example,), count=12, batch_size=5, steps=150, lr=0.1)
    assert [b[0].shape for b in batches] == [(5, 3, 12, 12), (5, 3, 12, 12), (2, 3, 12, 12)]
    distilled = torch.cat([b[0] for b in batches])
    noise = torch.randn(12, 3, 12, 12, generator=torch.Generator().manual_seed(0))
    assert _distance(net, distilled) < 0.2 * _distance(net, noise)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert all(p.grad is None for p in net.parameters()) and not net.training
    again = fxdecomp.distilled_batches(net, example, count=12, batch_size=5, steps=150, lr=0.1)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again))  # seeded: the same inputs


def test_distilled_data_calibrates_compress():
    net = bn_cnn()
    example = torch.randn(2, 3, 12, 12)
    data = fxdecomp.distilled_batches(net, example, count=8, batch_size=4, steps=20)
    result = fxdecomp.compress(net, (example,), budget=0.6, calibration=data)
    weight_only = fxdecomp.compress(net, (example,), budget=0.6)
    assert result.flops_after <= 0.6 * result.flops_before
    # errors measured on the distilled inputs, not on the weights
    assert [d.error for d in result.decisions] != [d.error for d in weight_only.decisions]


def test_distillation_under_no_grad_restores_every_module_mode():
    net = bn_cnn().train()
    net[2].eval()  # a user's own mix of modes
    with torch.no_grad():
        data = fxdecomp.distilled_batches(net, torch.randn(2, 3, 12, 12), count=4, batch_size=4, steps=3)
    assert data[0][0].shape == (4, 3, 12, 12) and not data[0][0].requires_grad
    assert [m.training for m in net.modules()] == [True, True, True, False] + [True] * 6


def test_models_that_cannot_be_distilled_are_refused_by_name():
    with pytest.raises(InvalidInputError, match="no BatchNorm"):
        fxdecomp.distilled_batches(nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)), torch.randn(2, 4))
    with pytest.raises(InvalidInputError, match="floating-point input"):
        fxdecomp.distilled_batches(bn_cnn(), torch.zeros(2, 3, 8, 8, dtype=torch.long))
    class Unused(nn.Module):  # a BatchNorm that forward never calls
        def __init__(self):
            super().__init__()
            self.norm, self.linear = nn.BatchNorm1d(4), nn.Linear(4, 4)

        def forward(self, x):
            return self.linear(x)

    with pytest.raises(InvalidInputError, match="none of the model's BatchNorms ran"):
        fxdecomp.distilled_batches(Unused().eval(), torch.randn(2, 4))
    with pytest.raises(InvalidInputError, match="count >= 2"):
        fxdecomp.distilled_batches(bn_cnn(), torch.randn(2, 3, 8, 8), count=1)
