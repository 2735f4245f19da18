"""The cost model: multiply-adds (MACs) and parameters of layers and decomposed modules.

Convention: one multiply-add = 1 MAC = 2 FLOPs. A transposed conv's MACs are
S * T/groups * prod(kernel) per input position (times the batch). Bias additions, padding and
shuffles are not counted, as fvcore does not count them; `count_flops` (fvcore)
and this module therefore agree exactly, which the tests check.

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
    tokens = math.prod(shape[:-1])
    if isinstance(module, nn.Linear):
        return tokens * module.in_features * module.out_features, (*shape[:-1], module.out_features)
    if isinstance(module, (TTLinear, TiledLinear)):
        return tokens * module.macs_per_token(), (*shape[:-1], module.out_features)
    raise InvalidInputError(f"the cost model does not know {type(module).__name__}")


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _convolution_mode_macs(inputs, outputs) -> int:
    from fvcore.nn.jit_handles import get_shape

    weight_shape, output_shape = get_shape(inputs[1]), get_shape(outputs[0])
    return math.prod(output_shape) * math.prod(weight_shape[1:])


def count_flops(module: nn.Module, example_inputs: tuple | torch.Tensor) -> int:
    """FLOPs of one forward pass on ``example_inputs``, counted by fvcore (2 FLOPs per multiply-add).

    Counts convolutions, matrix products, norms and the other ops fvcore knows;
    elementwise ops count zero, as in fvcore.

    Example::

        count_flops(nn.Linear(8, 4), (torch.randn(2, 8),))  # 2 * 2 * 8 * 4 = 128
    """
    from fvcore.nn import FlopCountAnalysis

    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    analysis = FlopCountAnalysis(module, tuple(example_inputs))
    # fvcore has no handle for convs with string padding ('same'/'valid'), which trace to this op.
    analysis.set_op_handle("aten::_convolution_mode", _convolution_mode_macs)
    analysis.unsupported_ops_warnings(False)
    analysis.uncalled_modules_warnings(False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        modes = {m: m.training for m in module.modules()}
        for m in modes:
            m.training = False  # set directly: torch.export's modules refuse .eval()
        try:
            macs = analysis.total()
        finally:
            for m, mode in modes.items():
                m.training = mode
    return int(macs) * FLOPS_PER_MAC
