"""A static latency model of onnxruntime's CPU conv and matmul kernels: plans that follow latency without timing every option.

`StaticLatency` predicts the milliseconds of a layer, or of a decomposed
structure at given ranks, from its shape alone, so a FLOP plan can be made to
keep its savings in latency (`fxdecomp.planning.latency.follow_latency`) at the
planning cost of arithmetic. The model, per conv or Linear node of the structure:

- a conv costs ``(MACs + K0 * outputs) / R`` milliseconds, its channel counts per
  group padded up to the SIMD block (onnxruntime's blocked NCHWc kernels work on
  16 floats with AVX-512, 8 with AVX2, and pad other counts): ``R`` is the dense
  multiply-add rate, ``K0`` a fixed cost per output element in multiply-adds, which
  makes thin convs (1x1, kh x 1, few input channels per output) and depthwise ones
  slower per FLOP than a dense 3x3 conv of many channels;
- a Linear costs ``max(MACs / R, weight bytes / B)``: at small batch a Linear is
  bound by reading its weight (VGG-16's classifier: under 1 % of the FLOPs, a
  large share of the latency), ``B`` the memory bandwidth;
- anything else (a pad, a shuffle) costs nothing; a structure it does not know
  (tensor-train, tiled layers) costs its MACs at the rate ``R`` plus its weight traffic.

``R``, ``K0`` and ``B`` are calibrated once per CPU and thread count from three
probe layers (a 3x3 and a 1x1 conv, one large Linear; about a second), timed
through `LayerLatency` and so cached on disk with its other timings; each probe
runs a few milliseconds, and its fastest run is kept, which a machine shared with
other jobs disturbs least. Layers are not timed alone: the reorders and call
overheads a layer pays alone are not in the model, so what it predicts is the
layer's share of a whole model's latency.

Measured: `tools/bench_latency.py` with the default recipe (which plans with this
model) and the ``hardware`` recipe (which times every option); see tools/README.md.

Example::

    from fxdecomp.onnxrt.static_model import StaticLatency
    model = StaticLatency(threads=1)            # calibrates (cached) on first use
    spec = layer_spec(nn.Conv2d(128, 128, 3, padding=1))
    model.layer_ms(spec, (1, 128, 56, 56)), model.layer_ms(spec, (1, 128, 56, 56), "tucker2", (32, 32))
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..cost import module_macs
from ..errors import InvalidInputError
from ..layer_spec import CONV_TYPES, PAD_TYPES, ConvSpec, LinearSpec, layer_spec
from .hardware import preferred_rank_multiple
from .layer_cache import LayerLatency, LayerTimer, check_shape, layer_module
from .timing import check_threads

__all__ = ["Node", "Rates", "StaticLatency", "calibrate", "fit_rates", "nodes", "probes"]

BYTES_PER_FLOAT = 4
# Channel counts below this are not padded to the block (onnxruntime runs a conv with few input
# channels, an image's 3, on its own NCHW-input kernel).
MIN_BLOCKED_CHANNELS = 8


@dataclass(frozen=True)
class Rates:
    """Calibrated constants: ``macs_per_ms`` (R), ``output_macs`` (K0: fixed cost per output element, in
    multiply-adds), ``bytes_per_ms`` (B: weight streaming bandwidth), ``block`` (the channel block)."""

    macs_per_ms: float
    output_macs: float
    bytes_per_ms: float
    block: int

    def __post_init__(self):
        if not (self.macs_per_ms > 0 and self.output_macs >= 0 and self.bytes_per_ms > 0 and self.block >= 1):
            raise InvalidInputError(f"rates must be positive (output_macs >= 0, block >= 1), got {self}")


@dataclass(frozen=True)
class Node:
    """One conv or Linear of a structure: multiply-adds, output elements, weight elements, and whether it is a conv."""

    macs: int
    outputs: int
    weights: int
    conv: bool


def _padded(channels: int, block: int) -> int:
    return channels if channels < MIN_BLOCKED_CHANNELS else math.ceil(channels / block) * block


def nodes(module: nn.Module, input_shape: Sequence[int], block: int) -> Iterator[Node]:
    """The conv and Linear nodes of a layer or a decomposed structure (a Sequential of standard layers) on ``input_shape``.

    Conv channel counts per group are padded up to ``block`` (see `MIN_BLOCKED_CHANNELS`).
    Raises InvalidInputError for a module it cannot walk (the caller falls back to MACs).
    """
    shape = tuple(int(d) for d in input_shape)
    leaves = list(module) if isinstance(module, nn.Sequential) else [module]
    for leaf in leaves:
        if isinstance(leaf, nn.Sequential):
            for node in nodes(leaf, shape, block):
                yield node
            shape = _out_shape(leaf, shape)
        elif isinstance(leaf, CONV_TYPES):
            spec = layer_spec(leaf)
            out = _out_shape(leaf, shape)
            positions = math.prod(out[: -spec.ndim - 1]) * math.prod(out[-spec.ndim :])
            if spec.transposed:
                positions = math.prod(shape[: -spec.ndim - 1]) * math.prod(shape[-spec.ndim :])
            s, t = _padded(spec.in_per_group, block), _padded(spec.out_per_group, block)
            groups = spec.groups
            if spec.in_per_group == 1 and spec.out_per_group == 1:  # depthwise: the groups form the channel block
                groups, s, t = _padded(spec.groups, block), 1, 1
            macs = positions * groups * s * t * spec.kernel_area
            yield Node(macs, positions * groups * t, spec.in_per_group * spec.out_channels * spec.kernel_area, True)
            shape = out
        elif isinstance(leaf, nn.Linear):
            tokens = math.prod(shape[:-1])
            yield Node(tokens * leaf.in_features * leaf.out_features, tokens * leaf.out_features, leaf.weight.numel(), False)
            shape = (*shape[:-1], leaf.out_features)
        elif isinstance(leaf, (*PAD_TYPES, nn.ChannelShuffle, nn.Identity)):
            shape = _out_shape(leaf, shape)
        else:
            raise InvalidInputError(f"the static latency model does not walk {type(leaf).__name__}")


def _out_shape(module: nn.Module, shape: tuple[int, ...]) -> tuple[int, ...]:
    with torch.device("meta"):
        return tuple(module.to("meta")(torch.empty(shape, device="meta")).shape)


def predict_ms(module: nn.Module, input_shape: Sequence[int], rates: Rates) -> float:
    """Predicted milliseconds of ``module`` (a layer or a decomposed structure) on ``input_shape`` (see the module doc)."""
    try:
        walked = list(nodes(module, input_shape, rates.block))
    except InvalidInputError:  # tensor-train or tiled layers: MACs at the dense rate, weights streamed once
        weights = sum(p.numel() for p in module.parameters())
        return module_macs(module, input_shape) / rates.macs_per_ms + weights * BYTES_PER_FLOAT / rates.bytes_per_ms
    total = 0.0
    for node in walked:
        if node.conv:
            total += (node.macs + rates.output_macs * node.outputs) / rates.macs_per_ms
        else:
            total += max(node.macs / rates.macs_per_ms, node.weights * BYTES_PER_FLOAT / rates.bytes_per_ms)
    return total


def probes() -> list[tuple[ConvSpec | LinearSpec, tuple[int, ...]]]:
    """(spec, input shape) of the three calibration layers: 3x3 conv 64->64 at 56x56, 1x1 conv 128->128 at 56x56,
    Linear 4096->2048 at batch 1 (32 MiB of weights: past the per-core caches, yet a few ms, so that the fastest
    of its runs is an undisturbed one on a shared machine)."""
    with torch.device("meta"):
        return [
            (layer_spec(nn.Conv2d(64, 64, 3, padding=1)), (1, 64, 56, 56)),
            (layer_spec(nn.Conv2d(128, 128, 1)), (1, 128, 56, 56)),
            (layer_spec(nn.Linear(4096, 2048)), (1, 4096)),
        ]


def fit_rates(times_ms: Sequence[float], block: int) -> Rates:
    """`Rates` from the probes' times (ms, in `probes` order): R and K0 solve the two convs' equations
    ``t = (MACs + K0 * outputs) / R`` (K0 clamped at 0), B is the Linear's weight bytes over its time."""
    (dense, dense_shape), (thin, thin_shape), (linear, linear_shape) = probes()
    if len(times_ms) != 3 or not all(math.isfinite(t) and t > 0 for t in times_ms):
        raise InvalidInputError(f"need three positive, finite probe times in ms, got {list(times_ms)}")
    rows = []
    for spec, shape in ((dense, dense_shape), (thin, thin_shape)):
        with torch.device("meta"):
            (node,) = nodes(layer_module(spec, None, (), {}), shape, block)
        rows.append((node.macs, node.outputs))
    (m1, o1), (m2, o2) = rows
    t1, t2, t3 = times_ms
    det = m1 * o2 - m2 * o1
    per_mac = (t1 * o2 - t2 * o1) / det  # 1 / R
    per_output = (m1 * t2 - m2 * t1) / det  # K0 / R
    if per_mac <= 0:  # disturbed timings: a pure rate from the dense probe
        per_mac, per_output = t1 / m1, 0.0
    per_output = max(per_output, 0.0)
    return Rates(1.0 / per_mac, per_output / per_mac, linear.in_features * linear.out_features * BYTES_PER_FLOAT / t3, block)


