"""export_onnx: parity in onnxruntime for every method, dynamic batch, node names; benchmark_onnx statistics."""

import json
import os
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import fxdecomp
from fxdecomp.benchmark import LatencyComparison, LatencyStats, benchmark_onnx, compare_latency
from fxdecomp.errors import ExportError, InvalidInputError, ParityError
from fxdecomp.export import ExportReport, export_onnx


def _ort(path, *inputs):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {i.name: x.numpy() for i, x in zip(session.get_inputs(), inputs)}
    return session.run(None, feed)


def _image(batch, channels, size=9, seed=0):
    return torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(seed))


def _conv_cases():
    torch.manual_seed(0)
    cases = []
    for method in ["svd", "spatial_svd", "tucker2", "cp", "tt", "tiled_svd"]:
        options = {"tiles": (2, 2)} if method == "tiled_svd" else {}
        cases.append((f"{method}", nn.Conv2d(8, 16, 3, padding=1), method, options))
    cases += [
        ("tucker2-reflect", nn.Conv2d(8, 8, (3, 5), padding=(1, 2), padding_mode="reflect"), "tucker2", {}),
        ("cp-circular", nn.Conv2d(8, 8, 3, padding=1, padding_mode="circular"), "cp", {}),
        ("tucker2-same-dilation-even", nn.Conv2d(8, 8, (2, 4), padding="same", dilation=(1, 2)), "tucker2", {}),
        ("tiled-same-dilation", nn.Conv2d(8, 8, 3, padding="same", dilation=2), "tiled_svd", {"tiles": (2, 2)}),
        ("svd-grouped", nn.Conv2d(8, 16, 3, padding=1, groups=2), "svd", {}),
        ("tucker2-grouped", nn.Conv2d(8, 16, 3, padding=1, groups=4, bias=False), "tucker2", {}),
        ("spatial-stride2", nn.Conv2d(8, 16, 3, stride=2, padding=1), "spatial_svd", {}),
    ]
    return cases


CONV_CASES = _conv_cases()


@pytest.mark.parametrize("layer,method,options", [c[1:] for c in CONV_CASES], ids=[c[0] for c in CONV_CASES])
def test_decomposed_conv_parity(tmp_path, layer, method, options):
    module = fxdecomp.decompose_layer(layer, method, 0.5, **options)
    x = _image(2, layer.in_channels)
    report = export_onnx(module, (x,), tmp_path / "m.onnx")
    assert report.max_abs_diff is not None and report.max_abs_diff <= 1e-4
    (got,) = _ort(tmp_path / "m.onnx", x)
    np.testing.assert_allclose(got, module(x).detach().numpy(), rtol=1e-3, atol=1e-4)


def test_same_padding_with_dilation_uses_explicit_pads(tmp_path):
    conv = nn.Conv2d(4, 4, 3, padding="same", dilation=2)
    x = _image(1, 4)
    export_onnx(conv, (x,), tmp_path / "same.onnx")
    for node in onnx.load(tmp_path / "same.onnx").graph.node:
        auto_pad = {a.name: a.s for a in node.attribute}.get("auto_pad", b"NOTSET")
        assert auto_pad == b"NOTSET", node


@pytest.mark.parametrize("method", ["svd", "tt", "tiled_svd"])
def test_decomposed_linear_parity(tmp_path, method):
    torch.manual_seed(1)
    options = {"tiles": (2, 2)} if method == "tiled_svd" else {}
    module = fxdecomp.decompose_layer(nn.Linear(16, 12), method, 0.5, **options)
    x = torch.randn(3, 5, 16)  # extra leading dims: TTLinear / TiledLinear reshape them away
    report = export_onnx(module, (x,), tmp_path / "lin.onnx")
    assert report.max_abs_diff <= 1e-4
    (got,) = _ort(tmp_path / "lin.onnx", torch.randn(7, 5, 16))  # another batch
    assert got.shape == (7, 5, 12)


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            fxdecomp.decompose_layer(nn.Conv2d(8, 16, 3, padding=1), "tucker2", (4, 8)),
            nn.ReLU(),
            fxdecomp.decompose_layer(nn.Conv2d(16, 16, 3, stride=2, padding=1), "tiled_svd", 0.5, tiles=(2, 2)),
            nn.ReLU(),
        )
        self.classifier = fxdecomp.decompose_layer(nn.Linear(16, 10), "svd", 4)

    def forward(self, x):
        return self.classifier(self.features(x).mean((2, 3)))


