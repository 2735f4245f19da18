"""Conv1d, Conv3d and ConvTranspose1d/2d/3d: exact at full rank for every method that applies, refusals
with reasons, MACs against torch's flop counter, compress end to end (module and functional forms), ONNX parity.

Every oracle is recomputed here: the layer's own output, torch.utils.flop_counter's FLOPs (2 per
multiply-add), onnxruntime's output.
"""

import copy
import math

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from hypothesis import event, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import fxdecomp
from fxdecomp.cost import module_macs, spec_macs
from fxdecomp.decomposers import get_decomposer
from fxdecomp.errors import BudgetError, UnsupportedLayerError
from fxdecomp.examples.conv_kinds import end_to_end_cases
from fxdecomp.latency import original_module
from fxdecomp.layer_spec import layer_spec, reference_conv

METHODS = ["svd", "spatial_svd", "tucker2", "cp", "tt", "tiled_svd"]
CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
CONV_T = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}


@st.composite
def conv_layers(draw):
    """A Conv1d/3d or ConvTranspose1d/2d/3d with random channels, groups, kernel, stride, padding, dilation, bias."""
    transposed = draw(st.booleans())
    ndim = draw(st.sampled_from([1, 2, 2, 3] if transposed else [1, 1, 3]))
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    in_ch, out_ch = groups * draw(st.integers(1, 3)), groups * draw(st.integers(1, 3))
    kernel = tuple(draw(st.integers(1, 3 if ndim == 3 else 4)) for _ in range(ndim))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(ndim))
    bias = draw(st.booleans())
    torch.manual_seed(draw(st.integers(0, 2**16)))
    if transposed:
        stride = tuple(draw(st.integers(1, 3)) for _ in range(ndim))
        padding = tuple(draw(st.integers(0, 2)) for _ in range(ndim))
        output_padding = tuple(draw(st.integers(0, max(s, d) - 1)) for s, d in zip(stride, dilation))
        return CONV_T[ndim](in_ch, out_ch, kernel, stride, padding, output_padding, groups, bias, dilation)
    mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
    if draw(st.booleans()):  # 'same' with an even kernel pads asymmetrically
        padding, stride = draw(st.sampled_from(["same", "valid"])), 1
    else:
        padding = tuple(draw(st.integers(0, 2)) for _ in range(ndim))
        stride = tuple(draw(st.integers(1, 3)) for _ in range(ndim))
    return CONV[ndim](in_ch, out_ch, kernel, stride, padding, dilation, groups, bias, mode)


def _input_for(layer, batch=2, seed=1):
    # Large enough for reflect padding and for a positive transposed-conv output.
    sizes = [d * (k - 1) + 5 + i for i, (k, d) in enumerate(zip(layer.kernel_size, layer.dilation))]
    return torch.randn(batch, layer.in_channels, *sizes, generator=torch.Generator().manual_seed(seed))


def _refusal(layer, method):
    """The words of the expected refusal, or None where the method applies."""
    if method == "spatial_svd" and layer.weight.dim() == 3:
        return "one spatial axis"
    return None


@pytest.mark.parametrize("method", METHODS)
@given(layer=conv_layers(), tiles=st.tuples(st.integers(1, 3), st.integers(1, 3)))
def test_full_rank_reproduces_every_conv_kind(method, layer, tiles):
    options = {"tiles": tiles} if method == "tiled_svd" else {}
    words = _refusal(layer, method)
    if words is not None:
        with pytest.raises(UnsupportedLayerError, match=words):
            fxdecomp.decompose_layer(layer, method, "full", **options)
        return
    x = _input_for(layer)
    decomposed = fxdecomp.decompose_layer(layer, method, "full", **options)
    with torch.no_grad():
        torch.testing.assert_close(decomposed(x), layer(x), rtol=1e-4, atol=1e-4)


