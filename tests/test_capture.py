"""Capture of graphs users bring: weights hidden in opaque calls (issue 13, kind 5), models no frontend captures whole (kind 7).

Oracles are recomputed here: FLOPs with torch.utils.flop_counter on the original
and on the result, outputs against the original model.
"""

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.utils.flop_counter import FlopCounterMode

import fxdecomp
from fxdecomp.capture import opaque_weights
from fxdecomp.frontend import capture, fx_trace


def flops(model, inputs) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(*inputs)
    return counter.get_total_flops()


def state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, model.training


def assert_untouched(model, before):
    params, training = before
    now = model.state_dict()
    assert model.training == training
    assert set(now) == set(params) and all(torch.equal(now[k], v) for k, v in params.items())


# ---- kind 5: Linear/Conv weights handed to calls fx does not trace into ---------------------------


@fx.wrap
def mlp_kernel(x, w1, b1, w2):
    """A torch.fx leaf, like torchvision's shifted_window_attention: weights arrive as arguments."""
    return F.linear(F.linear(x, w1, b1).relu(), w2)


class WrappedMLP(nn.Module):
    def __init__(self, width=64, hidden=256):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(hidden, width) / width**0.5)
        self.b1 = nn.Parameter(torch.randn(hidden))
        self.w2 = nn.Parameter(torch.randn(width, hidden) / hidden**0.5)
        self.head = nn.Linear(width, 8)

    def forward(self, x):
        return self.head(mlp_kernel(x, self.w1, self.b1, self.w2))


class ApplyWeight(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight):
        return x @ weight.t()

    @staticmethod
    def backward(ctx, grad):
        raise NotImplementedError


class AutogradFunctionMLP(nn.Module):
    def __init__(self, width=64, hidden=256):
        super().__init__()
        self.w = nn.Parameter(torch.randn(hidden, width) / width**0.5)
        self.head = nn.Linear(hidden, 8)

    def forward(self, x):
        return self.head(ApplyWeight.apply(x, self.w).relu())


class Block(nn.Module):
    def __init__(self, width=64, hidden=256):
        super().__init__()
        self.fc = nn.Linear(width, hidden)

    def forward(self, x):
        return self.fc(x).relu()


class ScriptedMLP(nn.Module):
    def __init__(self, width=64, hidden=256):
        super().__init__()
        self.inner = torch.jit.script(Block(width, hidden))
        self.head = nn.Linear(hidden, 8)

    def forward(self, x):
        return self.head(self.inner(x))


def test_opaque_weights_found_in_fx_graphs():
    assert [(w.parameter, w.shape) for w in opaque_weights(fx_trace(WrappedMLP()))] == [("w1", (256, 64)), ("w2", (64, 256))]
    assert "mlp_kernel" in opaque_weights(fx_trace(WrappedMLP()))[0].consumer
    scripted = opaque_weights(fx_trace(ScriptedMLP()))
    assert [w.parameter for w in scripted] == ["inner.fc.weight"] and "scripted" in scripted[0].consumer
    assert opaque_weights(fx_trace(AutogradFunctionMLP())) == ()  # fx runs the Function's forward: w is visible
    assert opaque_weights(fx_trace(Block())) == ()


def test_wrapped_function_weights_are_captured_through_export():
    model, x = WrappedMLP(), torch.randn(4, 64)
    before = state(model)
    gm, frontend = capture(model, (x,))
    assert frontend == "export" and opaque_weights(gm) == ()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = fxdecomp.compress(model, (x,), budget=0.5)
    assert not [w for w in caught if "trace into" in str(w.message)]  # nothing is hidden any more
    names = {d.name for d in result.decisions}
    assert {"w1", "w2", "head"} <= names
    kept = flops(result.graph_module, (x,)) / flops(model, (x,))
    assert kept <= 0.5 + 1e-6  # counted independently on the result
    assert result.opaque_weights == ()
    full = fxdecomp.compress(model, (x,), budget=1.0, plan={n: ("svd", (64,)) for n in ("w1", "w2")})
    torch.testing.assert_close(full.graph_module(x), model(x), rtol=1e-4, atol=1e-4)
    assert_untouched(model, before)


def test_autograd_function_weight_is_a_candidate():
    model, x = AutogradFunctionMLP(), torch.randn(4, 64)
    result = fxdecomp.compress(model, (x,), budget=0.5)
    assert "w" in {d.name for d in result.decisions}
    assert flops(result.graph_module, (x,)) / flops(model, (x,)) <= 0.5 + 1e-6


def test_scripted_submodule_weights_are_named_in_a_warning():
    # torch.export cannot call a scripted submodule; the fx graph is kept and the weight named.
    model, x = ScriptedMLP(), torch.randn(4, 64)
    before = state(model)
    with pytest.warns(UserWarning, match=r"'inner\.fc\.weight' \(256, 64\) in scripted submodule 'inner'.*Way out"):
        gm, frontend = capture(model, (x,))
    assert frontend == "fx"
    assert [w.parameter for w in gm.meta["fxdecomp.opaque_weights"]] == ["inner.fc.weight"]
    torch.testing.assert_close(gm(x), model(x))
    assert_untouched(model, before)