@pytest.fixture(scope="module")
def cnn_export(tmp_path_factory):
    model = SmallCNN().train()  # exported in eval mode, handed back in train mode
    x = _image(1, 3, size=12)
    path = tmp_path_factory.mktemp("cnn") / "cnn.onnx"
    state = {k: v.clone() for k, v in model.state_dict().items()}
    report = export_onnx(model, (x,), path)
    return model, x, path, report, state


def test_small_cnn_dynamic_batch(cnn_export):
    model, _, path, report, _ = cnn_export
    assert isinstance(report, ExportReport) and report.opset == 18 and not report.external_data
    assert isinstance(report.inputs[0].shape[0], str) and isinstance(report.outputs[0].shape[0], str)
    x4 = _image(4, 3, size=12, seed=5)  # exported at batch 1, run at batch 4
    (got,) = _ort(path, x4)
    model_mode = model.training
    with torch.no_grad():
        want = model.eval()(x4).numpy()
    model.train(model_mode)
    assert got.shape == (4, 10)
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4)
    json.dumps(report.to_dict())


def test_input_module_unchanged(cnn_export):
    model, x, _, _, state = cnn_export
    assert model.training and all(m.training for m in model.modules())
    after = model.state_dict()
    assert state.keys() == after.keys()
    for key, value in state.items():
        assert torch.equal(value, after[key]), key
    assert x.shape == (1, 3, 12, 12)


def test_mixed_modes_and_hooks_restored(tmp_path):
    model = SmallCNN().train()
    model.features[1].eval()  # a frozen BatchNorm inside a training model
    calls = []
    model.features[0].register_forward_hook(lambda *a: calls.append(1))
    model.classifier[0].weight.requires_grad_(False)
    export_onnx(model, (_image(2, 3, size=12),), tmp_path / "m.onnx")
    assert model.training and not model.features[1].training and model.features[2].training
    assert len(model.features[0]._forward_hooks) == 1
    assert not model.classifier[0].weight.requires_grad and model.classifier[1].weight.requires_grad


def test_node_names_contain_module_paths(cnn_export):
    _, _, path, _, _ = cnn_export
    names = [n.name for n in onnx.load(path).graph.node]
    assert len(set(names)) == len(names)
    convs = sorted(n.name for n in onnx.load(path).graph.node if n.op_type == "Conv")
    # The exporter's optimiser folds the BatchNorm (features.1) into features.0's Conv, and the
    # fused node keeps the BatchNorm's scope (onnxscript 0.7): either name leads to the right place.
    assert convs[0] in ("features.0/Conv", "features.1/Conv")
    assert convs[1:] == [*(f"features.3.{i}/Conv" for i in range(3)), "features.5.0/Conv", "features.5.2/Conv"]
    assert any(name.startswith("classifier.0/") for name in names)
    assert any(name.startswith("features.5.1/") for name in names)  # the ChannelShuffle's reshapes


def test_parity_failure_raises_and_keeps_target(tmp_path):
    class ExportsDifferently(nn.Module):
        def forward(self, x):
            # One graph is exported, eager torch runs the other: the outputs differ by exactly 0.5.
            return x + 0.5 if torch.compiler.is_exporting() else x

    target = tmp_path / "m.onnx"
    target.write_bytes(b"previous")
    with pytest.raises(ParityError, match=r"atol=0\.0001, rtol=0\.001: .*max abs diff 0\.5") as caught:
        export_onnx(ExportsDifferently(), (torch.randn(2, 3),), target)
    assert caught.value.max_abs_diff == pytest.approx(0.5)
    assert target.read_bytes() == b"previous"
    assert os.listdir(tmp_path) == ["m.onnx"]  # no staging directory left behind

    report = export_onnx(ExportsDifferently(), (torch.randn(2, 3),), target, check=False)
    assert report.max_abs_diff is None and onnx.load(target).graph.node[0].op_type == "Add"


