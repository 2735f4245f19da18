"""What a decomposition must preserve of a layer, read once from the module.

A `ConvSpec` or `LinearSpec` holds every attribute that changes the layer's
output: channels, kernel, stride, dilation, groups, the explicit padding that is
applied before the convolution (``'same'`` resolved, subclass padding included)
and its mode, and the bias. Convs have 1 to 3 spatial dims and may be transposed
(``nn.ConvTranspose*d``: then ``output_padding`` too); ``spec.kind`` names the
kind ("conv1d", "conv2d", "conv3d", "conv_transpose1d", ...). Decomposers only
see these specs, never the module.

Example::

    spec = layer_spec(nn.Conv2d(16, 32, (3, 5), padding="same", padding_mode="reflect"))
    spec.pads  # (2, 2, 1, 1): left, right, top, bottom
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .errors import InvalidInputError, UnsupportedLayerError

PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


@dataclass(frozen=True)
class ConvSpec:
    """A convolution's geometry (1 to 3 spatial dims, plain or transposed).

    Tuples per spatial dim run first dim first (``kernel_size=(kh, kw)``); ``pads`` run in
    ``F.pad`` order, last dim first: (left, right, top, bottom[, front, back]). For a plain
    conv they are applied before it (``'same'`` resolved); for a transposed conv they are its
    own symmetric ``padding`` (cropped from the output), and ``output_padding`` is set.
    """

    in_channels: int
    out_channels: int
    kernel_size: tuple[int, ...]
    stride: tuple[int, ...]
    dilation: tuple[int, ...]
    groups: int
    pads: tuple[int, ...]
    padding_mode: str
    has_bias: bool
    transposed: bool = False
    output_padding: tuple[int, ...] = ()

    @property
    def ndim(self) -> int:
        """Number of spatial dims (1, 2 or 3)."""
        return len(self.kernel_size)

    @property
    def kind(self) -> str:
        """"conv1d" .. "conv3d", or "conv_transpose1d" .. "conv_transpose3d": the decomposer registry key."""
        return f"conv_transpose{self.ndim}d" if self.transposed else f"conv{self.ndim}d"

    @property
    def in_per_group(self) -> int:
        return self.in_channels // self.groups

    @property
    def out_per_group(self) -> int:
        return self.out_channels // self.groups

    @property
    def kernel_area(self) -> int:
        """Taps of the kernel: the product of ``kernel_size`` (kh * kw for a 2-D conv)."""
        return math.prod(self.kernel_size)

    @property
    def padding_in_conv(self) -> tuple[int, ...] | None:
        """Padding (one per dim, first dim first) the conv applies itself, or None if a pad layer is needed."""
        before, after = self.pads[-2::-2], self.pads[::-2]  # first dim first
        if self.transposed or (self.padding_mode == "zeros" and before == after):
            return tuple(before)
        if not any(self.pads):
            return (0,) * self.ndim
        return None

    def output_size(self, *spatial: int) -> tuple[int, ...]:
        """Output spatial sizes for input sizes ``spatial`` (first dim first), as torch computes them."""
        before, after = self.pads[-2::-2], self.pads[::-2]
        sizes = []
        for i, size in enumerate(spatial):
            k, s, d = self.kernel_size[i], self.stride[i], self.dilation[i]
            if self.transposed:
                sizes.append((size - 1) * s - before[i] - after[i] + d * (k - 1) + self.output_padding[i] + 1)
            else:
                sizes.append((size + before[i] + after[i] - d * (k - 1) - 1) // s + 1)
        return tuple(sizes)


@dataclass(frozen=True)
class LinearSpec:
    in_features: int
    out_features: int
    has_bias: bool

    kind = "linear"


CONV_TYPES = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
LAYER_TYPES = (nn.Linear, *CONV_TYPES)


def layer_spec(layer: nn.Module) -> ConvSpec | LinearSpec:
    """Read the spec of an nn.Linear, nn.Conv1d/2d/3d or nn.ConvTranspose1d/2d/3d (or a subclass)."""
    if isinstance(layer, nn.Linear):
        return LinearSpec(layer.in_features, layer.out_features, layer.bias is not None)
    if isinstance(layer, CONV_TYPES):
        return _conv_spec(layer)
    raise UnsupportedLayerError(
        f"{type(layer).__name__} is not a Conv2d or Linear, nor a Conv1d, Conv3d or ConvTranspose1d/2d/3d; "
        "fxdecomp decomposes only those (and their subclasses)"
    )


def computes_plain_linear(layer: nn.Linear) -> bool:
    """Whether an nn.Linear (or subclass) computes ``F.linear(x, weight, bias)``: a forward of its own (timm's
    ``Linear`` casts for TorchScript; Falcon's computes ``x @ W.T + b``; PhiMoE's router returns (probabilities,
    weights, experts)) is checked on a seeded probe, run on an eval-mode copy without hooks (random values where the
    layer is on the meta device). A forward that fails on the probe does not."""
    if type(layer).forward is nn.Linear.forward:
        return True
    if not layer.weight.is_floating_point():
        return False
    try:
        # A copy in eval mode and a forked random state: the probe writes into no buffer and draws from no generator
        # of the model's (a layer on the meta device, as load_compressed builds it, gets random values).
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            if layer.weight.is_meta:
                copy_ = copy.deepcopy(layer).to_empty(device="cpu")
                for tensor in [*copy_.parameters(), *copy_.buffers()]:
                    tensor.normal_() if tensor.is_floating_point() else tensor.zero_()
            else:  # the same parameters (no copy of a large weight), its own buffers
                copy_ = copy.copy(layer)
                copy_.__dict__.update(_parameters=dict(layer._parameters), _modules=dict(layer._modules),
                                      _buffers={k: None if v is None else v.clone() for k, v in layer._buffers.items()})
            copy_.training = False
            probe = torch.randn(3, layer.in_features).to(copy_.weight)
            out, want = type(copy_).forward(copy_, probe), F.linear(probe, copy_.weight, copy_.bias)
            return (isinstance(out, torch.Tensor) and out.shape == want.shape and out.dtype == want.dtype
                    and bool(torch.allclose(out, want, rtol=1e-4, atol=1e-5)))
    except Exception:  # a forward the probe cannot run (another dtype, input rank): not a plain Linear
        return False


def check_finite(name: str, layer: nn.Module) -> None:
    """Refuse layers whose weight or bias holds NaN or infinity."""
    for pname, tensor in (("weight", layer.weight), ("bias", getattr(layer, "bias", None))):
        if tensor is not None and not bool(torch.isfinite(tensor).all()):
            raise InvalidInputError(
                f"layer {name!r} has non-finite values in its {pname}; fix or exclude the layer before decomposing"
            )


def torch_class(conv: nn.Module) -> type[nn.Module]:
    """The torch conv class (nn.Conv2d, nn.ConvTranspose1d, ...) that ``conv`` is or subclasses."""
    return next(cls for cls in CONV_TYPES if isinstance(conv, cls))


def _conv_spec(conv: nn.Module) -> ConvSpec:
    if conv.padding_mode not in PADDING_MODES:
        raise UnsupportedLayerError(f"padding_mode={conv.padding_mode!r} is not one of {PADDING_MODES}")
    if conv.transposed:
        pads = tuple(p for pad in reversed(conv.padding) for p in (pad, pad))
    else:
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
        transposed=bool(conv.transposed),
        output_padding=tuple(conv.output_padding) if conv.transposed else (),
    )
    if type(conv).forward is not torch_class(conv).forward:
        _verify_custom_forward(conv, spec)
    return spec


def _explicit_pads(conv: nn.Module) -> tuple[int, ...]:
    # torch's convs store their padding (including 'same', which may be asymmetric) in
    # F.pad order (last dim first) in _reversed_padding_repeated_twice.
    if isinstance(conv.padding, str):
        own = tuple(int(p) for p in conv._reversed_padding_repeated_twice)
    else:
        own = tuple(int(p) for pad in reversed(conv.padding) for p in (pad, pad))
    if type(conv).forward is torch_class(conv).forward:
        return own
    # Subclasses that pad in their own forward (EfficientNet's Conv2dStaticSamePadding)
    # keep a static pad module; what they do with it is checked by _verify_custom_forward.
    static = getattr(conv, "static_padding", None)
    extra = tuple(int(p) for p in getattr(static, "padding", ())) if static is not None else ()
    if len(extra) != len(own):
        extra = (0,) * len(own)
    return tuple(a + b for a, b in zip(own, extra))


@torch.no_grad()
def _verify_custom_forward(conv: nn.Module, spec: ConvSpec) -> None:
    """A subclass's forward must equal pad-then-conv with the spec; otherwise refuse it."""
    name = type(conv).__name__
    sizes = [2 * d * (k - 1) + 5 + 2 * i for i, (k, d) in enumerate(zip(spec.kernel_size, spec.dilation))]
    generator = torch.Generator().manual_seed(0)
    probe = torch.randn(1, spec.in_channels, *sizes, generator=generator, dtype=conv.weight.dtype).to(conv.weight.device)
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


