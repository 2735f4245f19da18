"""Measured onnxruntime latency of layers and decomposed structures, cached on disk (`LayerLatency`).

A latency budget plans on what the target does, not on FLOPs: onnxruntime's
blocked (NCHWc) convolutions pad channel counts up to their block (16 floats with
AVX-512), depthwise convs run far below dense throughput, and a batch-1 Linear is
bound by its weight's memory traffic. `LayerLatency` times one layer, or one
method's structure at given ranks, alone at the layer's real input shape, with
random weights, built straight into ONNX by `fxdecomp.onnxrt.layers` (milliseconds
instead of an exporter run), on an onnxruntime execution provider. Results are
cached in memory and in a JSON file (``$FXDECOMP_CACHE_DIR/latency.json``, default
``~/.cache/fxdecomp``), keyed by what is timed (`structure_key`: spec, input shape,
method, ranks, options) and how (threads, provider and its options, onnxruntime
version, CPU model).

Example::

    from fxdecomp.onnxrt import LayerLatency
    from fxdecomp.layer_spec import layer_spec
    timer = LayerLatency(threads=1, provider="CPUExecutionProvider")
    spec = layer_spec(nn.Conv2d(128, 128, 3, padding=1))
    before = timer.layer_ms(spec, (1, 128, 56, 56))
    after = timer.layer_ms(spec, (1, 128, 56, 56), "tucker2", (32, 32))

Timings come from `fxdecomp.onnxrt.timing.Protocol` (``runs`` calls after
``warmup`` ones, more for fast layers until ``min_seconds``), the loop the device
script uses too. A layer timed alone pays its own layout reorders and call
overhead; they cancel in the difference between a layer and its replacement,
which is what a planner should use (see `LayerLatency.layer_ms`). Measured:
VGG-16's 16 layers timed alone sum to 140 ms, the whole model runs in 139 ms (one thread).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import onnxruntime as ort
import torch
from torch import nn

from ..decomposers import get_decomposer
from ..errors import InvalidInputError, UnsupportedLayerError
from ..decomposers.base import leading_pad, spatial_conv
from ..layer_spec import ConvSpec, LinearSpec
from .files import atomic_write_text, locked, read_json_dict, signature
from .layers import module_to_onnx
from .timing import Protocol, Provider, check_threads, cpu_model
from ..user_warnings import warn

__all__ = ["LayerLatency", "build_onnx", "canonical", "default_cache_dir", "original_module", "structure_key"]

Spec = ConvSpec | LinearSpec
STATISTICS = ("median", "p10", "min")
PROTOCOL = 1  # bump when the way layers are built or timed changes: old cache entries then stop matching


def default_cache_dir() -> Path:
    """``$FXDECOMP_CACHE_DIR``, else ``~/.cache/fxdecomp`` (without a home directory, a folder in the temporary one)."""
    env = os.environ.get("FXDECOMP_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    try:
        return Path.home() / ".cache" / "fxdecomp"
    except RuntimeError:  # no home directory to be found: a per-user folder in the temporary directory
        return Path(tempfile.gettempdir()) / f"fxdecomp-cache-{os.getuid() if hasattr(os, 'getuid') else 'user'}"


def original_module(spec: Spec) -> nn.Module:
    """A standard torch layer equivalent to ``spec`` (default random init), padding included.

    nn.Linear, nn.Conv1d/2d/3d or nn.ConvTranspose1d/2d/3d (as `spatial_conv` builds it).
    """
    if isinstance(spec, LinearSpec):
        return nn.Linear(spec.in_features, spec.out_features, bias=spec.has_bias)
    pads, padding = leading_pad(spec)
    # Asymmetric or non-zero padding: a pad layer, then an unpadded conv (what torch and the exporter do).
    layer = spatial_conv(spec, spec.in_channels, spec.out_channels, padding, groups=spec.groups, bias=spec.has_bias)
    return nn.Sequential(*pads, layer) if pads else layer


def check_shape(spec: Spec, input_shape: Sequence[int]) -> tuple[int, ...]:
    """The input shape as the timers use it; a Linear on one vector (torch allows 1-d inputs) is one row."""
    shape = tuple(int(d) for d in input_shape)
    if isinstance(spec, LinearSpec) and len(shape) == 1:
        shape = (1, *shape)
    if any(d < 1 for d in shape):
        raise InvalidInputError(f"input_shape must hold positive sizes, got {shape}")
    if isinstance(spec, LinearSpec):
        if len(shape) < 2 or shape[-1] != spec.in_features:
            raise InvalidInputError(f"a Linear({spec.in_features} -> ...) needs an input shape (..., {spec.in_features}), got {shape}")
    elif len(shape) != spec.ndim + 2 or shape[1] != spec.in_channels:
        axes = ", ".join("DHW"[3 - spec.ndim :])
        raise InvalidInputError(f"a {spec.kind}({spec.in_channels} -> ...) needs an input shape (N, {spec.in_channels}, {axes}), got {shape}")
    return shape


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in sorted(value.items())}
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    return value


def canonical(record: Mapping[str, Any]) -> str:
    """A record as canonical JSON (sorted keys, no spaces): the string form of every key."""
    return json.dumps(_jsonable(record), sort_keys=True, separators=(",", ":"))


def structure_key(
    spec: Spec, input_shape: Sequence[int], method: str | None, ranks: Sequence[int], options: Mapping[str, Any] | None
) -> dict[str, Any]:
    """What is timed, independent of where: layer spec, input shape, method ("original"), ranks, options.

    The key of a latency table's entries, and the first part of the cache key.
    """
    return {
        "spec": {"kind": spec.kind, **_jsonable(dataclasses.asdict(spec))},
        "input": [int(d) for d in input_shape],
        "method": method or "original",
        "ranks": [int(r) for r in ranks],
        "options": _jsonable(dict(options or {})),
        "protocol": PROTOCOL,
    }


def layer_module(spec: Spec, method: str | None, ranks: Sequence[int], options: Mapping[str, Any]) -> nn.Module:
    """The layer (``method=None``) or ``method``'s structure at ``ranks``, on the meta device."""
    if method is None:
        with torch.device("meta"):
            return original_module(spec)
    decomposer = get_decomposer(spec.kind, method, **options)
    decomposer.check(spec)
    maxima = decomposer.max_ranks(spec)
    ranks = tuple(ranks)
    if len(ranks) != len(maxima) or any(not 1 <= r <= m for r, m in zip(ranks, maxima)):
        raise InvalidInputError(f"{method}: ranks {ranks} do not fit this layer (one per bond, 1 <= r <= max {maxima})")
    with torch.device("meta"):
        return decomposer.structure(spec, ranks)