class OffByDelta(nn.Module):
    """Exports ``x + delta`` at one element while eager torch computes ``x``: an injected error of exactly delta."""

    def __init__(self, delta: float):
        super().__init__()
        self.delta = delta

    def forward(self, x):
        if torch.compiler.is_exporting():
            return x + self.delta * (torch.arange(x.numel()).reshape(x.shape) == 5).to(x.dtype)
        return x + 0.0


@pytest.mark.parametrize(
    "value, atol, rtol",
    [(0.0, 1e-4, 1e-3), (4.0, 1e-3, 1e-2)],
    ids=["default-atol", "custom-atol+rtol"],
)
def test_parity_catches_an_error_just_above_the_tolerance(tmp_path, value, atol, rtol):
    # The accepted difference at an output of |value| is atol + rtol * |value|, as documented.
    tolerance = atol + rtol * value
    x = torch.full((2, 4), value)
    with pytest.raises(ParityError) as caught:
        export_onnx(OffByDelta(1.2 * tolerance), (x,), tmp_path / "above.onnx", atol=atol, rtol=rtol)
    assert caught.value.max_abs_diff == pytest.approx(1.2 * tolerance, rel=1e-3)
    assert not (tmp_path / "above.onnx").exists()
    report = export_onnx(OffByDelta(0.8 * tolerance), (x,), tmp_path / "below.onnx", atol=atol, rtol=rtol)
    assert report.max_abs_diff == pytest.approx(0.8 * tolerance, rel=1e-3)
    if value:
        assert report.max_rel_diff == pytest.approx(0.8 * tolerance / value, rel=1e-3)
    (got,) = _ort(tmp_path / "below.onnx", x)  # the error is really in the file
    assert np.count_nonzero(got != x.numpy()) == 1


def test_impossible_tolerance_raises(tmp_path):
    torch.manual_seed(3)
    module = fxdecomp.decompose_layer(nn.Conv2d(16, 16, 3, padding=1), "tucker2", 0.5)
    x = _image(2, 16)
    report = export_onnx(module, (x,), tmp_path / "loose.onnx")
    (got,) = _ort(tmp_path / "loose.onnx", x)
    # Not vacuous: onnxruntime's kernels round differently from torch's on this model.
    assert np.abs(got - module(x).detach().numpy()).max() > 0 and report.max_abs_diff > 0
    with pytest.raises(ParityError, match="atol=0, rtol=0"):
        export_onnx(module, (x,), tmp_path / "strict.onnx", atol=0.0, rtol=0.0)
    assert not (tmp_path / "strict.onnx").exists()


def test_fixed_batch(tmp_path):
    conv = nn.Conv2d(3, 4, 3)
    report = export_onnx(conv, _image(1, 3), tmp_path / "fixed.onnx", dynamic_batch=False)
    assert report.inputs[0].shape == (1, 3, 9, 9)
    with pytest.raises(InvalidInputError, match=r"float32\[1, 3, 9, 9\]"):
        benchmark_onnx(tmp_path / "fixed.onnx", _image(4, 3), warmup=0, runs=1)


def test_external_data_and_names(tmp_path):
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
    report = export_onnx(model, (torch.randn(2, 64),), tmp_path / "ext.onnx", external_data=True,
                         input_names=["tokens"], output_names=["logits"])
    assert report.external_data and (tmp_path / "ext.onnx.data").exists()
    assert sorted(os.listdir(tmp_path)) == ["ext.onnx", "ext.onnx.data"]
    assert [i.name for i in report.inputs] == ["tokens"] and [o.name for o in report.outputs] == ["logits"]
    (got,) = _ort(tmp_path / "ext.onnx", torch.ones(3, 64))
    np.testing.assert_allclose(got, model(torch.ones(3, 64)).detach().numpy(), rtol=1e-4, atol=1e-5)