def _layers():
    torch.manual_seed(0)
    return {
        "conv1d": nn.Conv1d(6, 8, 5, stride=2, padding=3, dilation=2, groups=2, padding_mode="circular"),
        "conv3d": nn.Conv3d(6, 8, (3, 2, 3), stride=(1, 2, 1), padding="valid", groups=2),
        "conv3d-same": nn.Conv3d(4, 6, (2, 3, 2), padding="same", padding_mode="replicate"),
        "conv_transpose1d": nn.ConvTranspose1d(6, 8, 4, stride=3, padding=1, output_padding=2, groups=2),
        "conv_transpose2d": nn.ConvTranspose2d(6, 8, (3, 4), stride=(2, 1), padding=(1, 2), output_padding=(1, 0), dilation=(1, 2), groups=2),
        "conv_transpose3d": nn.ConvTranspose3d(4, 6, 2, stride=2, bias=False),
    }


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("name", list(_layers()))
def test_reconstruct_and_error_match_the_built_module(name, method):
    """At a low rank the built module computes the conv of `reconstruct`'s weight, whose error is `error`."""
    layer = _layers()[name]
    spec = layer_spec(layer)
    options = {"tiles": (2, 2)} if method == "tiled_svd" else {}
    decomposer = get_decomposer(spec.kind, method, **options)
    if _refusal(layer, method) is not None:
        with pytest.raises(UnsupportedLayerError, match=_refusal(layer, method)):
            decomposer.check(spec)
        return
    decomposer.check(spec)
    state = decomposer.factorize(spec, layer.weight.detach())
    ranks = tuple(max(1, m // 3) for m in decomposer.max_ranks(spec))
    dense = decomposer.reconstruct(spec, state, ranks)
    assert dense.shape == layer.weight.shape
    x = _input_for(layer)
    module = decomposer.build(spec, state, ranks, layer.bias.detach() if layer.bias is not None else None, layer.weight)
    with torch.no_grad():
        torch.testing.assert_close(module(x), reference_conv(x, dense.float(), layer.bias, spec), rtol=1e-4, atol=1e-4)
    relative = float((dense - layer.weight.double()).norm() / layer.weight.double().norm())
    assert relative > 1e-3  # really truncated
    if method != "tt":  # tt reports the TT-SVD bound
        assert relative == pytest.approx(decomposer.error(spec, state, ranks), rel=1e-3)


def _flops(module, *inputs):
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(*inputs)
    return counter.get_total_flops()


@pytest.mark.parametrize("name", list(_layers()))
def test_macs_match_torch_flop_counter(name):
    layer = _layers()[name]
    x = _input_for(layer)
    spec = layer_spec(layer)
    assert 2 * spec_macs(spec, tuple(x.shape)) == _flops(layer, x)
    assert 2 * module_macs(layer, tuple(x.shape)) == _flops(layer, x)
    assert spec_macs(spec, tuple(x.shape[1:])) * 2 == spec_macs(spec, tuple(x.shape))  # unbatched input
    for method in ("svd", "tucker2", "cp"):
        decomposed = fxdecomp.decompose_layer(layer, method, 0.5)
        assert 2 * module_macs(decomposed, tuple(x.shape)) == _flops(decomposed, x)
    original = original_module(spec)  # the latency model's stand-in: same structure and output shape
    assert 2 * module_macs(original, tuple(x.shape)) == _flops(layer, x)
    assert original(x).shape == layer(x).shape


def test_transposed_conv_macs_follow_the_input_positions():
    layer = nn.ConvTranspose2d(6, 8, (3, 2), stride=2, groups=2)
    # in_channels * out_channels/groups * prod(kernel) * prod(input spatial) * batch
    assert spec_macs(layer_spec(layer), (3, 6, 5, 7)) == 6 * 4 * 6 * 35 * 3


def _models():
    return [(model, x) for _, model, x in end_to_end_cases()]


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, model.training, [p.requires_grad for p in model.parameters()]


@pytest.mark.parametrize("index", range(3), ids=["audio-conv1d", "video-conv3d", "decoder-conv-transpose2d"])
def test_compress_new_kinds_end_to_end(index):
    model, x = _models()[index]
    model.train()
    before, x_before = _snapshot(model), x.clone()
    result = fxdecomp.compress(model, (x,), budget=0.5)
    reference_model = copy.deepcopy(model).eval()
    flops_before, flops_after = _flops(reference_model, x), _flops(result.graph_module, x)
    assert flops_after <= 0.5 * flops_before
    new_kinds = {"conv1d", "conv3d", "conv_transpose2d"}
    assert any(d.op in new_kinds and d.method != "keep" for d in result.decisions)
    # Full rank: every candidate decomposed with tucker2 at its maximum ranks.
    layers = dict(model.named_modules())
    plan = {d.name: ("tucker2" if d.op != "linear" else "svd", ()) for d in result.decisions}
    plan = {name: (method, fxdecomp.decompose_layer(layers[name], method, "full").fxdecomp_ranks) for name, (method, _) in plan.items()}
    full = fxdecomp.compress(model, (x,), plan=plan)
    assert all(d.method != "keep" for d in full.decisions)
    state, training, grads = _snapshot(model)
    assert training == before[1] and grads == before[2] and torch.equal(x, x_before)
    assert state.keys() == before[0].keys() and all(torch.equal(state[k], v) for k, v in before[0].items())
    with torch.no_grad():
        reference = reference_model(x)
        error = float((full.graph_module(x) - reference).norm() / reference.norm())
    assert error < 1e-5, error


class Functional(nn.Module):
    """Every new kind as a functional call on a parameter (what torch.export shows as aten.conv1d/conv3d/...)."""

    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(16, 4, 5) * 0.3)
        self.wt1 = nn.Parameter(torch.randn(16, 8, 4) * 0.2)
        self.w3 = nn.Parameter(torch.randn(16, 8, 3, 3, 3) * 0.1)
        self.b3 = nn.Parameter(torch.randn(16))
        self.wt2 = nn.Parameter(torch.randn(8, 12, 4, 4) * 0.2)

    def forward(self, wave, clip, image):
        a = F.conv_transpose1d(F.conv1d(wave, self.w1, padding="same"), self.wt1, stride=2, padding=1)
        b = F.conv3d(clip, self.w3, self.b3, padding=1)
        c = F.conv_transpose2d(image, self.wt2, stride=2, padding=1)
        return a.mean(-1), b.mean((2, 3, 4)), c


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_functional_forms_are_candidates(frontend):
    torch.manual_seed(0)
    model = Functional()
    inputs = (torch.randn(2, 4, 40), torch.randn(1, 8, 4, 8, 8), torch.randn(1, 8, 8, 8))
    plan = {}
    for name, kind, layer in (
        ("w1", "conv1d", nn.Conv1d(4, 16, 5)),
        ("wt1", "conv_transpose1d", nn.ConvTranspose1d(16, 8, 4)),
        ("w3", "conv3d", nn.Conv3d(8, 16, 3)),
        ("wt2", "conv_transpose2d", nn.ConvTranspose2d(8, 12, 4)),
    ):
        plan[name] = ("tucker2", (layer.in_channels, layer.out_channels))
    result = fxdecomp.compress(model, inputs, plan=plan, frontend=frontend)
    assert result.frontend == frontend
    assert {d.name: d.op for d in result.decisions} == {"w1": "conv1d", "wt1": "conv_transpose1d", "w3": "conv3d", "wt2": "conv_transpose2d"}
    assert all(d.method == "tucker2" for d in result.decisions)
    with torch.no_grad():
        for got, want in zip(result.graph_module(*inputs), model(*inputs)):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    low = fxdecomp.compress(model, inputs, budget=0.5, frontend=frontend)
    assert _flops(low.graph_module, *inputs) <= 0.5 * _flops(model, *inputs)


def test_torch_convolution_with_its_transposed_flag_is_a_candidate():
    class Generic(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(6, 4, 3, 3) * 0.2)  # transposed: (in, out/groups, kh, kw)

        def forward(self, x):
            return torch.convolution(x, self.w, None, [2, 2], [1, 1], [1, 1], True, [1, 1], 2)

    torch.manual_seed(0)
    model, x = Generic(), torch.randn(1, 6, 5, 5)
    result = fxdecomp.compress(model, (x,), plan={"w": ("tucker2", (3, 4))})
    assert [(d.name, d.op, d.method) for d in result.decisions] == [("w", "conv_transpose2d", "tucker2")]
    with torch.no_grad():
        torch.testing.assert_close(result.graph_module(x), model(x), rtol=1e-4, atol=1e-4)


def test_conv_transpose_called_with_output_size_is_left_alone():
    class UpTo(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = nn.ConvTranspose2d(8, 8, 3, stride=2)
            self.conv = nn.Conv2d(8, 8, 3)

        def forward(self, x):
            return self.conv(self.up(x, output_size=[2 * x.shape[-2] + 2, 2 * x.shape[-1] + 2]))

    torch.manual_seed(0)
    model, x = UpTo(), torch.randn(1, 8, 6, 6)
    result = fxdecomp.compress(model, (x,), budget=0.9)
    assert [d.name for d in result.decisions] == ["conv"]
    with torch.no_grad():
        assert result.graph_module(x).shape == model(x).shape


def test_onnx_parity_of_decomposed_conv3d_and_conv_transpose(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv3d(3, 8, 3, padding=1, padding_mode="replicate"),
        nn.ReLU(),
        nn.Conv3d(8, 8, (1, 3, 3), padding=(0, 1, 1)),
        nn.Flatten(1, 2),  # (N, 8*D, H, W)
        nn.ConvTranspose2d(32, 8, 4, stride=2, padding=1, groups=2),
    )
    x = torch.randn(2, 3, 4, 6, 6)
    decomposed = copy.deepcopy(model)
    decomposed[0] = fxdecomp.decompose_layer(model[0], "tucker2", (2, 4))
    decomposed[2] = fxdecomp.decompose_layer(model[2], "spatial_svd", 4)
    decomposed[4] = fxdecomp.decompose_layer(model[4], "svd", 3)
    path = tmp_path / "kinds.onnx"
    fxdecomp.export_onnx(decomposed, (x,), path)
    batch = torch.randn(3, 3, 4, 6, 6)  # dynamic batch
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: batch.numpy()})
    with torch.no_grad():
        want = decomposed(batch).numpy()
        original = model(batch).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert not np.allclose(want, original, atol=1e-3)  # the ranks really cut something
    assert math.isfinite(float(np.abs(got).max()))