def calibrate(threads: int = 1, cache_dir: str | os.PathLike | None = None, block: int | None = None) -> Rates:
    """Time `probes` on onnxruntime's CPU provider at ``threads`` (cached on disk by `LayerLatency`) and fit `Rates`.

    ``block``: the channel block (default `preferred_rank_multiple`, from the CPU's flags).
    """
    check_threads(threads)
    timer = LayerLatency(threads=threads, cache_dir=cache_dir, runs=15, warmup=2, min_seconds=0.1, statistic="min")
    times = [timer.layer_ms(spec, shape) for spec, shape in probes()]
    return fit_rates(times, block or preferred_rank_multiple(threads))


class StaticLatency(LayerTimer):
    """Predicted onnxruntime CPU latency of layers and structures (`predict_ms`), as the planner asks a timer.

    ``rates``: given, or calibrated on first use (`calibrate`, at ``threads``, cached in ``cache_dir``).
    """

    def __init__(self, threads: int = 1, cache_dir: str | os.PathLike | None = None, rates: Rates | None = None):
        self.threads = check_threads(threads)
        self.cache_dir = cache_dir
        self._rates = rates
        self._memo: dict[tuple, float] = {}

    @property
    def rates(self) -> Rates:
        if self._rates is None:
            self._rates = calibrate(self.threads, self.cache_dir)
        return self._rates

    def layer_ms(
        self,
        spec: ConvSpec | LinearSpec,
        input_shape: Sequence[int],
        method: str | None = None,
        ranks: Sequence[int] = (),
        options: Mapping[str, Any] | None = None,
    ) -> float:
        """Predicted ms of the layer (``method=None``) or of ``method``'s structure at ``ranks`` on ``input_shape``."""
        shape = check_shape(spec, input_shape)
        key = (spec, shape, method, tuple(int(r) for r in ranks), tuple(sorted((options or {}).items())))
        if key not in self._memo:
            self._memo[key] = predict_ms(layer_module(spec, method, key[3], dict(options or {})), shape, self.rates)
        return self._memo[key]
