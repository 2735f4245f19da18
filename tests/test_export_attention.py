"""export_onnx on graphs whose scaled_dot_product_attention takes transposed heads (T5's pattern).

torch.onnx's decomposition of SDPA changes the strides under the ``view`` that follows
(pytorch/pytorch#136543): such graphs are exported with attention written out as torch's
math kernel (`fxdecomp.onnx_attention`), on a copy; a plain module gets an error naming the fix.
"""

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxdecomp
from fxdecomp.errors import ExportError
from fxdecomp.export import export_onnx
from fxdecomp.onnx_attention import has_attention, with_math_attention


class TransposedHeadsAttention(nn.Module):
    """Self-attention as T5 writes it: heads transposed into SDPA without a copy, the output reshaped back."""

    def __init__(self, dim: int = 32, heads: int = 4, bias: bool = True, scale: float | None = 1.0, causal: bool = False):
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.heads, self.scale, self.causal = heads, scale, causal
        self.position_bias = nn.Parameter(torch.randn(1, heads, 1, 1)) if bias else None

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = (p(x).view(b, s, self.heads, -1).transpose(1, 2) for p in (self.q, self.k, self.v))
        mask = self.position_bias.expand(b, self.heads, s, s) if self.position_bias is not None else None
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=self.causal, scale=self.scale)
        return self.o(y.transpose(1, 2).reshape(b, s, -1))


def _ort(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("options", [{}, {"bias": False, "scale": None, "causal": True}])
def test_compressed_graph_with_transposed_heads_exports(tmp_path, frontend, options):
    torch.manual_seed(0)
    model = TransposedHeadsAttention(**options).eval()
    x = torch.randn(2, 8, 32)
    result = fxdecomp.compress(model, (x,), budget=0.6, methods=["svd"], frontend=frontend)
    gm = result.graph_module
    assert has_attention(gm)
    before = gm.graph.python_code("self").src
    report = export_onnx(gm, (x,), tmp_path / "attn.onnx")
    assert report.max_abs_diff is not None and len(report.checked_shapes) == 2  # parity at two batch sizes
    assert gm.graph.python_code("self").src == before  # the user's graph is not rewritten
    other = torch.randn(3, 8, 32)
    np.testing.assert_allclose(_ort(tmp_path / "attn.onnx", other), gm(other).detach().numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("options", [{}, {"bias": False, "scale": None, "causal": True}, {"bias": False, "scale": 0.5}])
def test_math_attention_copy_matches_and_shares_weights(frontend, options):
    torch.manual_seed(0)
    model = TransposedHeadsAttention(**options).eval()
    x = torch.randn(2, 8, 32)
    gm = fxdecomp.compress(model, (x,), budget=1.0, methods=["svd"], frontend=frontend).graph_module
    copy = with_math_attention(gm)
    assert has_attention(gm) and not has_attention(copy)
    assert {id(p) for p in copy.parameters()} == {id(p) for p in gm.parameters()}
    other = torch.randn(3, 8, 32)
    torch.testing.assert_close(copy(other), gm(other))
    torch.testing.assert_close(copy(other), model(other))


def test_plain_module_failure_names_the_fix(tmp_path):
    with pytest.raises(ExportError, match="attn_implementation='eager'"):
        export_onnx(TransposedHeadsAttention().eval(), (torch.randn(2, 8, 32),), tmp_path / "attn.onnx")
