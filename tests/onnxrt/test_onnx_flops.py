"""onnx_flops counts an exported graph's FLOPs as fxdecomp.count_flops counts the torch model."""

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from torch import nn

import fxdecomp
from fxdecomp.errors import InvalidInputError
from fxdecomp.onnx_flops import onnx_flops, onnx_macs_per_node, onnx_params


class Mixed(nn.Module):
    """Conv (grouped, strided, dilated), ConvTranspose, Gemm (2-D Linear), MatMul (3-D Linear, a matmul)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, stride=2, padding=2, dilation=2, groups=2)
        self.up = nn.ConvTranspose2d(8, 6, 2, stride=2, bias=False)
        self.fc = nn.Linear(6 * 16 * 16, 48)
        self.tokens = nn.Linear(8, 16)
        self.mix = nn.Parameter(torch.randn(16, 5))

    def forward(self, x):
        y = self.fc(self.up(torch.relu(self.conv(x))).flatten(1))
        return torch.matmul(self.tokens(y.reshape(y.shape[0], 6, 8)), self.mix)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    model = Mixed().eval()
    path = tmp_path_factory.mktemp("onnx") / "mixed.onnx"
    fxdecomp.export_onnx(model, (torch.randn(1, 4, 16, 16),), path)
    return model, path


@pytest.mark.parametrize("batch", [1, 3])
def test_matches_count_flops_at_any_batch(exported, batch):
    model, path = exported
    x = torch.randn(batch, 4, 16, 16)
    assert onnx_flops(path, (x,)) == fxdecomp.count_flops(model, (x,))
    assert onnx_flops(path, x.numpy()) == onnx_flops(path, (x,))


def test_every_counted_op_is_there_and_params_are_the_weights(exported):
    model, path = exported
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert {"Conv", "ConvTranspose", "Gemm", "MatMul"} <= ops
    macs = onnx_macs_per_node(path, (torch.randn(1, 4, 16, 16),))
    conv = next(v for k, v in macs.items() if k.startswith("conv/"))
    assert conv == 8 * 8 * 8 * (4 // 2) * 3 * 3  # output 8x8x8, each over 2 input channels x 3x3
    assert onnx_params(path) == sum(p.numel() for p in model.parameters())


def _gemm_model(trans_a: bool):
    a_shape = [5, 3] if trans_a else [3, 5]
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["a", "w"], ["y"], transA=int(trans_a), transB=1, name="g")],
        "gemm",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, a_shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [helper.make_tensor("w", TensorProto.FLOAT, [7, 5], np.zeros(35, dtype=np.float32))],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize("trans_a", [False, True])
def test_gemm_with_transposed_input(tmp_path, trans_a):
    path = tmp_path / "gemm.onnx"
    onnx.save(_gemm_model(trans_a), str(path))
    shape = (5, 3) if trans_a else (3, 5)
    assert onnx_macs_per_node(path, (np.zeros(shape, np.float32),)) == {"g": 3 * 7 * 5}
    assert onnx_params(path) == 35


def test_bad_inputs(tmp_path, exported):
    _, path = exported
    with pytest.raises(InvalidInputError, match="no ONNX model"):
        onnx_flops(tmp_path / "missing.onnx", (torch.randn(1, 4, 16, 16),))
    with pytest.raises(InvalidInputError, match="1 input"):
        onnx_flops(path, (torch.randn(1, 4, 16, 16), torch.randn(1)))
    (tmp_path / "junk.onnx").write_bytes(b"not a protobuf at all")
    with pytest.raises(InvalidInputError):
        onnx_flops(tmp_path / "junk.onnx", (torch.randn(1, 4, 16, 16),))
