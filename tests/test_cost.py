"""The cost model against hand formulas: every layer attribute, every decomposed structure, chains of layers.

The oracle counts each leaf layer of the module actually run: a Conv2d costs
2 * (output elements) * (in_channels / groups) * kh * kw FLOPs, a Linear
2 * (output elements) * in_features (one multiply-add = 2 FLOPs, bias not
counted), read off the shapes the layer really produced; `count_flops` (aten level,
torch.utils.flop_counter) must give the same.
"""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import fxdecomp
from fxdecomp.cost import FLOPS_PER_MAC, count_params, module_macs, spec_macs
from fxdecomp.decomposers import get_decomposer
from fxdecomp.layer_spec import layer_spec
from fxdecomp.layers import TiledLinear

from .strategies import conv_layers

CONV_METHODS = ["svd", "spatial_svd", "tucker2", "cp", "tt", "tiled_svd"]
GROUPED_OK = {"svd", "spatial_svd", "tucker2", "cp", "tt", "tiled_svd"}


def hand_flops(module: nn.Module, *inputs: torch.Tensor) -> int:
    """FLOPs of ``module(*inputs)``: hand formulas on the shapes each leaf layer produced."""
    total, handles, others = [0], [], []

    def hook(layer, args, out):
        if isinstance(layer, nn.Conv2d):
            total[0] += 2 * out.numel() * (layer.in_channels // layer.groups) * math.prod(layer.kernel_size)
        elif isinstance(layer, nn.Linear):
            total[0] += 2 * out.numel() * layer.in_features
        elif isinstance(layer, TiledLinear):  # per token: rows * r per input feature, cols * r per output
            rows, cols = layer.tiles
            tokens = out.numel() // layer.out_features
            total[0] += 2 * tokens * layer.rank * (layer.in_features * rows + layer.out_features * cols)
        else:  # the tensor-train Linear: its matmuls, counted by torch's own counter
            others.append((layer, args))

    for layer in module.modules():
        if isinstance(layer, (nn.Conv2d, nn.Linear, TiledLinear)) or type(layer).__name__ == "TTLinear":
            handles.append(layer.register_forward_hook(hook))
    try:
        with torch.no_grad():
            module(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    for layer, args in others:
        counter = FlopCounterMode(display=False)
        with counter, torch.no_grad():
            layer(*args)
        total[0] += counter.get_total_flops()
    return total[0]


def out_size(size: int, before: int, after: int, kernel: int, stride: int, dilation: int) -> int:
    return (size + before + after - dilation * (kernel - 1) - 1) // stride + 1


def expected_output_size(layer: nn.Conv2d, height: int, width: int) -> tuple[int, int]:
    """Output size from the layer's attributes; 'same' pads dilation * (k - 1) in total, the extra one after."""
    (kh, kw), (sh, sw), (dh, dw) = layer.kernel_size, layer.stride, layer.dilation
    if layer.padding == "same":
        return height, width
    ph, pw = (0, 0) if layer.padding == "valid" else layer.padding
    return out_size(height, ph, ph, kh, sh, dh), out_size(width, pw, pw, kw, sw, dw)


def image_for(layers, seed: int, batch: int) -> torch.Tensor:
    """An input large enough for every layer of the chain, reflect padding included."""
    height, width = 6, 7
    for layer in reversed(layers):
        (kh, kw), (sh, sw), (dh, dw) = layer.kernel_size, layer.stride, layer.dilation
        height, width = height * sh + dh * (kh - 1) + 2, width * sw + dw * (kw - 1) + 2
    return torch.randn(batch, layers[0].in_channels, height, width, generator=torch.Generator().manual_seed(seed))


@st.composite
def conv_chains(draw):
    first = draw(conv_layers())
    layers = [first]
    for _ in range(draw(st.integers(0, 2))):
        layers.append(draw(conv_layers(in_channels=layers[-1].out_channels)))
    return layers


@settings(max_examples=60)
@given(
    layers=conv_chains(),
    method=st.sampled_from(CONV_METHODS),
    fraction=st.sampled_from([0.2, 0.5, 1.0]),
    batch=st.integers(1, 3),
)
def test_conv_cost_is_the_hand_formula(layers, method, fraction, batch):
    x = image_for(layers, seed=len(layers), batch=batch)
    model = nn.Sequential(*layers)
    # The original chain: the cost model's MACs are the hand formula, output sizes from the attributes.
    shape, expected_macs = x.shape, 0
    for layer in layers:
        height, width = expected_output_size(layer, shape[2], shape[3])
        macs = shape[0] * layer.out_channels * (layer.in_channels // layer.groups) * math.prod(layer.kernel_size) * height * width
        assert spec_macs(layer_spec(layer), shape) == macs
        expected_macs += macs
        shape = (shape[0], layer.out_channels, height, width)
    with torch.no_grad():
        assert model(x).shape == shape
    assert module_macs(model, x.shape) * FLOPS_PER_MAC == 2 * expected_macs == hand_flops(model, x)

    # Every layer decomposed: structure MACs and params against the decomposed modules themselves.
    decomposed, structures, params = [], [], 0
    for layer in layers:
        if layer.groups > 1 and method not in GROUPED_OK:
            decomposed.append(layer)
            structures.append(layer)
            continue
        options = {}
        if method == "tiled_svd":  # tiles of unequal size where the channel counts are odd
            options["tiles"] = (2, 2)
        module = fxdecomp.decompose_layer(layer, method, fraction, **options)
        decomposer = get_decomposer("conv2d", method, **options)
        structures.append(decomposer.structure(layer_spec(layer), module.fxdecomp_ranks))
        assert decomposer.params(layer_spec(layer), module.fxdecomp_ranks) == count_params(module)
        decomposed.append(module)
    chain = nn.Sequential(*decomposed)
    flops = hand_flops(chain, x)
    assert module_macs(nn.Sequential(*structures), x.shape) * FLOPS_PER_MAC == flops
    assert fxdecomp.count_flops(chain, (x,)) == flops


@pytest.mark.parametrize("padding, kernel, dilation", [("same", (2, 4), (1, 1)), ("same", (3, 2), (2, 3)), ("valid", (2, 3), (1, 2))])
@pytest.mark.parametrize("mode", ["zeros", "reflect"])
def test_string_padding_even_kernels(padding, kernel, dilation, mode):
    # 'same' with an even extent pads one more after than before: the total must still count both.
    layer = nn.Conv2d(4, 6, kernel, padding=padding, dilation=dilation, padding_mode=mode)
    x = torch.randn(2, 4, 9, 11)
    height, width = expected_output_size(layer, 9, 11)
    expected = 2 * 2 * 6 * 4 * math.prod(kernel) * height * width
    assert module_macs(layer, x.shape) * FLOPS_PER_MAC == expected == hand_flops(layer, x)
    assert spec_macs(layer_spec(layer), x.shape) * FLOPS_PER_MAC == expected
    assert fxdecomp.count_flops(layer, (x,)) == expected


@pytest.mark.parametrize("method", ["svd", "tt", "tiled_svd"])
@pytest.mark.parametrize("fraction", [0.25, 1.0])
@pytest.mark.parametrize("lead", [(3, 5), (7,)])
def test_linear_cost_is_the_hand_formula(method, fraction, lead):
    layer = nn.Linear(48, 32)
    x = torch.randn(*lead, 48)
    decomposed = fxdecomp.decompose_layer(layer, method, fraction)
    spec = layer_spec(layer)
    decomposer = get_decomposer("linear", method)
    flops = hand_flops(decomposed, x)
    assert module_macs(decomposer.structure(spec, decomposed.fxdecomp_ranks), x.shape) * 2 == flops
    assert fxdecomp.count_flops(decomposed, (x,)) == flops
    assert decomposer.params(spec, decomposed.fxdecomp_ranks) == count_params(decomposed)
    tokens = math.prod(lead)
    assert spec_macs(spec, x.shape) * 2 == fxdecomp.count_flops(layer, (x,)) == 2 * tokens * 48 * 32
    if method == "svd":  # 48 -> r -> 32
        (r,) = decomposed.fxdecomp_ranks
        assert flops == 2 * tokens * r * (48 + 32)


def test_padding_modules_cost_nothing_and_change_the_shape():
    chain = nn.Sequential(nn.ZeroPad2d((1, 2, 3, 4)), nn.Conv2d(3, 5, 3), nn.ReflectionPad2d((0, 1, 1, 0)), nn.ChannelShuffle(5), nn.Conv2d(5, 2, 2))
    x = torch.randn(2, 3, 8, 9)
    # 8x9 -> pad 15x12 -> conv 13x10 -> pad 14x11 -> conv 13x10
    expected = 2 * (2 * 5 * 3 * 9 * 13 * 10 + 2 * 2 * 5 * 4 * 13 * 10)
    assert module_macs(chain, x.shape) * FLOPS_PER_MAC == expected == hand_flops(chain, x)


def test_count_flops_convention_is_two_per_multiply_add():
    assert fxdecomp.count_flops(nn.Linear(8, 4, bias=False), (torch.randn(2, 8),)) == 2 * 2 * 8 * 4
    assert fxdecomp.count_flops(nn.Conv2d(3, 4, 3, bias=False), (torch.randn(1, 3, 5, 5),)) == 2 * 4 * 3 * 9 * 3 * 3


class WithUnused(nn.Sequential):
    def __init__(self, *layers):
        super().__init__(*layers)
        self.unused = nn.Linear(2, 2)  # never called

    def forward(self, x):
        for layer in list(self)[:-1]:
            x = layer(x)
        return x


def test_count_flops_takes_a_bare_tensor_and_counts_in_eval_mode_quietly(caplog):
    model = WithUnused(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.Dropout(0.5), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 36, 5))
    x = torch.randn(2, 3, 6, 6)
    hand = 2 * (2 * 8 * 27 * 36) + 2 * (2 * 5 * 8 * 36)
    model.train()
    with caplog.at_level("WARNING"):
        train_count = fxdecomp.count_flops(model, x)  # a bare tensor is one input
    # Counted as the model runs in eval mode, whatever its mode; the mode is left as it was.
    assert train_count == fxdecomp.count_flops(model.eval(), (x,))
    assert train_count >= hand
    assert fxdecomp.count_flops(model[0], x) == 2 * 2 * 8 * 27 * 36
    model.train()
    fxdecomp.count_flops(model, (x,))
    assert all(m.training for m in model.modules())
    assert not [r for r in caplog.records if r.levelname == "WARNING"], caplog.records  # no counter chatter


class PadsInForward(nn.Conv2d):
    def forward(self, x):
        return super().forward(nn.functional.pad(x, (1, 1, 1, 1)))


def test_cost_model_refuses_conv_subclasses_with_their_own_forward():
    with pytest.raises(fxdecomp.errors.InvalidInputError, match="PadsInForward"):
        module_macs(PadsInForward(3, 4, 3), (1, 3, 8, 8))


def test_count_flops_counts_a_module_handed_a_view_of_a_parameter():
    """DBRX hands its expert MLP ``self.w1.view(E, out, in)[e]``; under no_grad that view requires grad without a grad
    function, and torch's per-module tracker in FlopCounterMode raised AssertionError (torch 2.13)."""

    class Apply(nn.Module):
        def forward(self, x, weight):
            return x @ weight.t()

    class Experts(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(2 * 4, 8))
            self.apply_one = Apply()

        def forward(self, x):
            return sum(self.apply_one(x, self.w.view(2, 4, 8)[e]) for e in range(2))

    assert fxdecomp.count_flops(Experts(), (torch.randn(3, 8),)) == 2 * (2 * 3 * 8 * 4)
