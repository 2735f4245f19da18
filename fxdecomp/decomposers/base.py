"""The decomposer interface and its registry.

A decomposer turns one layer (seen through its `ConvSpec` / `LinearSpec`) into
a small module of standard layers. It answers five questions: does it apply
(`check`), its maximum ranks, the module's structure at given ranks (from
which cost is counted), the weight error at given ranks, and the module with
its factors loaded (`build`). The expensive factorisation is done once by
`factorize` and shared by every rank asked of it.

Example::

    @register
    class ConvSVD(Decomposer):
        kind, method = "conv2d", "svd"
        ...

    decomposer = get_decomposer("conv2d", "svd")
"""

from __future__ import annotations

import math
from functools import cached_property
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from ..factorize.svd import Spectrum
from ..errors import InvalidInputError, RegistrationError, UnknownMethodError, UnsupportedLayerError
from ..layer_spec import ConvSpec, LinearSpec, pad_module

Spec = ConvSpec | LinearSpec
Ranks = tuple[int, ...]

_REGISTRY: dict[tuple[str, str], type[Decomposer]] = {}


class Decomposer(ABC):
    kind: ClassVar[str]  # "conv2d" or "linear" (the first of ``kinds``)
    kinds: ClassVar[tuple[str, ...]] = ()  # every layer kind it is registered for; () means (kind,)
    method: ClassVar[str]
    options: ClassVar[tuple[str, ...]] = ()  # keyword options the constructor accepts
    data_aware: ClassVar[bool] = False  # fits its factors to calibration data (factorize_whitened)

    def check(self, spec: Spec) -> None:
        """Raise UnsupportedLayerError naming the attribute this method cannot keep."""

    @abstractmethod
    def max_ranks(self, spec: Spec) -> Ranks:
        """The ranks at which the structure reproduces the layer exactly."""

    def planning_max_ranks(self, spec: Spec) -> Ranks:
        """The largest ranks the planner's grid explores (default: the maximum ranks)."""
        return self.max_ranks(spec)

    @abstractmethod
    def structure(self, spec: Spec, ranks: Ranks) -> nn.Module:
        """The decomposed module with uninitialised weights (build it under torch.device('meta') for costs)."""

    @abstractmethod
    def factorize(self, spec: Spec, weight: torch.Tensor) -> Any:
        """The rank-independent, expensive part (spectra, bases); handed back to `error` and `load`."""

    def factorize_whitened(
        self,
        spec: Spec,
        weight: torch.Tensor,
        grams: Sequence[torch.Tensor],
        output_weights: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None,
    ) -> Any:
        """Like `factorize`, fitted to inputs with Gram matrices ``grams`` (one per group); see data_aware.

        ``output_weights`` (one per group: (H^(1/2), H^(-1/2)) of an output Gram matrix H, from
        `fxdecomp.calibration.output_whitening`) weight the layer's output errors as the model's outputs see them.
        """
        raise NotImplementedError

    def can_fit(self, spec: Spec, grams: Sequence[Any]) -> bool:
        """Whether `factorize_whitened` can fit this layer to these Gram matrices (dense tensors or sketches).

        Where it cannot, the planner uses the weight-only factors and measures their error on the data.
        """
        return self.data_aware

    @abstractmethod
    def error(self, spec: Spec, state: Any, ranks: Ranks) -> float:
        """Relative Frobenius error of the layer's weight at ``ranks``; of its outputs on the data for a fitted state.

        A state from `factorize_whitened` reports ||H^(1/2) (W - W_hat) G^(1/2)|| / ||H^(1/2) W G^(1/2)||
        (G the input Gram matrix, H the output one or the identity), the error the planner scores.
        """

    def estimate_error(self, spec: Spec, state: Any, ranks: Ranks) -> float:
        """What the planner uses for `error`: the same, unless a method has a cheaper bound (CP)."""
        return self.error(spec, state, ranks)

    def estimate_reconstruct(self, spec: Spec, state: Any, ranks: Ranks) -> torch.Tensor:
        """What the planner uses for `reconstruct` (to measure errors on calibration data)."""
        return self.reconstruct(spec, state, ranks)

    @abstractmethod
    def reconstruct(self, spec: Spec, state: Any, ranks: Ranks) -> torch.Tensor:
        """The dense weight (the layer's shape, float64) that the factors at ``ranks`` amount to."""

    @abstractmethod
    def load(self, module: nn.Module, spec: Spec, state: Any, ranks: Ranks) -> None:
        """Copy the factors at ``ranks`` into ``module`` (made by `structure`); the bias is set by `build`."""

    @abstractmethod
    def rank_spectra(self, spec: Spec, state: Any) -> Sequence[Sequence[Spectrum]]:
        """For each rank, the spectra (one per group) that set it under the energy and VBMF rules."""

    def build(self, spec: Spec, state: Any, ranks: Ranks, bias: torch.Tensor | None, like: torch.Tensor) -> nn.Module:
        """The decomposed module at ``ranks``, on ``like``'s device and dtype."""
        # In like's dtype BEFORE loading: factors loaded into default-dtype (float32) layers and cast
        # up afterwards would lose float64 precision (full rank no longer exact for float64 models).
        module = self.structure(spec, ranks).to(device=like.device, dtype=like.dtype)
        self.load(module, spec, state, ranks)
        last = final_layer(module)
        if bias is not None:
            with torch.no_grad():
                last.bias.copy_(bias)
        if like.dim() == 4 and not like.is_contiguous() and like.is_contiguous(memory_format=torch.channels_last):
            module.to(memory_format=torch.channels_last)  # the layout the user chose for the layer (fast NHWC kernels)
        return module

    def params(self, spec: Spec, ranks: Ranks) -> int:
        with torch.device("meta"):
            module = self.structure(spec, ranks)
        return sum(p.numel() for p in module.parameters())


