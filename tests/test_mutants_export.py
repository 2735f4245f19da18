"""Tests written to kill surviving mutants of fxdecomp/export.py (tools/mutation/run.py export).

Each one checks a documented behaviour of `export_onnx` against a value recomputed here:
onnxruntime's own output, the module tree, the message of the exception raised.
"""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from fxdecomp.errors import ExportError, InvalidInputError, ParityError
from fxdecomp.export import export_onnx
from fxdecomp.export_capture import SHAPES_META, export_trace


def _ort(path, *inputs):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {i.name: x.numpy() for i, x in zip(session.get_inputs(), inputs)}
    return session.run(None, feed)


class Log(nn.Module):
    def forward(self, x):
        return torch.log(x)


def test_matching_infinities_are_no_difference(tmp_path):
    x = torch.tensor([[0.0, 1.0, 2.5], [0.0, 4.0, 0.5]])  # log(0) = -inf in torch and onnxruntime alike
    report = export_onnx(Log(), (x,), tmp_path / "log.onnx")
    (got,) = _ort(tmp_path / "log.onnx", x)
    want = torch.log(x).numpy()
    assert np.array_equal(np.isneginf(got), np.isneginf(want)) and np.isneginf(want).sum() == 2
    finite = np.isfinite(want)
    assert report.max_abs_diff == pytest.approx(float(np.abs(got[finite] - want[finite]).max()), abs=1e-12)
    assert report.max_abs_diff < 1e-6


def test_a_difference_equal_to_the_tolerance_is_accepted(tmp_path):
    # |onnx - torch| <= atol + rtol * |torch| (documented): an exact model passes atol = rtol = 0.
    x = torch.randn(3, 5, generator=torch.Generator().manual_seed(0))
    report = export_onnx(nn.ReLU(), (x,), tmp_path / "relu.onnx", atol=0.0, rtol=0.0)
    (got,) = _ort(tmp_path / "relu.onnx", x)
    assert np.array_equal(got, torch.relu(x).numpy())  # bit-exact, so the difference equals the tolerance 0
    assert report.max_abs_diff == 0.0 and report.max_rel_diff == 0.0


class Independent(nn.Module):
    """Two inputs that nothing ties together: only the exporter's dynamic-batch spec can make them share a dim."""

    def forward(self, x, y):
        return x * 2, y * 3


@pytest.mark.parametrize("ndim", [1, 2])
def test_inputs_of_one_batch_size_share_one_batch_dim(tmp_path, ndim):
    x, y = torch.arange(3.0 ** ndim).reshape((3,) * ndim), torch.ones((3,) * ndim)
    report = export_onnx(Independent(), (x, y), tmp_path / "two.onnx")
    batch = report.inputs[0].shape[0]
    assert isinstance(batch, str)
    assert [t.shape[0] for t in report.inputs + report.outputs] == [batch] * 4  # one batch, also for 1-D inputs
    assert [t.shape[1:] for t in report.inputs] == [(3,) * (ndim - 1)] * 2
    x5, y5 = torch.randn((5,) + (3,) * (ndim - 1)), torch.randn((5,) + (3,) * (ndim - 1))
    got = _ort(tmp_path / "two.onnx", x5, y5)
    np.testing.assert_array_equal(got[0], (x5 * 2).numpy())
    np.testing.assert_array_equal(got[1], (y5 * 3).numpy())


def test_a_captured_graph_keeps_every_free_dim_free(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).eval()
    gm = export_trace(model, (torch.randn(2, 5, 4),))
    shapes = gm.meta[SHAPES_META]
    assert [d for d, s in enumerate(shapes.sizes[0]) if isinstance(s, str)] == [0, 1]
    x = torch.randn(2, 5, 4)
    report = export_onnx(gm, (x,), tmp_path / "gm.onnx")
    dims = report.inputs[0].shape
    assert isinstance(dims[0], str) and isinstance(dims[1], str) and dims[0] != dims[1] and dims[2] == 4
    # Checked at the example's shape and at one with each free dim one larger (their ranges are unbounded).
    assert report.checked_shapes == (((2, 5, 4),), ((3, 6, 4),))
    x2 = torch.randn(4, 7, 4)
    (got,) = _ort(tmp_path / "gm.onnx", x2)
    with torch.no_grad():
        np.testing.assert_allclose(got, model(x2).numpy(), rtol=1e-4, atol=1e-5)


class FailsWhenExported(nn.Module):
    def forward(self, x):
        if torch.compiler.is_exporting():
            raise RuntimeError("\x1b[31mcoloured failure\x1b[0m in forward")
        return x


def test_export_failure_message_carries_the_whole_summary_without_colour_codes(tmp_path):
    with pytest.raises(ExportError) as caught:
        export_onnx(FailsWhenExported(), (torch.ones(2, 3),), tmp_path / "m.onnx")
    message = str(caught.value)
    assert "\x1b" in str(caught.value.__cause__)  # the exporter's own text is coloured
    assert "\x1b" not in message
    assert "RuntimeError'>: coloured failure in forward. Fix:" in message


def test_input_names_must_match_the_inputs():
    with pytest.raises(InvalidInputError, match="input_names has 2 names for 1 example inputs"):
        export_onnx(nn.ReLU(), (torch.ones(2),), "m.onnx", input_names=["a", "b"])


def test_an_opset_the_exporter_cannot_reach_is_refused(tmp_path):
    # torch.onnx translates at opset 18 and converts down; a Gemm model does not convert to opset 7.
    with pytest.raises(ExportError, match="opset 7 was asked for.*only produce opset 18"):
        export_onnx(nn.Linear(4, 3), (torch.randn(2, 4),), tmp_path / "m.onnx", opset=7)
    assert not (tmp_path / "m.onnx").exists()


def test_nodes_are_named_after_their_innermost_module(tmp_path):
    model = nn.Sequential(nn.Sequential(nn.Linear(4, 3)), nn.ReLU())
    export_onnx(model, (torch.randn(2, 4),), tmp_path / "m.onnx")
    leaves = {name for name, m in model.named_modules() if not list(m.children())}
    assert leaves == {"0.0", "1"}
    nodes = onnx.load(tmp_path / "m.onnx").graph.node
    assert {n.name.split("/")[0] for n in nodes} == leaves
    assert all(n.name.split("/")[1].startswith(n.op_type) for n in nodes)