def module_onnx(module: nn.Module, shape: Sequence[int]) -> tuple[bytes, str]:
    """(serialized ONNX, builder): the direct builder ("direct"), or torch.onnx's exporter ("export") for layers it does not know."""
    shape = tuple(int(d) for d in shape)
    try:
        return module_to_onnx(module, shape, weights="random").SerializeToString(), "direct"
    except UnsupportedLayerError:
        return _exported_bytes(module, shape), "export"


def build_onnx(
    spec: Spec, input_shape: Sequence[int], method: str | None = None, ranks: Sequence[int] = (), options: Mapping[str, Any] | None = None
) -> tuple[bytes, str]:
    """The ONNX model `LayerLatency` times for this layer or structure: (serialized bytes, builder)."""
    shape = check_shape(spec, input_shape)
    return module_onnx(layer_module(spec, method, tuple(int(r) for r in ranks), dict(options or {})), shape)


class LayerTimer:
    """What the planner asks of a source of layer latencies (`LayerLatency` times here, a `LatencyTable` looks up)."""

    def sites_ms(
        self,
        spec: Spec,
        input_shapes: Sequence[Sequence[int]],
        method: str | None = None,
        ranks: Sequence[int] = (),
        options: Mapping[str, Any] | None = None,
    ) -> float:
        """`layer_ms` summed over a layer's call sites (one input shape per call); a call on an empty tensor (a
        detector's head given no detections) does no work and costs nothing."""
        return sum(self.layer_ms(spec, shape, method, ranks, options) for shape in input_shapes if all(int(d) > 0 for d in shape))


