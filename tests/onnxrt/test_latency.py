"""fxdecomp.latency and fxdecomp.onnx_layers: the direct ONNX builder matches torch, the cache works, timings are sane."""

import json
import os
import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import fxdecomp
from fxdecomp.errors import InvalidInputError, UnsupportedLayerError
from fxdecomp.export import export_onnx
from fxdecomp.latency import LayerLatency, compare_models_ms, default_cache_dir, model_ms, original_module, preferred_rank_multiple
from fxdecomp.layer_spec import layer_spec
from fxdecomp.onnx_layers import module_to_onnx


def _run(model: onnx.ModelProto, x: torch.Tensor) -> np.ndarray:
    onnx.checker.check_model(model, full_check=True)
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x.numpy()})[0]


def _image(channels, height=11, width=9, batch=2, seed=0):
    return torch.randn(batch, channels, height, width, generator=torch.Generator().manual_seed(seed))


CONV_LAYERS = {
    "zeros": lambda: nn.Conv2d(8, 16, 3, padding=1),
    "reflect-nonsquare": lambda: nn.Conv2d(8, 8, (3, 5), padding=(1, 2), padding_mode="reflect"),
    "replicate-stride": lambda: nn.Conv2d(8, 8, 3, stride=2, padding=1, padding_mode="replicate", bias=False),
    "circular": lambda: nn.Conv2d(8, 8, 3, padding=1, padding_mode="circular"),
    "same-asymmetric-dilated": lambda: nn.Conv2d(8, 8, (2, 4), padding="same", dilation=(1, 2)),
    "valid-stride-dilation": lambda: nn.Conv2d(8, 16, 3, stride=(2, 1), dilation=2),
}
CONV_METHODS = ["svd", "spatial_svd", "tucker2", "cp", "tt", "tiled_svd"]


def _options(method):
    return {"tiles": (2, 2)} if method == "tiled_svd" else {}


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("padding", sorted(CONV_LAYERS))
@pytest.mark.parametrize("method", CONV_METHODS)
def test_builder_matches_torch_for_every_conv_method_and_padding(method, padding):
    torch.manual_seed(0)
    module = fxdecomp.decompose_layer(CONV_LAYERS[padding](), method, 0.5, **_options(method)).eval()
    x = _image(8)
    with torch.no_grad():
        expected = module(x).numpy()
    got = _run(module_to_onnx(module, x.shape), x)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method,groups", [("svd", 2), ("tucker2", 4), ("cp", 2), ("spatial_svd", 2)])
def test_builder_matches_torch_for_grouped_convs(method, groups):
    torch.manual_seed(1)
    module = fxdecomp.decompose_layer(nn.Conv2d(8, 16, 3, padding=1, groups=groups), method, 0.5).eval()
    x = _image(8)
    with torch.no_grad():
        expected = module(x).numpy()
    np.testing.assert_allclose(_run(module_to_onnx(module, x.shape), x), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["svd", "tt", "tiled_svd"])
@pytest.mark.parametrize("shape", [(3, 64), (2, 5, 64)], ids=["2d", "3d"])
@pytest.mark.parametrize("bias", [True, False])
def test_builder_matches_torch_for_linear_methods(method, shape, bias):
    torch.manual_seed(2)
    module = fxdecomp.decompose_layer(nn.Linear(64, 32, bias=bias), method, 0.5, **_options(method)).eval()
    x = torch.randn(*shape)
    with torch.no_grad():
        expected = module(x).numpy()
    np.testing.assert_allclose(_run(module_to_onnx(module, x.shape), x), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("padding", sorted(CONV_LAYERS))
def test_original_module_from_spec_reproduces_the_layer(padding):
    torch.manual_seed(3)
    layer = CONV_LAYERS[padding]().eval()
    rebuilt = original_module(layer_spec(layer))
    conv = rebuilt[-1] if isinstance(rebuilt, nn.Sequential) else rebuilt
    conv.load_state_dict(layer.state_dict())
    x = _image(8)
    with torch.no_grad():
        expected = layer(x)
        torch.testing.assert_close(rebuilt(x), expected)
    np.testing.assert_allclose(_run(module_to_onnx(rebuilt, x.shape), x), expected.numpy(), rtol=1e-4, atol=1e-5)


def test_builder_emits_the_ops_the_exporter_emits(tmp_path):
    torch.manual_seed(4)
    module = fxdecomp.decompose_layer(nn.Conv2d(8, 8, 3, padding=1), "tiled_svd", 0.5, tiles=(2, 2)).eval()
    x = _image(8, batch=1)
    export_onnx(module, (x,), tmp_path / "m.onnx", dynamic_batch=False)
    exported = [n.op_type for n in onnx.load(tmp_path / "m.onnx").graph.node]
    built = [n.op_type for n in module_to_onnx(module, x.shape).graph.node]
    assert built == exported == ["Conv", "Reshape", "Transpose", "Reshape", "Conv"]


def test_builder_random_weights_on_meta_modules_and_refuses_unknown_layers():
    with torch.device("meta"):
        module = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ChannelShuffle(2), nn.Conv2d(8, 4, 1))
    out = _run(module_to_onnx(module, (1, 4, 6, 6), weights="random"), torch.randn(1, 4, 6, 6))
    assert out.shape == (1, 4, 6, 6) and np.isfinite(out).all() and np.abs(out).max() > 0
    with pytest.raises(UnsupportedLayerError, match="ReLU"):
        module_to_onnx(nn.Sequential(nn.Conv2d(4, 4, 1), nn.ReLU()), (1, 4, 6, 6))


