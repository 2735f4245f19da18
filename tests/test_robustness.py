"""Whatever it is given, compress returns a correct result or a clear error, and damages nothing."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import event, given, settings
from hypothesis import strategies as st
from torch import nn

import fxdecomp
from fxdecomp.errors import BudgetError, InvalidInputError, RecipeError

from .models import VGG

# ---- random architectures -----------------------------------------------------------------


class RandomNet(nn.Module):
    """A chain of blocks drawn by hypothesis: convs, residual pairs, pooling, activations, then a Linear head."""

    def __init__(self, blocks, in_channels, classes):
        super().__init__()
        self.kinds = [kind for kind, _ in blocks]
        layers, channels = [], in_channels
        for kind, params in blocks:
            if kind == "conv":
                out, kernel, stride, groups = params
                groups = math.gcd(groups, math.gcd(channels, out))
                layers.append(nn.Conv2d(channels, out, kernel, stride, kernel // 2, groups=groups))
                channels = out
            elif kind == "residual":
                layers.append(nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.ReLU(), nn.Conv2d(channels, channels, 1)))
            elif kind == "pool":
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
            else:
                layers.append(nn.ReLU())
        self.layers = nn.ModuleList(layers)
        self.head = nn.Linear(channels, classes)

    def forward(self, x):
        for kind, layer in zip(self.kinds, self.layers):
            x = x + layer(x) if kind == "residual" else layer(x)
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


blocks = st.lists(
    st.one_of(
        st.tuples(st.just("conv"), st.tuples(st.integers(1, 12), st.sampled_from([1, 3]), st.integers(1, 2), st.sampled_from([1, 1, 2]))),
        st.tuples(st.just("residual"), st.none()),
        st.tuples(st.just("pool"), st.none()),
        st.tuples(st.just("act"), st.none()),
    ),
    min_size=1,
    max_size=6,
)


@settings(max_examples=30, deadline=None)
@given(blocks=blocks, in_channels=st.integers(1, 4), classes=st.integers(1, 5), budget=st.floats(0.05, 1.0), seed=st.integers(0, 100))
def test_random_architectures_meet_the_budget_or_say_why(blocks, in_channels, classes, budget, seed):
    torch.manual_seed(seed)
    model = RandomNet(blocks, in_channels, classes).eval()
    x = torch.randn(2, in_channels, 8, 8)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        result = fxdecomp.compress(model, (x,), budget=budget, progress=False)
    except BudgetError as exc:
        event("budget error (unreachable)")
        assert exc.smallest_reachable is not None and exc.smallest_reachable > budget
        assert f"{exc.smallest_reachable:.4f}"[:4] in str(exc)
    else:
        event("met the budget")
        assert fxdecomp.count_flops(result.graph_module, (x,)) <= budget * fxdecomp.count_flops(model, (x,)) + 1e-6
        with torch.no_grad():
            assert result.graph_module(x).shape == model(x).shape
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


# ---- degenerate layers ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "layer, x",
    [
        (nn.Conv2d(1, 1, 3, padding=1), torch.randn(2, 1, 5, 5)),  # one channel
        (nn.Conv2d(4, 6, 3, padding=1), torch.randn(2, 4, 1, 1)),  # 1x1 spatial input
        (nn.Conv2d(4, 6, 1), torch.randn(2, 4, 3, 3)),  # 1x1 kernel
        (nn.Linear(8, 1), torch.randn(3, 8)),  # one output
        (nn.Linear(1, 5), torch.randn(3, 1)),  # one input
    ],
)
def test_degenerate_layers(layer, x):
    for method in fxdecomp.methods_for("conv2d" if isinstance(layer, nn.Conv2d) else "linear"):
        options = {"tiles": (1, 1)} if method == "tiled_svd" else {}
        full = fxdecomp.decompose_layer(layer, method, "full", **options)
        torch.testing.assert_close(full(x), layer(x), rtol=1e-4, atol=1e-4)
        rank_one = fxdecomp.decompose_layer(layer, method, 1, **options)
        assert rank_one(x).shape == layer(x).shape and all(r == 1 for r in rank_one.fxdecomp_ranks)


def test_model_of_degenerate_layers_compresses():
    model = nn.Sequential(nn.Conv2d(1, 1, 3, padding=1), nn.Flatten(), nn.Linear(16, 1)).eval()
    result = fxdecomp.compress(model, (torch.randn(2, 1, 4, 4),), budget=1.0)
    assert result.flops_after == result.flops_before


# ---- bad input: the error names the problem, the model stays as it was -----------------------


def _unchanged_after(model, call):
    state = {k: v.clone() for k, v in model.state_dict().items()}
    call()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_non_finite_weights_name_the_layer():
    model = VGG().eval()
    with torch.no_grad():
        model.features[3].weight[0, 0, 0, 0] = float("inf")

    def call():
        with pytest.raises(InvalidInputError, match=r"features\.3.*non-finite"):
            fxdecomp.compress(model, (torch.randn(1, 3, 16, 16),), budget=0.5)

    _unchanged_after(model, call)


def test_unknown_pass_and_option_in_a_recipe_list_the_known_ones(tmp_path):
    model = VGG().eval()
    unknown_pass = tmp_path / "bad_pass.toml"
    unknown_pass.write_text('[[pass]]\nname = "shape_prop"\n[[pass]]\nname = "fold_batchnorm"\n')
    unknown_option = tmp_path / "bad_option.toml"
    unknown_option.write_text('[[pass]]\nname = "plan"\noptions = { grid = 8, speed = "max" }\n')
    for recipe, words in ((unknown_pass, "known passes: .*plan"), (unknown_option, "its options are .*grid")):
        with pytest.raises(RecipeError, match=words):
            fxdecomp.compress(model, (torch.randn(1, 3, 16, 16),), budget=0.5, pipeline=recipe)


def test_wrong_example_inputs_and_model():
    model = VGG().eval()
    with pytest.raises(InvalidInputError, match="do not fit"):
        fxdecomp.compress(model, (torch.randn(1, 3, 16, 16), torch.randn(2)), budget=0.5)
    with pytest.raises(InvalidInputError, match="tuple of tensors"):
        fxdecomp.compress(model, [], budget=0.5)
    with pytest.raises(InvalidInputError, match="nn.Module"):
        fxdecomp.compress(lambda x: x, (torch.randn(1),), budget=0.5)


def test_layers_too_large_for_memory_are_refused_with_the_estimate(monkeypatch):
    from fxdecomp.factorize import svd

    monkeypatch.setattr(svd, "available_memory", lambda: 1 << 20)  # pretend 1 MiB is left
    with pytest.raises(fxdecomp.ResourceError, match=r"needs about .* GiB"):
        fxdecomp.decompose_layer(nn.Linear(512, 512), "svd", 8)


def test_determinism_bit_for_bit_including_cp():
    torch.manual_seed(0)
    model, x = VGG().eval(), torch.randn(2, 3, 16, 16)
    runs = [fxdecomp.compress(model, (x,), budget=0.5, methods=["cp", "svd"]) for _ in range(2)]
    assert runs[0].decisions == runs[1].decisions
    for (k1, v1), (k2, v2) in zip(runs[0].graph_module.state_dict().items(), runs[1].graph_module.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)
