"""What a decomposition must preserve of a layer, read once from the module.

A `ConvSpec` or `LinearSpec` holds every attribute that changes the layer's
output: channels, kernel, stride, dilation, groups, the explicit padding that is
applied before the convolution (``'same'`` resolved, subclass padding included)
and its mode, and the bias. Decomposers only see these specs, never the module.

Example::

    spec = layer_spec(nn.Conv2d(16, 32, (3, 5), padding="same", padding_mode="reflect"))
    spec.pads  # (2, 2, 1, 1): left, right, top, bottom
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .errors import InvalidInputError, UnsupportedLayerError

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


@dataclass(frozen=True)
class ConvSpec:
    """A Conv2d's geometry; ``pads`` are (left, right, top, bottom), applied before the conv."""

    in_channels: int
    out_channels: int
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    dilation: tuple[int, int]
    groups: int
    pads: tuple[int, int, int, int]
    padding_mode: str
    has_bias: bool

    kind = "conv2d"

    @property
    def in_per_group(self) -> int:
        return self.in_channels // self.groups

    @property
    def out_per_group(self) -> int:
        return self.out_channels // self.groups

    @property
    def kernel_area(self) -> int:
        return self.kernel_size[0] * self.kernel_size[1]

    @property
    def padding_in_conv(self) -> tuple[int, int] | None:
        """Padding that a plain zero-padded Conv2d can apply itself, or None if a pad layer is needed."""
        left, right, top, bottom = self.pads
        if self.padding_mode == "zeros" and left == right and top == bottom:
            return (top, left)
        if not any(self.pads):
            return (0, 0)
        return None

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        left, right, top, bottom = self.pads
        (kh, kw), (sh, sw), (dh, dw) = self.kernel_size, self.stride, self.dilation
        return (
            (height + top + bottom - dh * (kh - 1) - 1) // sh + 1,
            (width + left + right - dw * (kw - 1) - 1) // sw + 1,
        )


@dataclass(frozen=True)
class LinearSpec:
    in_features: int
    out_features: int
    has_bias: bool

    kind = "linear"


def layer_spec(layer: nn.Module) -> ConvSpec | LinearSpec:
    """Read the spec of an nn.Linear or nn.Conv2d (or a subclass of either)."""
    if isinstance(layer, nn.Linear):
        return LinearSpec(layer.in_features, layer.out_features, layer.bias is not None)
    if isinstance(layer, nn.Conv2d):
        return _conv_spec(layer)
    raise UnsupportedLayerError(
        f"{type(layer).__name__} is not a Conv2d or Linear; fxdecomp decomposes only those (and their subclasses)"
    )


def check_finite(name: str, layer: nn.Module) -> None:
    """Refuse layers whose weight or bias holds NaN or infinity."""
    for pname, tensor in (("weight", layer.weight), ("bias", getattr(layer, "bias", None))):
        if tensor is not None and not bool(torch.isfinite(tensor).all()):
            raise InvalidInputError(
                f"layer {name!r} has non-finite values in its {pname}; fix or exclude the layer before decomposing"
            )


def _conv_spec(conv: nn.Conv2d) -> ConvSpec:
    if conv.transposed:
        raise UnsupportedLayerError(f"{type(conv).__name__}: transposed convolutions are not supported")
    if conv.padding_mode not in PADDING_MODES:
        raise UnsupportedLayerError(f"padding_mode={conv.padding_mode!r} is not one of {PADDING_MODES}")
    pads = _explicit_pads(conv)
    spec = ConvSpec(
        in_channels=conv.in_channels,
        out_channels=conv.out_channels,
        kernel_size=tuple(conv.kernel_size),
        stride=tuple(conv.stride),
        dilation=tuple(conv.dilation),
        groups=conv.groups,
        pads=pads,
        padding_mode=conv.padding_mode,
        has_bias=conv.bias is not None,
    )
    if type(conv).forward is not nn.Conv2d.forward:
        _verify_custom_forward(conv, spec)
    return spec


def _explicit_pads(conv: nn.Conv2d) -> tuple[int, int, int, int]:
    # nn.Conv2d stores its padding (including 'same', which may be asymmetric) as
    # (left, right, top, bottom) for F.pad in _reversed_padding_repeated_twice.
    if isinstance(conv.padding, str):
        own = tuple(int(p) for p in conv._reversed_padding_repeated_twice)
    else:
        ph, pw = conv.padding
        own = (pw, pw, ph, ph)
    if type(conv).forward is nn.Conv2d.forward:
        return own
    # Subclasses that pad in their own forward (EfficientNet's Conv2dStaticSamePadding)
    # keep a static pad module; what they do with it is checked by _verify_custom_forward.
    static = getattr(conv, "static_padding", None)
    extra = tuple(int(p) for p in getattr(static, "padding", (0, 0, 0, 0))) if static is not None else (0, 0, 0, 0)
    if len(extra) != 4:
        extra = (0, 0, 0, 0)
    return tuple(a + b for a, b in zip(own, extra))


@torch.no_grad()
def _verify_custom_forward(conv: nn.Conv2d, spec: ConvSpec) -> None:
    """A subclass's forward must equal pad-then-conv with the spec; otherwise refuse it."""
    name = type(conv).__name__
    (kh, kw), (dh, dw) = spec.kernel_size, spec.dilation
    height, width = 2 * dh * (kh - 1) + 5, 2 * dw * (kw - 1) + 7
    generator = torch.Generator().manual_seed(0)
    probe = torch.randn(1, spec.in_channels, height, width, generator=generator, dtype=conv.weight.dtype)
    was_training = conv.training
    try:
        conv.eval()
        actual = conv(probe)
    except Exception as exc:  # the layer cannot even run on a probe: its semantics are unknown
        raise UnsupportedLayerError(f"{name} overrides forward and fails on a probe input: {exc}") from exc
    finally:
        conv.train(was_training)
    expected = reference_conv(probe, conv.weight, conv.bias, spec)
    if actual.shape != expected.shape or not torch.allclose(actual, expected, rtol=1e-4, atol=1e-5):
        raise UnsupportedLayerError(
            f"{name} overrides forward in a way fxdecomp cannot express as pad + conv (e.g. padding that "
            "depends on the input size); give it a static padding or exclude it"
        )


def reference_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, spec: ConvSpec) -> torch.Tensor:
    """The layer's output computed from its spec: explicit pad, then an unpadded conv."""
    x = pad_input(x, spec.pads, spec.padding_mode)
    return F.conv2d(x, weight, bias, spec.stride, 0, spec.dilation, spec.groups)


def pad_input(x: torch.Tensor, pads: tuple[int, int, int, int], mode: str) -> torch.Tensor:
    if not any(pads):
        return x
    return F.pad(x, pads, mode="constant" if mode == "zeros" else mode)


def pad_module(pads: tuple[int, int, int, int], mode: str) -> nn.Module:
    """The standard torch pad layer that applies ``pads`` in ``mode``."""
    if mode == "zeros":
        return nn.ZeroPad2d(pads)
    if mode == "reflect":
        return nn.ReflectionPad2d(pads)
    if mode == "replicate":
        return nn.ReplicationPad2d(pads)
    return nn.CircularPad2d(pads)