# ---- random architectures of the new kinds -------------------------------------------------


class RandomKindsNet(nn.Module):
    """A chain drawn by hypothesis in 1, 2 or 3 spatial dims: convs, transposed (upsampling) convs, and
    functional convs on parameters, then a Linear head."""

    def __init__(self, ndim, blocks, in_channels, classes):
        super().__init__()
        self.kinds = [kind for kind, _ in blocks]
        layers, channels, self.functional = [], in_channels, []
        for kind, (out, kernel, stride, groups) in blocks:
            groups = math.gcd(groups, math.gcd(channels, out))
            if kind == "conv":
                layers.append(CONV[ndim](channels, out, kernel, stride, kernel // 2, groups=groups))
            elif kind == "up":
                layers.append(CONV_T[ndim](channels, out, kernel, stride, kernel // 2, output_padding=stride - 1, groups=groups))
            else:  # a functional conv on a parameter
                # One top-level parameter per call (candidates of functional calls are named after their owner).
                name = f"w{len(self.functional)}"
                setattr(self, name, nn.Parameter(torch.randn(out, channels, *[kernel] * ndim) / math.sqrt(channels * kernel**ndim)))
                self.functional.append(name)
                layers.append(nn.Identity())
            channels = out
        self.ndim, self.layers, self.head = ndim, nn.ModuleList(layers), nn.Linear(channels, classes)

    def forward(self, x):
        weights = iter(getattr(self, name) for name in self.functional)
        conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}[self.ndim]
        for kind, layer in zip(self.kinds, self.layers):
            x = torch.relu(conv(x, next(weights), padding="same") if kind == "function" else layer(x))
        return self.head(x.flatten(2).mean(-1))


kinds_blocks = st.lists(
    st.tuples(
        st.sampled_from(["conv", "up", "function"]),
        st.tuples(st.integers(1, 8), st.sampled_from([1, 2, 3]), st.integers(1, 2), st.sampled_from([1, 1, 2])),
    ),
    min_size=1,
    max_size=3,
)


@settings(max_examples=12, deadline=None)
@given(ndim=st.sampled_from([1, 2, 3]), blocks=kinds_blocks, budget=st.floats(0.1, 1.0), seed=st.integers(0, 100))
def test_random_architectures_of_new_kinds_meet_the_budget_or_say_why(ndim, blocks, budget, seed):
    torch.manual_seed(seed)
    model = RandomKindsNet(ndim, blocks, 3, 4).eval()
    x = torch.randn(2, 3, *[{1: 16, 2: 6, 3: 4}[ndim]] * ndim)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        result = fxdecomp.compress(model, (x,), budget=budget, progress=False)
    except BudgetError as exc:
        event("budget error (unreachable)")
        assert exc.smallest_reachable is not None and exc.smallest_reachable > budget
    else:
        event("met the budget")
        assert _flops(result.graph_module, x) <= budget * _flops(model, x) + 1e-6
        assert len(result.decisions) == len(blocks) + 1  # every conv (module or functional) and the head
        with torch.no_grad():
            assert result.graph_module(x).shape == model(x).shape
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