def register(cls: type[Decomposer]) -> type[Decomposer]:
    """Class decorator: make ``cls`` the decomposer for (kind, cls.method), for each of its ``kinds``.

    Raises `RegistrationError` if one of those (kind, method) pairs already has a decomposer.
    """
    kinds = cls.kinds or (cls.kind,)
    for kind in kinds:
        taken = _REGISTRY.get((kind, cls.method))
        if taken is not None:
            raise RegistrationError(
                f"a decomposer for ({kind!r}, {cls.method!r}) is already registered ({taken.__module__}.{taken.__qualname__}); "
                f"give {cls.__qualname__} another method name"
            )
    for kind in kinds:
        _REGISTRY[(kind, cls.method)] = cls
    return cls


def methods_for(kind: str) -> list[str]:
    return sorted(method for k, method in _REGISTRY if k == kind)


def all_methods() -> list[str]:
    return sorted({method for _, method in _REGISTRY})


def get_decomposer(kind: str, method: str, **options: Any) -> Decomposer:
    cls = _REGISTRY.get((kind, method))
    if cls is None:
        if method in all_methods():
            raise UnsupportedLayerError(f"method {method!r} does not apply to {kind} layers; use one of {methods_for(kind)}")
        raise UnknownMethodError(f"unknown method {method!r}; known methods: {all_methods()}")
    unknown = set(options) - set(cls.options)
    if unknown:
        raise InvalidInputError(
            f"method {method!r} takes no option(s) {sorted(unknown)}; its options are {list(cls.options) or 'none'}"
        )
    return cls(**options)


def final_layer(module: nn.Module) -> nn.Module:
    """The last layer of a decomposed module: the one that carries the bias."""
    return module[-1] if isinstance(module, nn.Sequential) else module


def inherit_trainable(module: nn.Module, layer: nn.Module) -> nn.Module:
    """``module`` (the decomposition of ``layer``) with its factors trainable as the layer's weight is and its bias as
    the layer's bias is: a frozen layer's factors stay frozen. Returns ``module``."""
    module.requires_grad_(bool(layer.weight.requires_grad))
    bias, last = getattr(layer, "bias", None), final_layer(module)
    if isinstance(bias, torch.Tensor) and isinstance(getattr(last, "bias", None), torch.Tensor):
        last.bias.requires_grad_(bool(bias.requires_grad))
    return module


# ---- helpers shared by the conv decomposers ---------------------------------------------


def leading_pad(spec: ConvSpec) -> tuple[list[nn.Module], tuple[int, ...]]:
    """(pad layers to put first, padding the spatial conv(s) apply themselves, one per dim).

    Symmetric zero padding goes inside the convs (fastest, and what ONNX runtimes fuse);
    anything else (asymmetric 'same', reflect, replicate, circular) becomes one pad layer.
    A transposed conv's padding (a crop of its output) always stays inside it.
    """
    inside = spec.padding_in_conv
    if inside is not None:
        return [], inside
    return [pad_module(spec.pads, spec.padding_mode)], (0,) * spec.ndim


def conv(in_ch: int, out_ch: int, kernel=(1, 1), stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1, bias=False):
    return nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=padding, dilation=dilation, groups=groups, bias=bias)


_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
_CONV_TRANSPOSE = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}


def spatial_conv(
    spec: ConvSpec, in_ch: int, out_ch: int, padding: Sequence[int], axes: Sequence[int] | None = None, groups: int = 1, bias: bool = False
) -> nn.Module:
    """The spec's own conv (transposed if the spec is) over the spatial ``axes`` (default: all), kernel 1 elsewhere.

    Stride, ``padding`` (from `leading_pad`), dilation and output padding are kept on ``axes``;
    a transposed conv of kernel 1, stride 1 and no padding is the identity on the other axes,
    so a kernel split by axis stays exact for transposed convs too.
    """
    axes = set(range(spec.ndim) if axes is None else axes)

    def on(values, off):
        return tuple(v if i in axes else off for i, v in enumerate(values))

    common = dict(stride=on(spec.stride, 1), padding=on(padding, 0), dilation=on(spec.dilation, 1), groups=groups, bias=bias)
    kernel = on(spec.kernel_size, 1)
    if spec.transposed:
        return _CONV_TRANSPOSE[spec.ndim](in_ch, out_ch, kernel, output_padding=on(spec.output_padding, 0), **common)
    return _CONV[spec.ndim](in_ch, out_ch, kernel, **common)


