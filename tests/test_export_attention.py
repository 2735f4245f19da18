"""export_onnx on graphs whose scaled_dot_product_attention takes transposed heads (T5's pattern).

torch.onnx's decomposition of SDPA changes the strides under the ``view`` that follows
(pytorch/pytorch#136543, torch 2.13): such graphs are exported from a copy with attention
written out as torch's math kernel (`fxdecomp.onnx_attention`); a plain module gets an
error naming the fix.
"""

import functools

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxdecomp
from fxdecomp.errors import ExportError
from fxdecomp.export import export_onnx
from fxdecomp.onnx_attention import has_attention, math_attention, with_math_attention


class TransposedHeadsAttention(nn.Module):
    """Self-attention as T5 writes it: heads transposed into SDPA without a copy, the output reshaped back.

    ``mask``: "bias" (a float position bias, what trips the exporter), "padding" (a boolean key mask,
    True = attend) or None; ``kv_heads`` < ``heads``: grouped-query attention (``enable_gqa``).
    """

    def __init__(self, dim=32, heads=4, kv_heads=4, mask="bias", scale=1.0, causal=False):
        super().__init__()
        self.heads, self.kv_heads, self.mask, self.scale, self.causal = heads, kv_heads, mask, scale, causal
        head_dim = dim // heads
        self.q, self.o = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.k, self.v = nn.Linear(dim, kv_heads * head_dim), nn.Linear(dim, kv_heads * head_dim)
        self.position_bias = nn.Parameter(torch.randn(1, heads, 1, 1))

    def forward(self, x):
        b, s, _ = x.shape
        q = self.q(x).view(b, s, self.heads, -1).transpose(1, 2)
        k, v = (p(x).view(b, s, self.kv_heads, -1).transpose(1, 2) for p in (self.k, self.v))
        mask = None
        if self.mask == "bias":
            mask = self.position_bias.expand(b, self.heads, s, s)
        elif self.mask == "padding":  # the last key of every sequence is padding
            mask = (torch.arange(s, device=x.device) < s - 1).expand(b, 1, s, s)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=self.causal, scale=self.scale, enable_gqa=self.kv_heads != self.heads
        )
        return self.o(y.transpose(1, 2).reshape(b, s, -1))


class TwoBlocks(nn.Module):
    def __init__(self, first, second):
        super().__init__()
        self.first, self.second = first, second

    def forward(self, x):
        return self.second(self.first(x))


CASES = {
    "float bias": lambda: TransposedHeadsAttention(),
    "float bias, then a boolean padding mask": lambda: TwoBlocks(TransposedHeadsAttention(), TransposedHeadsAttention(mask="padding")),
    "float bias, grouped-query heads": lambda: TransposedHeadsAttention(heads=4, kv_heads=2),
}


def _ort(path, x):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_compressed_graph_with_transposed_heads_exports(tmp_path, frontend, case):
    torch.manual_seed(0)
    model = CASES[case]().eval()
    x = torch.randn(2, 8, 32)
    gm = fxdecomp.compress(model, (x,), budget=0.6, methods=["svd"], frontend=frontend).graph_module
    code, meta, parameters = gm.graph.python_code("self").src, dict(gm.meta), list(gm.parameters())
    report = export_onnx(gm, (x,), tmp_path / "attn.onnx")
    assert report.max_abs_diff is not None and len(report.checked_shapes) == 2  # parity at two batch sizes
    # The user's graph module is as it was: code, meta, the same parameter objects, eval mode.
    assert gm.graph.python_code("self").src == code and gm.meta == meta
    assert all(a is b for a, b in zip(gm.parameters(), parameters)) and not gm.training
    other = torch.randn(3, 8, 32)
    np.testing.assert_allclose(_ort(tmp_path / "attn.onnx", other), gm(other).detach().numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize(
    "options",
    [{}, {"mask": None, "scale": None, "causal": True}, {"mask": "padding", "scale": 0.5}, {"kv_heads": 2, "mask": "padding"}],
)
def test_math_attention_copy_matches_and_shares_weights(frontend, options):
    torch.manual_seed(0)
    model = TransposedHeadsAttention(**options).eval()
    x = torch.randn(2, 8, 32)
    gm = fxdecomp.compress(model, (x,), budget=1.0, methods=["svd"], frontend=frontend).graph_module
    copy = with_math_attention(gm)
    assert has_attention(gm) and not has_attention(copy)
    # Shared, not copied (a parameter the graph never reads, like an unused position bias, need not follow).
    shared = {id(p) for p in copy.parameters()}
    assert shared and shared <= {id(p) for p in gm.parameters()}
    for node in (n for n in copy.graph.nodes if n.op == "get_attr"):  # torch.export graphs read tensors by path
        assert functools.reduce(getattr, node.target.split("."), copy) is functools.reduce(getattr, node.target.split("."), gm)
    other = torch.randn(3, 8, 32)
    torch.testing.assert_close(copy(other), gm(other))
    torch.testing.assert_close(copy(other), model(other))


def test_boolean_mask_means_attend_where_true():
    q, k, v = (torch.randn(2, 3, 5, 4) for _ in range(3))
    keep = torch.rand(2, 1, 5, 5) > 0.3
    keep[..., 0] = True  # no fully masked row
    torch.testing.assert_close(math_attention(q, k, v, keep), F.scaled_dot_product_attention(q, k, v, attn_mask=keep))


def test_plain_module_failure_names_the_fix(tmp_path):
    """A canary too: once torch fixes #136543 this module exports and the test fails; then drop the retry."""
    with pytest.raises(ExportError, match="attn_implementation='eager'") as caught:
        export_onnx(TransposedHeadsAttention().eval(), (torch.randn(2, 8, 32),), tmp_path / "attn.onnx")
    assert "torch.export.export(model, args).module()" in str(caught.value)
