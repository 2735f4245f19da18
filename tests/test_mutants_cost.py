"""Tests written to kill mutation-testing survivors in fxdecomp/cost.py (tools/mutation/run.py cost).

Oracles: MACs written out by hand from the layer's definition, and torch's own
FLOP counter run on the real modules (2 FLOPs per MAC).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import fxdecomp
from fxdecomp.cost import module_macs, spec_macs
from fxdecomp.layer_spec import layer_spec
from fxdecomp.layers import TTLinear


def test_transposed_conv_macs_multiply_batch_and_kernel():
    # Every input position of a transposed conv gives S * T/g * prod(k) MACs; batch 3, kernel 2x3 (not 1).
    layer = nn.ConvTranspose2d(4, 6, (2, 3), stride=2, groups=2, bias=False)
    shape = (3, 4, 5, 7)
    hand = 3 * 4 * (6 // 2) * (2 * 3) * (5 * 7)
    assert module_macs(layer, shape) == hand
    assert spec_macs(layer_spec(layer), shape) == hand
    assert fxdecomp.count_flops(layer, (torch.randn(shape),)) == 2 * hand


def test_padding_of_a_batched_1d_input_pads_only_the_last_dim():
    # ZeroPad1d on (N, C, L): only L grows (10 + 1 + 2), the batch and channels stay.
    chain = nn.Sequential(nn.ZeroPad1d((1, 2)), nn.Conv1d(3, 4, 3, bias=False))
    shape = (2, 3, 10)
    hand = 2 * 4 * 3 * 3 * (13 - 2)
    assert module_macs(chain, shape) == hand
    assert fxdecomp.count_flops(chain, (torch.randn(shape),)) == 2 * hand


def test_tt_linear_keeps_the_token_dims_for_the_next_layer():
    tt = TTLinear((2, 3), (2, 2), (2,), bias=False)
    chain = nn.Sequential(tt, nn.Linear(4, 5, bias=False))
    x = torch.randn(7, 6)
    # The following Linear runs once per token: 7 tokens x 4 x 5 MACs.
    assert module_macs(chain, x.shape) == 7 * tt.macs_per_token() + 7 * 4 * 5
    assert 2 * module_macs(chain, x.shape) == fxdecomp.count_flops(chain, (x,))


class _Attention(nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v)


def test_cpu_fused_attention_counts_both_products():
    b, h, lq, lk, e = 2, 3, 5, 7, 4
    q, k, v = torch.randn(b, h, lq, e), torch.randn(b, h, lk, e), torch.randn(b, h, lk, e)
    # Q K^T: b h lq lk e MACs, then (.) V: b h lq lk e MACs; 2 FLOPs each.
    assert fxdecomp.count_flops(_Attention(), (q, k, v)) == 2 * (2 * b * h * lq * lk * e)


def test_count_flops_puts_the_attention_fast_path_setting_back():
    original = torch.backends.mha.get_fastpath_enabled()
    try:
        for setting in (True, False):
            torch.backends.mha.set_fastpath_enabled(setting)
            fxdecomp.count_flops(nn.Linear(3, 2), (torch.randn(1, 3),))
            assert torch.backends.mha.get_fastpath_enabled() is setting
    finally:
        torch.backends.mha.set_fastpath_enabled(original)
