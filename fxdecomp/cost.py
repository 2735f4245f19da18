"""The cost model: multiply-adds (MACs) and parameters of layers and decomposed modules.

Convention: one multiply-add = 1 MAC = 2 FLOPs. A transposed conv's MACs are
S * T/groups * prod(kernel) per input position (times the batch). Bias additions,
padding and shuffles are not counted, as `torch.utils.flop_counter` does not count
them; `count_flops` (whole models, at the aten level) and this module therefore
agree exactly on the layers and structures it knows, which the tests check.

Example::

    module_macs(nn.Conv2d(16, 32, 3, padding=1), (1, 16, 8, 8))  # 294912
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
from torch import nn

from .errors import InvalidInputError
from .layer_spec import CONV_TYPES, PAD_TYPES, ConvSpec, LinearSpec, torch_class, layer_spec
from .layers import TiledLinear, TTLinear
from .tile_grid import TileGrid

FLOPS_PER_MAC = 2


def spec_macs(spec: ConvSpec | LinearSpec, input_shape: Sequence[int]) -> int:
    """MACs of the original layer on an input of ``input_shape``."""
    if isinstance(spec, LinearSpec):
        return math.prod(input_shape[:-1]) * spec.in_features * spec.out_features
    return _conv_macs(spec, input_shape)


def _conv_macs(spec: ConvSpec, input_shape: Sequence[int]) -> int:
    """A conv's MACs: every output position of a plain conv takes T * S/g * prod(k); every input position of a
    transposed conv gives S * T/g * prod(k). Leading dims beyond (C, *spatial) count as batch (1 if unbatched)."""
    spatial = tuple(input_shape[-spec.ndim :])
    batch = math.prod(input_shape[: -spec.ndim - 1])
    if spec.transposed:
        return batch * spec.in_channels * spec.out_per_group * spec.kernel_area * math.prod(spatial)
    return batch * spec.out_channels * spec.in_per_group * spec.kernel_area * math.prod(spec.output_size(*spatial))


def module_macs(module: nn.Module, input_shape: Sequence[int]) -> int:
    """MACs of a layer or a decomposed module (a Sequential of standard layers) on ``input_shape``."""
    return _walk(module, tuple(input_shape))[0]


def _walk(module: nn.Module, shape: tuple[int, ...]) -> tuple[int, tuple[int, ...]]:
    if isinstance(module, nn.Sequential):
        total = 0
        for child in module:
            macs, shape = _walk(child, shape)
            total += macs
        return total, shape
    if isinstance(module, CONV_TYPES) and type(module).forward is torch_class(module).forward:
        # Plain torch convs only: the spec reads their padding ('same' resolved), stride and output padding.
        spec = layer_spec(module)
        spatial = spec.output_size(*shape[-spec.ndim :])
        return _conv_macs(spec, shape), (*shape[: -spec.ndim - 1], module.out_channels, *spatial)
    if isinstance(module, PAD_TYPES):
        pads = module.padding
        grown = tuple(size + pads[2 * i] + pads[2 * i + 1] for i, size in enumerate(reversed(shape[-(len(pads) // 2) :])))
        return 0, (*shape[: -len(grown)], *reversed(grown))
    if isinstance(module, (nn.ChannelShuffle, nn.Identity)):
        return 0, shape
    if isinstance(module, TileGrid):
        return module.macs(shape, _walk)
    tokens = math.prod(shape[:-1])
    if isinstance(module, nn.Linear):
        return tokens * module.in_features * module.out_features, (*shape[:-1], module.out_features)
    if isinstance(module, (TTLinear, TiledLinear)):
        return tokens * module.macs_per_token(), (*shape[:-1], module.out_features)
    raise InvalidInputError(f"the cost model does not know {type(module).__name__}")


def count_params(module: nn.Module) -> int:
    """Parameters (elements) of ``module``, each stored tensor counted once.

    Tied weights (an output head whose ``weight`` is the embedding's, or two
    Parameters viewing one storage) count once: tensors are identified by their
    storage, offset, shape and stride. Meta tensors (structures built only to be
    counted) have no storage and are identified by object.
    """
    seen: set = set()
    total = 0
    for parameter in module.parameters():
        key = id(parameter) if parameter.is_meta else _storage_key(parameter)
        if key not in seen:
            seen.add(key)
            total += parameter.numel()
    return total


def _storage_key(tensor: torch.Tensor) -> tuple:
    return (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tuple(tensor.stride()))


def _sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """CPU's fused attention kernel, which torch.utils.flop_counter has no formula for (torch 2.13)."""
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


class _WholeModel:
    """A stand-in for FlopCounterMode's module tracker: every count goes to "Global", no hook is put on any module.
    Torch's tracker hooks each module's inputs that require grad, and fails (AssertionError, torch 2.13) on a view of a
    parameter made under no_grad (DBRX's experts, ``self.w1.view(...)[e]``); fxdecomp reads the total only."""

    parents = frozenset({"Global"})

    def __enter__(self):
        return self

    def __exit__(self, *args) -> None:
        return None


def flop_counter():
    """A `torch.utils.flop_counter.FlopCounterMode` that counts as `count_flops` does (CPU's fused SDPA and grouped
    matmuls included), for the whole model (``get_total_flops``; no per-module table)."""
    from torch.utils.flop_counter import FlopCounterMode

    from .capture.experts import grouped_mm_flop_formulas

    formulas = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flops, **grouped_mm_flop_formulas()}
    counter = FlopCounterMode(display=False, custom_mapping=formulas)
    counter.mod_tracker = _WholeModel()
    return counter


def count_flops(module: nn.Module, example_inputs: tuple | torch.Tensor) -> int:
    """FLOPs of one forward pass on ``example_inputs``, counted at the aten level (2 FLOPs per multiply-add).

    Counted by `torch.utils.flop_counter.FlopCounterMode` on the ops the model
    really runs: convolutions (transposed too), matrix products (mm, bmm, addmm,
    baddbmm), scaled-dot-product attention, fused kernels included (CPU's flash
    attention kernel is given the formula of the other SDPA kernels), and the grouped
    matmuls of mixture-of-experts layers (``aten._grouped_mm``, transformers'
    ``grouped_mm_fallback``: 2 FLOPs per multiply-add of every routed row). Bias
    additions, norms and elementwise ops count zero, as in ONNX-side counting
    (`fxdecomp.onnx_flops`). The model runs in eval mode, under ``no_grad``,
    with torch's native multi-head-attention fast path switched off for the
    count: that fast path (``torch._native_multi_head_attention``, taken by
    nn.MultiheadAttention and nn.TransformerEncoderLayer under no_grad) is one
    opaque op the counter cannot see into; the composite path does the same
    multiply-adds. The module's mode, buffers and the inputs are left as they were.

    Example::

        count_flops(nn.Linear(8, 4), (torch.randn(2, 8),))  # 2 * 2 * 8 * 4 = 128
    """
    from .graph.effects import fresh_inputs, preserved_buffers

    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    modes = {m: m.training for m in module.modules()}
    fastpath = torch.backends.mha.get_fastpath_enabled()
    counter = flop_counter()
    try:
        for m in modes:
            m.training = False  # set directly: torch.export's modules refuse .eval()
        torch.backends.mha.set_fastpath_enabled(False)
        with torch.no_grad(), preserved_buffers(module), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with counter:
                module(*fresh_inputs(tuple(example_inputs)))
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        for m, mode in modes.items():
            m.training = mode
    return int(counter.get_total_flops())
