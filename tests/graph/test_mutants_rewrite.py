"""Tests written to kill mutation-testing survivors in fxdecomp/graph/rewrite.py (tools/mutation/run.py rewrite).

Where a decomposed functional weight's module is installed (in place of an owner
nothing else reads, or next to the weight as ``<weight>_lowrank``, ``..2``,
``..3`` for each further call configuration), that the weight is dropped, and
that a single-module factorization (TT) becomes one call. Oracle: the outputs
recomputed in the test with each weight replaced by its truncated SVD.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import fxdecomp


def _truncated_conv_weight(w: torch.Tensor, rank: int) -> torch.Tensor:
    """Channel SVD of a (T, S, kh, kw) weight: rank-r truncation of its (T, S kh kw) unfolding."""
    u, s, vh = torch.linalg.svd(w.detach().double().flatten(1), full_matrices=False)
    return ((u[:, :rank] * s[:rank]) @ vh[:rank]).reshape(w.shape).to(w.dtype)


class _Holder(nn.Module):
    def __init__(self, with_fc: bool):
        super().__init__()
        self.w = nn.Parameter(torch.randn(16, 8, 3, 3) * 0.2)
        if with_fc:
            self.fc = nn.Linear(16, 16)


class _ThreeConfigurations(nn.Module):
    """One functional conv weight, called with three different strides/paddings, between two plain layers."""

    def __init__(self, with_fc: bool = False, configurations: int = 3):
        super().__init__()
        self.first = nn.Conv2d(8, 8, 1)
        self.block = _Holder(with_fc)
        self.head = nn.Linear(16, 4)
        self.configurations = [dict(padding=1), dict(stride=2, padding=1), dict(padding=0)][:configurations]

    def forward(self, x, weights=None):
        x = self.first(x)
        weights = weights or [self.block.w] * len(self.configurations)
        y = sum(F.conv2d(x, w, **c).mean((2, 3)) for w, c in zip(weights, self.configurations))
        if hasattr(self.block, "fc"):
            y = self.block.fc(y)
        return self.head(y)


def test_each_call_configuration_gets_its_own_numbered_module_and_the_weight_is_dropped():
    torch.manual_seed(0)
    model, x = _ThreeConfigurations().eval(), torch.randn(2, 8, 10, 10)
    names = ["block.w", "block.w@conv2d_2", "block.w@conv2d_3"]
    result = fxdecomp.compress(model, (x,), plan={n: ("svd", (4,)) for n in names})
    gm = result.graph_module
    assert [d.name for d in result.decisions if d.decomposed] == names
    assert {n for n, _ in gm.block.named_children()} == {"w_lowrank", "w_lowrank2", "w_lowrank3"}
    assert "block.w" not in gm.state_dict()  # nothing reads it any more
    truncated = [_truncated_conv_weight(model.block.w, 4)] * 3
    with torch.no_grad():
        assert torch.allclose(gm(x), model(x, truncated), atol=1e-5)


def test_an_owner_nothing_else_reads_is_replaced_by_the_decomposed_module():
    torch.manual_seed(1)
    model, x = _ThreeConfigurations(configurations=1).eval(), torch.randn(2, 8, 10, 10)
    gm = fxdecomp.compress(model, (x,), plan={"block.w": ("svd", (3,))}).graph_module
    assert isinstance(gm.block, nn.Sequential) and len(gm.block) == 2
    assert sorted(gm.state_dict()) == sorted(
        ["first.weight", "first.bias", "block.0.weight", "block.1.weight", "head.weight", "head.bias"])
    with torch.no_grad():
        assert torch.allclose(gm(x), model(x, [_truncated_conv_weight(model.block.w, 3)]), atol=1e-5)


def test_an_owner_whose_submodule_is_still_called_keeps_it_and_gets_a_lowrank_sibling():
    torch.manual_seed(2)
    model, x = _ThreeConfigurations(with_fc=True, configurations=1).eval(), torch.randn(2, 8, 10, 10)
    gm = fxdecomp.compress(model, (x,), plan={"block.w": ("svd", (3,))}).graph_module
    assert {n for n, _ in gm.block.named_children()} == {"fc", "w_lowrank"}
    assert torch.equal(gm.block.fc.weight, model.block.fc.weight)
    with torch.no_grad():
        assert torch.allclose(gm(x), model(x, [_truncated_conv_weight(model.block.w, 3)]), atol=1e-5)


class _MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 32)
        self.head = nn.Linear(32, 3)

    def forward(self, x):
        return self.head(torch.relu(self.fc(x)))


def test_a_single_module_factorization_becomes_one_call_of_that_module():
    torch.manual_seed(3)
    model, x = _MLP().eval(), torch.randn(5, 64)
    reference = fxdecomp.decompose_layer(model.fc, "tt", (4, 4))
    result = fxdecomp.compress(model, (x,), plan={"fc": ("tt", (4, 4))})
    gm = result.graph_module
    assert type(gm.fc) is type(reference)
    calls = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert calls == ["fc", "head"]
    with torch.no_grad():
        assert torch.allclose(gm(x), model.head(torch.relu(reference(x))), atol=1e-5)
