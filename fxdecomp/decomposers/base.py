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
    kind: ClassVar[str]  # "conv2d" or "linear"
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

    @abstractmethod
    def error(self, spec: Spec, state: Any, ranks: Ranks) -> float:
        """Relative Frobenius error of the layer's weight at ``ranks``."""

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
        module = self.structure(spec, ranks)
        self.load(module, spec, state, ranks)
        last = final_layer(module)
        if bias is not None:
            with torch.no_grad():
                last.bias.copy_(bias)
        return module.to(device=like.device, dtype=like.dtype)

    def params(self, spec: Spec, ranks: Ranks) -> int:
        with torch.device("meta"):
            module = self.structure(spec, ranks)
        return sum(p.numel() for p in module.parameters())


def register(cls: type[Decomposer]) -> type[Decomposer]:
    """Class decorator: make ``cls`` the decomposer for (cls.kind, cls.method).

    Raises `RegistrationError` if that (kind, method) already has a decomposer.
    """
    taken = _REGISTRY.get((cls.kind, cls.method))
    if taken is not None:
        raise RegistrationError(
            f"a decomposer for ({cls.kind!r}, {cls.method!r}) is already registered ({taken.__module__}.{taken.__qualname__}); "
            f"give {cls.__qualname__} another method name"
        )
    _REGISTRY[(cls.kind, cls.method)] = cls
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


# ---- helpers shared by the conv decomposers ---------------------------------------------


def leading_pad(spec: ConvSpec) -> tuple[list[nn.Module], tuple[int, int]]:
    """(pad layers to put first, padding the spatial conv(s) apply themselves as (ph, pw)).

    Symmetric zero padding goes inside the convs (fastest, and what ONNX runtimes fuse);
    anything else (asymmetric 'same', reflect, replicate, circular) becomes one pad layer.
    """
    inside = spec.padding_in_conv
    if inside is not None:
        return [], inside
    return [pad_module(spec.pads, spec.padding_mode)], (0, 0)


def conv(in_ch: int, out_ch: int, kernel=(1, 1), stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1, bias=False):
    return nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=padding, dilation=dilation, groups=groups, bias=bias)


class Blocks(list):
    """Disjoint blocks of one weight (groups or tiles), with their Frobenius norms computed once."""

    @cached_property
    def norms(self) -> list[float]:
        return [float(b.norm()) for b in self]


def group_slices(spec: ConvSpec, weight: torch.Tensor) -> Blocks:
    """The kernel of each group, (T/g, S/g, kh, kw)."""
    return Blocks(weight.detach().split(spec.out_per_group, dim=0))


def refuse_groups(spec: ConvSpec, method: str) -> None:
    if spec.groups != 1:
        raise UnsupportedLayerError(
            f"{method}: grouped convolutions (groups={spec.groups}) are not supported; use svd, spatial_svd, tucker2 or cp"
        )


def combined_error(errors: Sequence[float], norms: Sequence[float]) -> float:
    """Relative error of a weight made of disjoint blocks, from each block's relative error and norm."""
    total = sum(n * n for n in norms)
    if total <= 0.0:
        return 0.0
    return math.sqrt(sum((e * n) ** 2 for e, n in zip(errors, norms)) / total)