class LayerLatency(LayerTimer):
    """Measures and caches the onnxruntime latency of layers and their decomposed structures.

    ``threads``: intra-op threads; ``provider`` / ``provider_options``: the onnxruntime
    execution provider and its options (an unavailable provider raises InvalidInputError
    listing the available ones); ``cache_dir``: where ``latency.json`` lives (None:
    `default_cache_dir`); ``persist=False`` keeps the cache in memory only. ``runs``
    timed calls after ``warmup`` ones, continued until ``min_seconds`` of timed calls
    (the defaults time a VGG-16 option in ~0.08 s, within 2 % of 10 runs over 0.2 s).
    ``statistic`` picks what `layer_ms` returns: the median (default), or the 10th
    percentile or minimum, steadier on a machine shared with other jobs; every record
    holds all three, so switching does not re-measure. ``measurements`` counts the
    layers actually timed (cache misses).
    """

    def __init__(
        self,
        threads: int = 1,
        cache_dir: str | os.PathLike | None = None,
        runs: int = 5,
        warmup: int = 1,
        min_seconds: float = 0.05,
        persist: bool = True,
        statistic: str = "median",
        provider: str | None = None,
        provider_options: Mapping[str, Any] | None = None,
    ):
        check_threads(threads)
        if not isinstance(runs, int) or runs < 1 or not isinstance(warmup, int) or warmup < 0:
            raise InvalidInputError(f"runs must be an int >= 1 and warmup an int >= 0, got runs={runs!r}, warmup={warmup!r}")
        if statistic not in STATISTICS:
            raise InvalidInputError(f"statistic must be one of {STATISTICS}, got {statistic!r}")
        self.threads, self.runs, self.warmup, self.min_seconds = threads, runs, warmup, float(min_seconds)
        self.protocol = Protocol(warmup=warmup, runs=runs, min_seconds=self.min_seconds)
        self.provider = Provider.resolve(provider, provider_options)
        self.statistic = statistic
        self.path = (Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()) / "latency.json"
        self.persist = persist
        self.measurements = 0
        self._memory: dict[str, dict[str, Any]] = {}  # every record seen or measured
        self._disk: dict[str, dict[str, Any]] = {}  # the file's content as last read or written
        self._seen: tuple[int, int, int] | None = None

    # ---- public -------------------------------------------------------------------------

    def layer_ms(
        self,
        spec: Spec,
        input_shape: Sequence[int],
        method: str | None = None,
        ranks: Sequence[int] = (),
        options: Mapping[str, Any] | None = None,
    ) -> float:
        """Latency in ms of the layer (``method=None``) or of ``method``'s structure at ``ranks``.

        The median of the timed calls, or the ``statistic`` the timer was made with.
        ``input_shape`` is the layer's real input shape (batch included). A layer called
        at several shapes is timed once per shape; sum them. For a planner, the cost of an
        option is ``layer_ms(..., method, ranks) - layer_ms(...)`` added to the measured
        whole-model latency: the reorder and call overheads of timing alone cancel.
        """
        return self.layer_stats(spec, input_shape, method, ranks, options)[f"{self.statistic}_ms"]

    def layer_stats(
        self,
        spec: Spec,
        input_shape: Sequence[int],
        method: str | None = None,
        ranks: Sequence[int] = (),
        options: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Like `layer_ms`, with the cached record: median_ms, p10_ms, p90_ms, min_ms, runs, builder."""
        shape = check_shape(spec, input_shape)
        ranks = tuple(int(r) for r in ranks)
        options = dict(options or {})
        if method is None and (ranks or options):
            raise InvalidInputError("ranks and options describe a decomposition: give a method with them")
        key = self.key(spec, shape, method, ranks, options)
        record = self._lookup(key)
        if record is None:
            record = self._measure(layer_module(spec, method, ranks, options), shape)
            self.measurements += 1
            self._store(key, record)
        return record

    def key(self, spec: Spec, input_shape: Sequence[int], method: str | None, ranks: Sequence[int], options: Mapping[str, Any]) -> str:
        """The cache key: what is timed (`structure_key`) and how (threads, provider, onnxruntime, CPU), canonical JSON."""
        return self.key_for(structure_key(spec, input_shape, method, ranks, options))

    def key_for(self, structure: Mapping[str, Any]) -> str:
        """The cache key of a `structure_key` record (e.g. a latency table entry's, parsed) on this timer's setup."""
        return canonical(
            {
                **structure,
                "threads": self.threads,
                # Threads spin within a run only (timing.session_options): older times do not match.
                **({"spinning": "within-run"} if self.threads > 1 else {}),
                **self.provider.as_dict(),
                "onnxruntime": ort.__version__,
                "cpu": cpu_model(),
            }
        )

    def module_stats(self, module: nn.Module, input_shape: Sequence[int]) -> dict[str, Any]:
        """Time any module (uncached) the way layers are timed; its weights are replaced by random ones."""
        return self._measure(module, tuple(int(d) for d in input_shape))

    # ---- timing -----------------------------------------------------------------------------

    def _measure(self, module: nn.Module, shape: tuple[int, ...]) -> dict[str, Any]:
        payload, builder = module_onnx(module, shape)
        stats = self.protocol.time_model(payload, self.threads, self.provider)
        return {key: stats[key] for key in ("median_ms", "p10_ms", "p90_ms", "min_ms", "runs")} | {"builder": builder}

    # ---- the cache ------------------------------------------------------------------------

    def _lookup(self, key: str) -> dict[str, Any] | None:
        if key in self._memory:
            return self._memory[key]
        if self.persist:
            self._reload()
        return self._memory.get(key)

    def _reload(self) -> None:
        """Read the file again if another process (or instance) replaced it since we last saw it."""
        seen = signature(self.path)
        if seen is None or seen == self._seen:
            return
        self._disk = read_json_dict(self.path)  # an unreadable cache is rebuilt
        for key, record in self._disk.items():
            self._memory.setdefault(key, record)
        self._seen = seen

    def _store(self, key: str, record: dict[str, Any]) -> None:
        """Add one record and rewrite the file atomically, under a lock, merging what others wrote."""
        self._memory[key] = record
        if not self.persist:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with locked(self.path.with_name(self.path.name + ".lock")):
                self._reload()
                self._disk[key] = record
                atomic_write_text(self.path, json.dumps(self._disk, indent=0, sort_keys=True))
                self._seen = signature(self.path)
        except OSError as exc:  # a read-only home or cache folder: time as before, remember in memory only
            self.persist = False
            warn(
                f"fxdecomp: cannot write the latency cache {self.path} ({exc}); timings are kept in memory for "
                "this process only. Set FXDECOMP_CACHE_DIR to a writable folder to keep them."
            )


def _exported_bytes(module: nn.Module, shape: tuple[int, ...]) -> bytes:
    """The slow path for layers the direct builder does not know: torch.onnx's exporter."""
    from ..export import export_onnx

    real = _materialise(module)
    with tempfile.TemporaryDirectory(prefix="fxdecomp-layer-") as scratch:
        path = Path(scratch) / "layer.onnx"
        export_onnx(real, (torch.randn(shape),), path, check=False, dynamic_batch=False)
        return path.read_bytes()


def _materialise(module: nn.Module) -> nn.Module:
    """A CPU copy of a (possibly meta) module with random weights."""
    if not any(p.is_meta for p in module.parameters()):
        return module
    real = module.to_empty(device="cpu")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in real.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) / math.sqrt(max(p.shape[-1], 1)))
    return real