# ---- LayerLatency -----------------------------------------------------------------------


def _timer(tmp_path, **kwargs):
    return LayerLatency(cache_dir=tmp_path, runs=3, warmup=1, min_seconds=0.0, **kwargs)


SPEC = layer_spec(nn.Conv2d(8, 16, 3, padding=1))
SHAPE = (1, 8, 12, 12)


def test_second_call_is_a_cache_hit_in_memory_and_on_disk(tmp_path):
    timer = _timer(tmp_path)
    first = timer.layer_ms(SPEC, SHAPE, "tucker2", (4, 8))
    assert timer.measurements == 1
    assert timer.layer_ms(SPEC, SHAPE, "tucker2", (4, 8)) == first
    assert timer.measurements == 1
    stored = json.loads((tmp_path / "latency.json").read_text())
    assert len(stored) == 1
    (record,) = stored.values()
    assert record["median_ms"] == first and record["builder"] == "direct"
    fresh = _timer(tmp_path)  # a new process would see the same file
    assert fresh.layer_ms(SPEC, SHAPE, "tucker2", (4, 8)) == first
    assert fresh.measurements == 0


def test_cache_key_includes_threads_ranks_method_options_and_shape(tmp_path):
    one, two = _timer(tmp_path, threads=1), _timer(tmp_path, threads=2)
    base = one.key(SPEC, SHAPE, "svd", (4,), {})
    assert two.key(SPEC, SHAPE, "svd", (4,), {}) != base
    assert one.key(SPEC, SHAPE, "svd", (5,), {}) != base
    assert one.key(SPEC, SHAPE, "cp", (4,), {}) != base
    assert one.key(SPEC, (2, 8, 12, 12), "svd", (4,), {}) != base
    assert one.key(SPEC, SHAPE, "tiled_svd", (4,) * 4, {"tiles": (2, 2)}) != one.key(SPEC, SHAPE, "tiled_svd", (4,) * 4, {"tiles": (4, 1)})
    key = json.loads(base)
    assert key["threads"] == 1 and key["ranks"] == [4] and key["onnxruntime"] == ort.__version__ and key["cpu"]
    one.layer_ms(SPEC, SHAPE, "svd", (4,))
    one.layer_ms(SPEC, SHAPE, "svd", (8,))
    two.layer_ms(SPEC, SHAPE, "svd", (4,))
    assert one.measurements == 2 and two.measurements == 1
    assert len(json.loads((tmp_path / "latency.json").read_text())) == 3  # merged, none lost