_CONV_FUNCTIONS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_TRANSPOSE_FUNCTIONS = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def reference_conv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, spec: ConvSpec) -> torch.Tensor:
    """The layer's output computed from its spec: explicit pad, then an unpadded conv (or the transposed conv)."""
    if spec.transposed:
        conv_transpose = _CONV_TRANSPOSE_FUNCTIONS[spec.ndim]
        return conv_transpose(x, weight, bias, spec.stride, spec.padding_in_conv, spec.output_padding, spec.groups, spec.dilation)
    x = pad_input(x, spec.pads, spec.padding_mode)
    return _CONV_FUNCTIONS[spec.ndim](x, weight, bias, spec.stride, 0, spec.dilation, spec.groups)


def pad_input(x: torch.Tensor, pads: tuple[int, ...], mode: str) -> torch.Tensor:
    if not any(pads):
        return x
    return F.pad(x, pads, mode="constant" if mode == "zeros" else mode)


_PAD_MODULES = {
    "zeros": (nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d),
    "reflect": (nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d),
    "replicate": (nn.ReplicationPad1d, nn.ReplicationPad2d, nn.ReplicationPad3d),
    "circular": (nn.CircularPad1d, nn.CircularPad2d, nn.CircularPad3d),
}
PAD_TYPES = tuple(cls for classes in _PAD_MODULES.values() for cls in classes)


def pad_module(pads: tuple[int, ...], mode: str) -> nn.Module:
    """The standard torch pad layer that applies ``pads`` (F.pad order, 2 per spatial dim) in ``mode``."""
    return _PAD_MODULES[mode][len(pads) // 2 - 1](tuple(pads))
