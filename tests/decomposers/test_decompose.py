"""decompose_layer: exact at full rank for every attribute, better with rank, refusals with reasons."""

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import fxdecomp
from fxdecomp.errors import InvalidInputError, UnknownMethodError, UnsupportedLayerError

from tests.strategies import conv_layers

CONV_METHODS = ["svd", "spatial_svd", "tucker2", "cp", "tt", "tiled_svd"]
LINEAR_METHODS = ["svd", "tt", "tiled_svd"]
GROUPED_OK = set(CONV_METHODS)  # tt and tiled_svd decompose group by group since issue 16
TILES = st.tuples(st.integers(1, 3), st.integers(1, 3))  # tiles need not divide the channels since issue 16


def _input_for(layer: nn.Conv2d, seed: int = 1) -> torch.Tensor:
    (kh, kw), (dh, dw) = layer.kernel_size, layer.dilation
    height, width = dh * (kh - 1) + 6, dw * (kw - 1) + 7  # large enough for reflect padding too
    return torch.randn(2, layer.in_channels, height, width, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("method", CONV_METHODS)
@given(layer=conv_layers(), tiles=TILES)
def test_conv_full_rank_reproduces_layer(method, layer, tiles):
    x = _input_for(layer)
    options = {"tiles": tiles} if method == "tiled_svd" else {}
    decomposed = fxdecomp.decompose_layer(layer, method, "full", **options)
    torch.testing.assert_close(decomposed(x), layer(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method", LINEAR_METHODS)
@given(
    in_features=st.sampled_from([1, 4, 6, 12, 16]),
    out_features=st.sampled_from([1, 2, 6, 8, 18]),
    bias=st.booleans(),
    seed=st.integers(0, 2**16),
    tiles=TILES,
)
def test_linear_full_rank_reproduces_layer(method, in_features, out_features, bias, seed, tiles):
    torch.manual_seed(seed)
    layer = nn.Linear(in_features, out_features, bias=bias)
    x = torch.randn(3, 2, in_features)
    options = {"tiles": tiles} if method == "tiled_svd" else {}
    decomposed = fxdecomp.decompose_layer(layer, method, "full", **options)
    torch.testing.assert_close(decomposed(x), layer(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("tiles", [(2, 2), (4, 1), (1, 3), (2, 3)])
def test_tiled_svd_full_rank_with_real_tiles(tiles):
    torch.manual_seed(0)
    conv, linear = nn.Conv2d(6, 8, 3, padding=1), nn.Linear(12, 8)
    image = torch.randn(2, 6, 7, 7)
    decomposed = fxdecomp.decompose_layer(conv, "tiled_svd", "full", tiles=tiles)
    torch.testing.assert_close(decomposed(image), conv(image), rtol=1e-4, atol=1e-4)
    x = torch.randn(5, 12)
    torch.testing.assert_close(fxdecomp.decompose_layer(linear, "tiled_svd", "full", tiles=tiles)(x), linear(x), rtol=1e-4, atol=1e-4)


def _relative_error(module, layer, x):
    with torch.no_grad():
        ref = layer(x)
        return float((module(x) - ref).norm() / ref.norm())


@pytest.mark.parametrize("method", CONV_METHODS)
def test_conv_error_falls_as_rank_grows(method):
    torch.manual_seed(0)
    layer = nn.Conv2d(16, 16, 3, padding=1)
    x = torch.randn(4, 16, 9, 9)
    errors = [_relative_error(fxdecomp.decompose_layer(layer, method, f), layer, x) for f in (0.1, 0.3, 0.6, 1.0)]
    assert errors[-1] < 1e-4
    assert all(a >= b - 1e-3 for a, b in zip(errors, errors[1:])), errors
    assert errors[0] > errors[-1] + 0.05


@pytest.mark.parametrize("method", LINEAR_METHODS)
def test_linear_error_falls_as_rank_grows(method):
    torch.manual_seed(0)
    layer = nn.Linear(64, 48)
    x = torch.randn(32, 64)
    errors = [_relative_error(fxdecomp.decompose_layer(layer, method, f), layer, x) for f in (0.1, 0.3, 0.6, 1.0)]
    assert errors[-1] < 1e-4
    assert all(a >= b - 1e-6 for a, b in zip(errors, errors[1:])), errors
    assert errors[0] > 0.3


@pytest.mark.parametrize("layer", [nn.Linear(64, 48), nn.Linear(20, 90), nn.Conv2d(8, 12, (3, 2), padding=1, bias=False)], ids=["linear", "linear-tall", "conv"])
@pytest.mark.parametrize("rank", [1, 3, 7])
def test_svd_reaches_the_eckart_young_optimum(layer, rank):
    # The composed weight is the best rank-r approximation: its error is the tail of the singular values.
    torch.manual_seed(rank)
    layer.reset_parameters()
    decomposed = fxdecomp.decompose_layer(layer, "svd", rank)
    first, second = decomposed[0].weight.detach().double(), decomposed[1].weight.detach().double()
    composed = second.reshape(second.shape[0], rank) @ first.reshape(rank, -1)
    matrix = layer.weight.detach().double().reshape(layer.weight.shape[0], -1)
    s = torch.linalg.svdvals(matrix)
    assert torch.linalg.matrix_rank(composed) == rank
    assert float((composed - matrix).norm()) == pytest.approx(float(s[rank:].norm()), rel=1e-5)
    if layer.bias is not None:
        assert torch.equal(decomposed[1].bias, layer.bias)


class StaticSamePaddingConv(nn.Conv2d):
    """EfficientNet's Conv2dStaticSamePadding: TF-style 'SAME' padding in its own forward."""

    def __init__(self, in_ch, out_ch, kernel, stride, image_size):
        super().__init__(in_ch, out_ch, kernel, stride, bias=False)
        pad_h = max((-(-image_size // stride) - 1) * stride + kernel - image_size, 0)
        self.static_padding = nn.ZeroPad2d((pad_h // 2, pad_h - pad_h // 2, pad_h // 2, pad_h - pad_h // 2))

    def forward(self, x):
        return F.conv2d(self.static_padding(x), self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class DynamicPaddingConv(nn.Conv2d):
    def forward(self, x):
        pad = x.shape[-1] % 3  # depends on the input size: no static equivalent
        return F.conv2d(F.pad(x, (pad, 0, pad, 0)), self.weight, self.bias, self.stride)


@pytest.mark.parametrize("method", CONV_METHODS)
def test_subclass_that_pads_in_forward(method):
    torch.manual_seed(0)
    layer = StaticSamePaddingConv(4, 8, 3, 2, image_size=10)
    x = torch.randn(1, 4, 10, 10)
    decomposed = fxdecomp.decompose_layer(layer, method, "full", **({"tiles": (2, 2)} if method == "tiled_svd" else {}))
    torch.testing.assert_close(decomposed(x), layer(x), rtol=1e-4, atol=1e-4)


def test_efficientnet_lite_convs_reproduced():
    import efficientnet_lite_pytorch as efficientnet  # a declared test dependency: missing is a failure
    model = efficientnet.EfficientNet.from_name("efficientnet-lite0")
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups == 1][:4]
    assert convs and any(type(c).forward is not nn.Conv2d.forward for c in convs)
    for conv in convs:
        x = torch.randn(1, conv.in_channels, 16, 16)
        torch.testing.assert_close(fxdecomp.decompose_layer(conv, "tucker2", "full")(x), conv(x), rtol=1e-4, atol=1e-4)


def test_input_dependent_padding_is_refused():
    with pytest.raises(UnsupportedLayerError, match="DynamicPaddingConv"):
        fxdecomp.decompose_layer(DynamicPaddingConv(3, 4, 3), "svd", 2)


def test_layer_is_not_modified_and_result_has_its_dtype_and_mode():
    layer = nn.Conv2d(4, 6, 3).double().eval()
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    decomposed = fxdecomp.decompose_layer(layer, "tucker2", (2, 3))
    assert all(torch.equal(before[k], v) for k, v in layer.state_dict().items())
    assert all(p.dtype == torch.float64 for p in decomposed.parameters())
    assert not decomposed.training


def test_rank_specs():
    torch.manual_seed(0)
    layer = nn.Conv2d(8, 16, 3)
    assert fxdecomp.decompose_layer(layer, "tucker2", 4).fxdecomp_ranks == (4, 4)
    assert fxdecomp.decompose_layer(layer, "tucker2", 100).fxdecomp_ranks == (8, 16)
    assert fxdecomp.decompose_layer(layer, "tucker2", 0.5).fxdecomp_ranks == (4, 8)
    assert fxdecomp.decompose_layer(layer, "tucker2", (3, 5)).fxdecomp_ranks == (3, 5)
    assert fxdecomp.decompose_layer(layer, "svd", "full").fxdecomp_ranks == (16,)
    assert fxdecomp.decompose_layer(layer, "svd", "energy:1.0").fxdecomp_ranks == (16,)
    # Energy rules: the smallest rank whose leading squared singular values keep the fraction.
    energies = torch.linalg.svdvals(layer.weight.detach().double().reshape(16, -1)) ** 2
    kept = torch.cumsum(energies, 0) / energies.sum()
    for fraction in (0.5, 0.8, 0.95):
        expected = int((kept < fraction).sum()) + 1
        assert kept[expected - 1] >= fraction and (expected == 1 or kept[expected - 2] < fraction)
        assert fxdecomp.decompose_layer(layer, "svd", f"energy:{fraction}").fxdecomp_ranks == (expected,)


def test_vbmf_rank_spec_finds_planted_rank():
    torch.manual_seed(0)
    layer = nn.Linear(200, 100)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(100, 6) @ torch.randn(6, 200) + 0.01 * torch.randn(100, 200))
    assert fxdecomp.decompose_layer(layer, "svd", "vbmf").fxdecomp_ranks == (6,)


@pytest.mark.parametrize(
    "ranks, words",
    [(0, "at least 1"), (1.5, r"\(0, 1\]"), ((2,), "takes 2 rank"), ((2, 99), "int in"), ("energy:2", "energy"), ("bogus", "unknown rank rule"), (True, "not a rank")],
)
def test_bad_rank_specs(ranks, words):
    with pytest.raises(InvalidInputError, match=words):
        fxdecomp.decompose_layer(nn.Conv2d(8, 16, 3), "tucker2", ranks)


def test_bad_methods_and_options():
    with pytest.raises(UnknownMethodError, match="known methods"):
        fxdecomp.decompose_layer(nn.Linear(4, 4), "qr", 2)
    with pytest.raises(UnsupportedLayerError, match="does not apply to linear"):
        fxdecomp.decompose_layer(nn.Linear(4, 4), "tucker2", 2)
    with pytest.raises(InvalidInputError, match="no option"):
        fxdecomp.decompose_layer(nn.Linear(4, 4), "svd", 2, tiles=(2, 2))
    with pytest.raises(UnsupportedLayerError, match="not a Conv2d or Linear"):
        fxdecomp.decompose_layer(nn.Embedding(4, 4), "svd", 2)  # Conv1d is decomposed since issue 13


def test_non_finite_weights_are_refused():
    layer = nn.Conv2d(4, 4, 3)
    with torch.no_grad():
        layer.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(InvalidInputError, match="non-finite"):
        fxdecomp.decompose_layer(layer, "svd", 2)


@pytest.mark.parametrize("method", CONV_METHODS)
def test_conv_reconstruct_equals_the_built_module(method):
    from fxdecomp.decomposers import get_decomposer
    from fxdecomp.layer_spec import layer_spec, reference_conv

    torch.manual_seed(0)
    groups = 2 if method in GROUPED_OK else 1
    layer = nn.Conv2d(8, 12, (3, 2), stride=(1, 2), padding=(1, 0), groups=groups, padding_mode="reflect")
    spec, decomposer = layer_spec(layer), get_decomposer("conv2d", method)
    state = decomposer.factorize(spec, layer.weight.detach())
    ranks = tuple(max(1, m // 3) for m in decomposer.max_ranks(spec))
    dense = decomposer.reconstruct(spec, state, ranks).float()
    x = torch.randn(2, 8, 9, 9)
    module = decomposer.build(spec, state, ranks, layer.bias.detach(), layer.weight)
    torch.testing.assert_close(module(x), reference_conv(x, dense, layer.bias, spec), rtol=1e-4, atol=1e-4)
    relative = float((dense - layer.weight.double()).norm() / layer.weight.double().norm())
    assert relative == pytest.approx(decomposer.error(spec, state, ranks), rel=1e-3) or method == "tt"


@pytest.mark.parametrize("method", LINEAR_METHODS)
def test_linear_reconstruct_equals_the_built_module(method):
    from fxdecomp.decomposers import get_decomposer
    from fxdecomp.layer_spec import layer_spec

    torch.manual_seed(0)
    layer = nn.Linear(24, 36)
    spec, decomposer = layer_spec(layer), get_decomposer("linear", method)
    state = decomposer.factorize(spec, layer.weight.detach())
    ranks = tuple(max(1, m // 3) for m in decomposer.max_ranks(spec))
    dense = decomposer.reconstruct(spec, state, ranks).float()
    x = torch.randn(5, 24)
    module = decomposer.build(spec, state, ranks, layer.bias.detach(), layer.weight)
    torch.testing.assert_close(module(x), torch.nn.functional.linear(x, dense, layer.bias), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "method, layer, shape",
    [
        ("svd", nn.Conv2d(6, 8, 3, padding=1), (2, 6, 7, 7)),
        ("svd", nn.Linear(12, 10), (3, 12)),
        ("spatial_svd", nn.Conv2d(6, 8, 3, padding=1), (2, 6, 7, 7)),
        ("tucker2", nn.Conv2d(6, 8, 3, padding=1), (2, 6, 7, 7)),
        ("cp", nn.Conv2d(6, 8, 3, padding=1), (2, 6, 7, 7)),
        ("tt", nn.Linear(12, 10), (3, 12)),
        ("tiled_svd", nn.Conv2d(6, 8, 3, padding=1), (2, 6, 7, 7)),
    ],
)
def test_float64_layer_is_reproduced_to_float64_precision_at_full_rank(method, layer, shape):
    # Factors used to be loaded into float32 layers and cast up afterwards: ~3e-8, not ~1e-15.
    torch.manual_seed(0)
    layer = copy.deepcopy(layer).double()
    x = torch.randn(*shape, dtype=torch.float64)
    decomposed = fxdecomp.decompose_layer(layer, method, "full")
    with torch.no_grad():
        expected, actual = layer(x), decomposed(x)
    assert float((actual - expected).norm() / expected.norm()) < 1e-12