def pointwise(spec: ConvSpec, in_ch: int, out_ch: int, groups: int = 1, bias: bool = False) -> nn.Module:
    """A 1x1 (1x1x1, ...) conv with the spec's number of spatial dims: a channel mixing, transposed or not."""
    return _CONV[spec.ndim](in_ch, out_ch, 1, groups=groups, bias=bias)


def canonical_kernel(spec: ConvSpec, weight: torch.Tensor) -> torch.Tensor:
    """The kernel as (T, S/groups, *k), whatever the layer's layout.

    A transposed conv stores (S, T/groups, *k); its group j maps inputs j*S/g.. to outputs
    j*T/g.. with the kernel weight[j*S/g + s, t], which is what the canonical form holds at
    [j*T/g + t, s]. Every factorisation works on the canonical kernel.
    """
    if not spec.transposed:
        return weight
    g, k = spec.groups, weight.shape[2:]
    return weight.reshape(g, spec.in_per_group, spec.out_per_group, *k).transpose(1, 2).reshape(spec.out_channels, spec.in_per_group, *k)


def layer_kernel(spec: ConvSpec, canonical: torch.Tensor) -> torch.Tensor:
    """The inverse of `canonical_kernel`: a canonical (T, S/groups, *k) kernel in the layer's own layout."""
    if not spec.transposed:
        return canonical
    g, k = spec.groups, canonical.shape[2:]
    return canonical.reshape(g, spec.out_per_group, spec.in_per_group, *k).transpose(1, 2).reshape(spec.in_channels, spec.out_per_group, *k)


def new_kernel(layer: nn.Module) -> torch.Tensor:
    """A zero canonical kernel (out, in/groups, *k) for ``layer`` (a conv made by `spatial_conv` or `pointwise`)."""
    shape = (layer.out_channels, layer.in_channels // layer.groups, *layer.kernel_size)
    return torch.zeros(shape, dtype=layer.weight.dtype)


def set_kernel(layer: nn.Module, canonical: torch.Tensor) -> None:
    """Copy a canonical (out, in/groups, *k) kernel into ``layer``'s weight, in its own layout."""
    if layer.transposed:
        g, k = layer.groups, canonical.shape[2:]
        out_g, in_g = layer.out_channels // g, layer.in_channels // g
        canonical = canonical.reshape(g, out_g, in_g, *k).transpose(1, 2).reshape(layer.weight.shape)
    with torch.no_grad():
        layer.weight.copy_(canonical)


def pointwise_kernel(matrix: torch.Tensor, ndim: int) -> torch.Tensor:
    """A (out, in) matrix as the kernel (out, in, 1, ..., 1) of a pointwise conv with ``ndim`` spatial dims."""
    return matrix.reshape(*matrix.shape, *([1] * ndim))


class Blocks(list):
    """Disjoint blocks of one weight (groups or tiles), with their Frobenius norms computed once."""

    @cached_property
    def norms(self) -> list[float]:
        return [float(b.norm()) for b in self]


def group_slices(spec: ConvSpec, weight: torch.Tensor) -> Blocks:
    """The canonical kernel of each group, (T/g, S/g, *k) (see `canonical_kernel`)."""
    return Blocks(canonical_kernel(spec, weight.detach()).split(spec.out_per_group, dim=0))


CONV_KINDS = ("conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d")


def refuse_groups(spec: ConvSpec, method: str) -> None:
    if spec.groups != 1:
        raise UnsupportedLayerError(
            f"{method}: grouped convolutions (groups={spec.groups}) are not supported; use svd, "
            f"{'' if spec.ndim == 1 else 'spatial_svd, '}tucker2 or cp"
        )


def dense_conv_grams(spec: Spec, grams: Sequence[Any]) -> bool:
    """Whether a conv's input Gram matrices are dense tensors of its im2col patches (not sketches; not transposed)."""
    return isinstance(spec, ConvSpec) and not spec.transposed and all(isinstance(g, torch.Tensor) for g in grams)


def combined_error(errors: Sequence[float], norms: Sequence[float]) -> float:
    """Relative error of a weight made of disjoint blocks, from each block's relative error and norm."""
    total = sum(n * n for n in norms)
    if total <= 0.0:
        return 0.0
    return math.sqrt(sum((e * n) ** 2 for e, n in zip(errors, norms)) / total)