@pytest.mark.parametrize(
    "layer,shape,method,ranks,options",
    [
        (nn.Conv2d(8, 16, 3, padding=1), SHAPE, None, (), None),
        (nn.Conv2d(8, 16, 3, padding=1), SHAPE, "svd", (4,), None),
        (nn.Conv2d(8, 16, 3, padding=1), SHAPE, "spatial_svd", (4,), None),
        (nn.Conv2d(8, 16, 3, padding=1), SHAPE, "cp", (4,), None),
        (nn.Conv2d(8, 16, 3, padding=1), SHAPE, "tt", (4, 4, 4), None),
        (nn.Conv2d(8, 16, 3, padding=1), SHAPE, "tiled_svd", (2, 2, 2, 2), {"tiles": (2, 2)}),
        (nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect"), SHAPE, "tucker2", (4, 4), None),
        (nn.Linear(32, 16), (1, 32), None, (), None),
        (nn.Linear(32, 16), (1, 32), "svd", (4,), None),
        (nn.Linear(32, 16), (2, 3, 32), "tt", (2, 2), None),
        (nn.Linear(32, 16), (1, 32), "tiled_svd", (2, 2, 2, 2), {"tiles": (2, 2)}),
    ],
)
def test_latencies_are_positive_and_finite(tmp_path, layer, shape, method, ranks, options):
    timer = LayerLatency(cache_dir=tmp_path, persist=False, runs=3, warmup=1, min_seconds=0.0)
    stats = timer.layer_stats(layer_spec(layer), shape, method, ranks, options)
    for name in ("median_ms", "p10_ms", "p90_ms", "min_ms"):
        assert math.isfinite(stats[name]) and stats[name] > 0
    assert stats["min_ms"] <= stats["p10_ms"] <= stats["median_ms"] <= stats["p90_ms"]
    assert stats["runs"] >= 3
    assert not (tmp_path / "latency.json").exists()  # persist=False


def test_statistic_picks_from_the_same_record(tmp_path):
    median = _timer(tmp_path).layer_ms(SPEC, SHAPE)
    fastest = _timer(tmp_path, statistic="min")
    assert fastest.layer_ms(SPEC, SHAPE) <= median
    assert fastest.measurements == 0


def test_a_bigger_layer_takes_longer(tmp_path):
    timer = LayerLatency(cache_dir=tmp_path, persist=False, runs=5, warmup=1, min_seconds=0.05, statistic="min")
    spec = layer_spec(nn.Conv2d(32, 32, 3, padding=1))
    small = timer.layer_ms(spec, (1, 32, 8, 8))
    large = timer.layer_ms(spec, (1, 32, 64, 64))  # 64x the work
    assert large > 4 * small


def test_layers_the_builder_does_not_know_go_through_the_exporter(tmp_path):
    timer = LayerLatency(cache_dir=tmp_path, persist=False, runs=2, warmup=0, min_seconds=0.0)
    with torch.device("meta"):
        module = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.ReLU())
    stats = timer.module_stats(module, (1, 4, 8, 8))
    assert stats["builder"] == "export" and stats["median_ms"] > 0


def test_sites_ms_sums_the_call_sites(tmp_path):
    timer = _timer(tmp_path)
    shapes = [SHAPE, (1, 8, 6, 6)]
    total = timer.sites_ms(SPEC, shapes, "svd", (4,))
    assert total == pytest.approx(sum(timer.layer_ms(SPEC, s, "svd", (4,)) for s in shapes))
    assert timer.measurements == 2


def test_bad_requests_are_refused(tmp_path):
    timer = _timer(tmp_path)
    with pytest.raises(InvalidInputError, match="input shape"):
        timer.layer_ms(SPEC, (1, 4, 12, 12))
    with pytest.raises(InvalidInputError, match="ranks"):
        timer.layer_ms(SPEC, SHAPE, "svd", (4, 4))
    with pytest.raises(InvalidInputError, match="method"):
        timer.layer_ms(SPEC, SHAPE, None, (4,))
    with pytest.raises(InvalidInputError, match="threads"):
        LayerLatency(threads=0)
    with pytest.raises(InvalidInputError, match="statistic"):
        LayerLatency(statistic="mean")
    assert timer.measurements == 0


def test_cache_dir_comes_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("FXDECOMP_CACHE_DIR", str(tmp_path / "elsewhere"))
    assert default_cache_dir() == tmp_path / "elsewhere"
    timer = LayerLatency(runs=2, warmup=0, min_seconds=0.0)
    timer.layer_ms(SPEC, SHAPE)
    assert (tmp_path / "elsewhere" / "latency.json").is_file()


def test_a_corrupt_cache_file_is_rebuilt(tmp_path):
    (tmp_path / "latency.json").write_text("{not json")
    timer = _timer(tmp_path)
    assert timer.layer_ms(SPEC, SHAPE) > 0
    assert len(json.loads((tmp_path / "latency.json").read_text())) == 1


def test_preferred_rank_multiple_follows_the_simd_width():
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    expected = 16 if "avx512f" in flags else 8
    assert preferred_rank_multiple() == preferred_rank_multiple(2) == expected
    with pytest.raises(InvalidInputError):
        preferred_rank_multiple(0)


def test_model_ms_times_a_whole_model():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 10))
    ms = model_ms(model, (torch.randn(1, 3, 8, 8),), threads=1, runs=3, warmup=1)
    assert math.isfinite(ms) and ms > 0
    assert 0 < model_ms(model, torch.randn(1, 3, 8, 8), runs=3, warmup=1, statistic="min") < math.inf
    with pytest.raises(InvalidInputError, match="statistic"):
        model_ms(model, (torch.randn(1, 3, 8, 8),), statistic="mean")


def test_compare_models_ms_times_two_models_interleaved():
    small, large = nn.Conv2d(3, 4, 3), nn.Conv2d(3, 256, 3)
    small_ms, large_ms = compare_models_ms(small, large, (torch.randn(1, 3, 64, 64),), rounds=5)
    assert 0 < small_ms < large_ms < math.inf
