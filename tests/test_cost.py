"""The cost model agrees with count_flops on every decomposed structure.

count_flops counts at the aten level (torch.utils.flop_counter.FlopCounterMode, 2 FLOPs
per multiply-add); the cost model (module_macs, spec_macs) walks the structure by hand.
Both leave bias additions and padding uncounted, so they agree exactly. (Before issue 13
the whole-model count was fvcore's; fvcore is no longer used.)
"""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import fxdecomp
from fxdecomp.cost import FLOPS_PER_MAC, count_params, module_macs, spec_macs
from fxdecomp.decomposers import get_decomposer
from fxdecomp.layer_spec import layer_spec


@pytest.mark.parametrize("method", ["svd", "spatial_svd", "tucker2", "cp", "tt", "tiled_svd"])
@given(
    padding=st.sampled_from([0, 1, "same"]),
    mode=st.sampled_from(["zeros", "reflect"]),
    stride=st.integers(1, 2),
    fraction=st.sampled_from([0.2, 0.5, 1.0]),
)
def test_conv_cost_matches_count_flops(method, padding, mode, stride, fraction):
    stride = 1 if padding == "same" else stride
    layer = nn.Conv2d(8, 12, (3, 2), stride=stride, padding=padding, padding_mode=mode)
    x = torch.randn(2, 8, 9, 10)
    decomposed = fxdecomp.decompose_layer(layer, method, fraction)
    spec = layer_spec(layer)
    decomposer = get_decomposer("conv2d", method)
    predicted = module_macs(decomposer.structure(spec, decomposed.fxdecomp_ranks), x.shape)
    assert predicted * FLOPS_PER_MAC == fxdecomp.count_flops(decomposed, (x,))
    assert decomposer.params(spec, decomposed.fxdecomp_ranks) == count_params(decomposed)
    assert spec_macs(spec, x.shape) * FLOPS_PER_MAC == fxdecomp.count_flops(layer, (x,))


@pytest.mark.parametrize("method", ["svd", "tt", "tiled_svd"])
@pytest.mark.parametrize("fraction", [0.25, 1.0])
def test_linear_cost_matches_count_flops(method, fraction):
    layer = nn.Linear(48, 32)
    x = torch.randn(3, 5, 48)
    decomposed = fxdecomp.decompose_layer(layer, method, fraction)
    spec = layer_spec(layer)
    decomposer = get_decomposer("linear", method)
    assert module_macs(decomposer.structure(spec, decomposed.fxdecomp_ranks), x.shape) * 2 == fxdecomp.count_flops(decomposed, (x,))
    assert spec_macs(spec, x.shape) * 2 == fxdecomp.count_flops(layer, (x,)) == 2 * 15 * 48 * 32


def test_count_flops_convention_is_two_per_multiply_add():
    assert fxdecomp.count_flops(nn.Linear(8, 4, bias=False), (torch.randn(2, 8),)) == 2 * 2 * 8 * 4