def test_export_failure_is_wrapped(tmp_path):
    class DataDependent(nn.Module):
        def forward(self, x):
            return x[x > 0].sum() if bool(x.sum() > 0) else x

    with pytest.raises(ExportError, match="ONNX export of DataDependent failed.*Fix:") as caught:
        export_onnx(DataDependent(), (torch.ones(2, 3),), tmp_path / "m.onnx")
    assert not isinstance(caught.value, ParityError) and caught.value.__cause__ is not None
    assert os.listdir(tmp_path) == []


def test_fixed_batch_model_needs_dynamic_batch_off(tmp_path):
    class FixedBatch(nn.Module):
        def forward(self, x):
            return x.view(1, 6)

    with pytest.raises(ExportError, match="dynamic_batch=False"):
        export_onnx(FixedBatch(), (torch.ones(1, 6),), tmp_path / "m.onnx")
    report = export_onnx(FixedBatch(), (torch.ones(1, 6),), tmp_path / "m.onnx", dynamic_batch=False)
    assert report.inputs[0].shape == (1, 6)


def test_export_keeps_only_the_batch_free_when_more_free_dims_fail(tmp_path, monkeypatch):
    # The exporter's symbolic shape reasoning can fail on free spatial dims (torchvision's DenseNet-121 captured by
    # torch.export at 32 px: "The inequality ... cannot be solved") where a free batch alone exports.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()
    x = torch.randn(2, 3, 12, 12)
    result = fxdecomp.compress(model, (x,), budget=0.7, frontend="export")  # height and width free
    real_export, seen = torch.onnx.export, []

    def spatial_fails(*args, dynamic_shapes=None, **kwargs):
        seen.append(dynamic_shapes)
        if dynamic_shapes is not None and any(isinstance(d, dict) and set(d) - {0} for d in dynamic_shapes):
            raise NotImplementedError("The inequality cannot be solved")
        return real_export(*args, dynamic_shapes=dynamic_shapes, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", spatial_fails)
    with pytest.warns(UserWarning, match="only the batch dimension free"):
        report = export_onnx(result.graph_module, (x,), tmp_path / "m.onnx")
    assert len(seen) == 2 and sorted(seen[0][0]) == [0, 2, 3] and sorted(seen[1][0]) == [0]
    assert isinstance(report.inputs[0].shape[0], str) and report.inputs[0].shape[1:] == (3, 12, 12)
    (got,) = _ort(tmp_path / "m.onnx", torch.ones(5, 3, 12, 12))  # another batch size
    np.testing.assert_allclose(got, result.graph_module(torch.ones(5, 3, 12, 12)).detach().numpy(), rtol=1e-4, atol=1e-5)


def test_export_prints_nothing(tmp_path):
    # A fresh process: the exporter's one-off registry warnings come with its first export.
    code = (
        "import torch, fxdecomp.export as e; torch.set_num_threads(1); "
        f"e.export_onnx(torch.nn.Conv2d(2, 2, 3), torch.ones(1, 2, 5, 5), {str(tmp_path / 'q.onnx')!r})"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "" and done.stderr == ""


def test_bad_export_arguments(tmp_path):
    with pytest.raises(InvalidInputError, match="does not exist"):
        export_onnx(nn.ReLU(), (torch.ones(2),), tmp_path / "missing" / "m.onnx")
    with pytest.raises(InvalidInputError, match="tuple of tensors"):
        export_onnx(nn.ReLU(), ([1.0],), tmp_path / "m.onnx")
    with pytest.raises(InvalidInputError, match="fails on the example inputs"):
        export_onnx(nn.Linear(3, 2), (torch.ones(2, 4),), tmp_path / "m.onnx")


# ---- benchmark ---------------------------------------------------------------------------


def test_latency_stats(cnn_export):
    _, x, path, _, _ = cnn_export
    stats = benchmark_onnx(path, (x,), threads=1, warmup=2, runs=15)
    assert isinstance(stats, LatencyStats) and stats.runs == 15 and stats.threads == 1
    assert 0 < stats.min_ms <= stats.p10_ms <= stats.median_ms <= stats.p90_ms
    assert stats.min_ms <= stats.mean_ms
    assert json.loads(json.dumps(stats.to_dict())) == stats.to_dict()
    longer = benchmark_onnx(path, x, warmup=0, runs=3, min_seconds=0.05, optimization="basic")
    assert longer.runs >= 3 and longer.runs * longer.mean_ms >= 40.0


def test_compare_latency(cnn_export):
    _, x, path, _, _ = cnn_export
    both = compare_latency(path, path, (x,), threads=1, rounds=10, warmup=1)
    assert isinstance(both, LatencyComparison) and both.a.runs == both.b.runs == 10
    assert both.ratio == pytest.approx(both.b.median_ms / both.a.median_ms)
    json.dumps(both.to_dict())


def test_benchmark_bad_inputs(cnn_export, tmp_path):
    _, x, path, _, _ = cnn_export
    with pytest.raises(InvalidInputError, match="no ONNX model"):
        benchmark_onnx(tmp_path / "nope.onnx", (x,))
    with pytest.raises(InvalidInputError, match=r"takes 1 input\(s\) \(x: float32\[batch, 3, 12, 12\]\); got 2"):
        benchmark_onnx(path, (x, x))
    with pytest.raises(InvalidInputError, match=r"float32\[batch, 3, 12, 12\]"):
        benchmark_onnx(path, (torch.randn(1, 3, 8, 8),))
    with pytest.raises(InvalidInputError, match="float32"):
        benchmark_onnx(path, (x.double(),))
    with pytest.raises(InvalidInputError, match="optimization"):
        benchmark_onnx(path, (x,), optimization="max")
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(InvalidInputError, match="cannot load"):
        benchmark_onnx(tmp_path / "junk.onnx", (x,))


class _Pairs(nn.Module):
    """Merges neighbouring positions: accepts only even sequence lengths (torch.export records the guard)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(32, 16)

    def forward(self, x):
        b, length, c = x.shape
        return self.fc(x.reshape(b, length // 2, 2 * c))


def test_second_parity_shape_is_one_the_graph_accepts(tmp_path):
    """The second shape moves each free dimension by the first step the graph's shape check accepts
    (batch by 1, the even length by 2); it used to move every one by 1 and fail with InvalidInputError."""
    torch.manual_seed(0)
    x = torch.randn(2, 8, 16)
    gm = fxdecomp.compress(_Pairs().eval(), (x,), budget=0.6, methods=["svd"], frontend="export").graph_module
    with pytest.raises(fxdecomp.ShapeError):
        gm(torch.randn(3, 9, 16))
    report = export_onnx(gm, (x,), tmp_path / "pairs.onnx")
    assert report.checked_shapes == (((2, 8, 16),), ((3, 10, 16),))
    other = torch.randn(5, 12, 16)
    (got,) = _ort(tmp_path / "pairs.onnx", other)
    np.testing.assert_allclose(got, gm(other).detach().numpy(), rtol=1e-4, atol=1e-5)


def test_a_float64_model_onnxruntime_cannot_run_is_told_to_export_a_float32_copy(tmp_path):
    """onnxruntime's CPU provider has no float64 Conv: the error was onnxruntime's alone, with no way out."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).double().eval()
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    with pytest.raises(fxdecomp.InvalidInputError, match=r"no kernel for some operators at torch.float64: export a float32 copy"):
        fxdecomp.export_onnx(model, (x,), tmp_path / "m.onnx")
    report = fxdecomp.export_onnx(model.float(), (x.float(),), tmp_path / "m.onnx")
    assert report.max_abs_diff <= 1e-4
