"""Measured onnxruntime latency of layers, decomposed structures and whole models, cached on disk.

A latency budget plans on what the target CPU does, not on FLOPs: onnxruntime's
blocked (NCHWc) convolutions pad channel counts up to their block (16 floats with
AVX-512), depthwise convs run far below dense throughput, and a batch-1 Linear is
bound by its weight's memory traffic. `LayerLatency` times one
layer, or one method's structure at given ranks, alone at the layer's real input
shape, with random weights, built straight into ONNX by `fxdecomp.onnx_layers`
(milliseconds instead of an exporter run). Results are cached in memory and in a
JSON file (``$FXDECOMP_CACHE_DIR/latency.json``, default ``~/.cache/fxdecomp``),
keyed by spec, input shape, method, ranks, options, threads, onnxruntime version
and CPU model.

Example::

    from fxdecomp.latency import LayerLatency, preferred_rank_multiple
    from fxdecomp.layer_spec import layer_spec
    timer = LayerLatency(threads=1)
    spec = layer_spec(nn.Conv2d(128, 128, 3, padding=1))
    before = timer.layer_ms(spec, (1, 128, 56, 56))
    after = timer.layer_ms(spec, (1, 128, 56, 56), "tucker2", (32, 32))
    preferred_rank_multiple()  # 16 on an AVX-512 CPU, 8 on AVX2

Timings are medians of ``runs`` calls (more for fast layers, until ``min_seconds``),
with one inter-op thread and ``threads`` intra-op threads, full graph optimisation.
A layer timed alone pays its own layout reorders and call overhead; they cancel in
the difference between a layer and its replacement, which is what a planner should
use (see `LayerLatency.layer_ms`). Measured: VGG-16's 16 layers timed alone sum to
140 ms, the whole model runs in 139 ms (one thread).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import platform
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from .benchmark import benchmark_onnx, compare_latency, session_options
from .decomposers import get_decomposer
from .errors import InvalidInputError, UnsupportedLayerError
from .decomposers.base import leading_pad, spatial_conv
from .layer_spec import ConvSpec, LinearSpec
from .onnx_layers import module_to_onnx

__all__ = ["LayerLatency", "cpu_model", "default_cache_dir", "model_ms", "original_module", "preferred_rank_multiple"]

Spec = ConvSpec | LinearSpec
STATISTICS = ("median", "p10", "min")
PROTOCOL = 1  # bump when the way layers are built or timed changes: old cache entries then stop matching


def default_cache_dir() -> Path:
    """``$FXDECOMP_CACHE_DIR``, else ``~/.cache/fxdecomp``."""
    env = os.environ.get("FXDECOMP_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "fxdecomp"


@functools.lru_cache(maxsize=1)
def cpu_model() -> str:
    """The CPU's 'model name' from /proc/cpuinfo (platform.processor() elsewhere)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown"


def _cpu_flags() -> set[str]:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    return set()


def preferred_rank_multiple(threads: int = 1) -> int:
    """The rank multiple to round to by default on this CPU: 16 with AVX-512, else 8.

    onnxruntime's blocked (NCHWc) convolution works on channel blocks of 16 floats
    with AVX-512 and 8 with AVX2, and 1.32 pads other channel counts up to the block.
    tools/study_rank_multiples.py on an AVX-512 EPYC: a 3x3 conv 128 -> c costs the
    same for every c in 113..128 and 1.11x that for c in 129..144 (so 8 is not enough);
    a rank 1-3 above a multiple of 16 runs 1.29x slower (median) than the multiple, and
    rounding ResNet-50's plan to 16 instead of 1 lifts its efficiency from 0.73 to 0.98.
    ``threads`` is accepted for the planner's sake: the block does not depend on it.
    """
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
        raise InvalidInputError(f"threads must be a positive int, got {threads!r}")
    return 16 if "avx512f" in _cpu_flags() else 8


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


def _check_shape(spec: Spec, input_shape: Sequence[int]) -> tuple[int, ...]:
    shape = tuple(int(d) for d in input_shape)
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


class LayerLatency:
    """Measures and caches the onnxruntime latency of layers and their decomposed structures.

    ``threads``: intra-op threads; ``cache_dir``: where ``latency.json`` lives (None:
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
    ):
        if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
            raise InvalidInputError(f"threads must be a positive int, got {threads!r}")
        if not isinstance(runs, int) or runs < 1 or not isinstance(warmup, int) or warmup < 0:
            raise InvalidInputError(f"runs must be an int >= 1 and warmup an int >= 0, got runs={runs!r}, warmup={warmup!r}")
        if statistic not in STATISTICS:
            raise InvalidInputError(f"statistic must be one of {STATISTICS}, got {statistic!r}")
        self.threads, self.runs, self.warmup, self.min_seconds = threads, runs, warmup, float(min_seconds)
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

    def sites_ms(
        self,
        spec: Spec,
        input_shapes: Sequence[Sequence[int]],
        method: str | None = None,
        ranks: Sequence[int] = (),
        options: Mapping[str, Any] | None = None,
    ) -> float:
        """`layer_ms` summed over a layer's call sites (one input shape per call)."""
        return sum(self.layer_ms(spec, shape, method, ranks, options) for shape in input_shapes)

    def layer_stats(
        self,
        spec: Spec,
        input_shape: Sequence[int],
        method: str | None = None,
        ranks: Sequence[int] = (),
        options: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Like `layer_ms`, with the cached record: median_ms, p10_ms, p90_ms, min_ms, runs, builder."""
        shape = _check_shape(spec, input_shape)
        ranks = tuple(int(r) for r in ranks)
        options = dict(options or {})
        if method is None and (ranks or options):
            raise InvalidInputError("ranks and options describe a decomposition: give a method with them")
        key = self.key(spec, shape, method, ranks, options)
        record = self._lookup(key)
        if record is None:
            module = self._module(spec, method, ranks, options)
            record = self._measure(module, shape)
            self.measurements += 1
            self._store(key, record)
        return record

    def key(self, spec: Spec, input_shape: Sequence[int], method: str | None, ranks: Sequence[int], options: Mapping[str, Any]) -> str:
        """The cache key: everything that changes the timing, as canonical JSON."""
        return json.dumps(
            {
                "spec": {"kind": spec.kind, **_jsonable(dataclasses.asdict(spec))},
                "input": list(input_shape),
                "method": method or "original",
                "ranks": list(ranks),
                "options": _jsonable(options),
                "threads": self.threads,
                # Threads spin within a run only (benchmark.session_options): older times do not match.
                **({"spinning": "within-run"} if self.threads > 1 else {}),
                "onnxruntime": ort.__version__,
                "cpu": cpu_model(),
                "protocol": PROTOCOL,
            },
            sort_keys=True,
            separators=(",", ":"),
        )

    def module_stats(self, module: nn.Module, input_shape: Sequence[int]) -> dict[str, Any]:
        """Time any module (uncached) the way layers are timed; its weights are replaced by random ones."""
        return self._measure(module, tuple(int(d) for d in input_shape))

    # ---- building and timing --------------------------------------------------------------

    def _module(self, spec: Spec, method: str | None, ranks: tuple[int, ...], options: dict[str, Any]) -> nn.Module:
        if method is None:
            with torch.device("meta"):
                return original_module(spec)
        decomposer = get_decomposer(spec.kind, method, **options)
        decomposer.check(spec)
        maxima = decomposer.max_ranks(spec)
        if len(ranks) != len(maxima) or any(not 1 <= r <= m for r, m in zip(ranks, maxima)):
            raise InvalidInputError(f"{method}: ranks {ranks} do not fit this layer (one per bond, 1 <= r <= max {maxima})")
        with torch.device("meta"):
            return decomposer.structure(spec, ranks)

    def _measure(self, module: nn.Module, shape: tuple[int, ...]) -> dict[str, Any]:
        try:
            payload, builder = module_to_onnx(module, shape, weights="random").SerializeToString(), "direct"
        except UnsupportedLayerError:
            payload, builder = _exported_bytes(module, shape), "export"
        session = ort.InferenceSession(payload, session_options(self.threads), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        feed = {name: np.random.default_rng(0).standard_normal(shape, dtype=np.float32)}
        for _ in range(self.warmup + 1):
            session.run(None, feed)
        times: list[float] = []
        start = time.perf_counter()
        while len(times) < self.runs or (time.perf_counter() - start < self.min_seconds and len(times) < 10_000):
            t0 = time.perf_counter()
            session.run(None, feed)
            times.append((time.perf_counter() - t0) * 1e3)
        p10, median, p90 = (float(v) for v in np.percentile(times, [10, 50, 90]))
        record = {"median_ms": median, "p10_ms": p10, "p90_ms": p90, "min_ms": float(min(times))}
        return {**record, "runs": len(times), "builder": builder}

    # ---- the cache ------------------------------------------------------------------------

    def _lookup(self, key: str) -> dict[str, Any] | None:
        if key in self._memory:
            return self._memory[key]
        if self.persist:
            self._reload()
        return self._memory.get(key)

    def _reload(self) -> None:
        """Read the file again if another process (or instance) replaced it since we last saw it."""
        signature = _signature(self.path)
        if signature is None or signature == self._seen:
            return
        self._disk = _read_json(self.path)
        for key, record in self._disk.items():
            self._memory.setdefault(key, record)
        self._seen = signature

    def _store(self, key: str, record: dict[str, Any]) -> None:
        """Add one record and rewrite the file atomically, under a lock, merging what others wrote."""
        self._memory[key] = record
        if not self.persist:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with _locked(self.path.with_name(self.path.name + ".lock")):
            self._reload()
            self._disk[key] = record
            scratch = tempfile.NamedTemporaryFile("w", dir=self.path.parent, prefix=".latency.", suffix=".json", delete=False)
            try:
                with scratch:
                    json.dump(self._disk, scratch, indent=0, sort_keys=True)
                os.replace(scratch.name, self.path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(scratch.name)
                raise
            self._seen = _signature(self.path)


def _signature(path: Path) -> tuple[int, int, int] | None:
    """(inode, mtime in ns, size): every atomic replace makes a new inode, so a rewrite is never missed."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return (stat.st_ino, stat.st_mtime_ns, stat.st_size)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}  # no cache yet, or an unreadable one: it is rebuilt
    return data if isinstance(data, dict) else {}


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # not POSIX: the atomic replace alone
        yield
        return
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _exported_bytes(module: nn.Module, shape: tuple[int, ...]) -> bytes:
    """The slow path for layers the direct builder does not know: torch.onnx's exporter."""
    from .export import export_onnx

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


def model_ms(
    module: nn.Module,
    example_inputs: tuple | torch.Tensor,
    threads: int = 1,
    *,
    runs: int = 20,
    warmup: int = 5,
    statistic: str = "median",
) -> float:
    """onnxruntime latency (ms) of a whole model: exported (static batch, no parity check), then timed.

    ``statistic`` ("median", "p10" or "min") should match the `LayerLatency` whose
    layer times are set against this total.
    """
    if statistic not in STATISTICS:
        raise InvalidInputError(f"statistic must be one of {STATISTICS}, got {statistic!r}")
    from .export import export_onnx

    args = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    with tempfile.TemporaryDirectory(prefix="fxdecomp-model-") as scratch:
        path = Path(scratch) / "model.onnx"
        export_onnx(module, args, path, check=False, dynamic_batch=False)
        stats = benchmark_onnx(path, args, threads=threads, runs=runs, warmup=warmup)
    return float(getattr(stats, f"{statistic}_ms"))


def compare_models_ms(
    module_a: nn.Module, module_b: nn.Module, example_inputs: tuple | torch.Tensor, threads: int = 1, *, rounds: int = 20
) -> tuple[float, float]:
    """Median onnxruntime latencies (ms) of two whole models, timed interleaved so machine drift hits both alike."""
    from .export import export_onnx

    args = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    with tempfile.TemporaryDirectory(prefix="fxdecomp-models-") as scratch:
        paths = [Path(scratch) / f"{name}.onnx" for name in ("a", "b")]
        for module, path in zip((module_a, module_b), paths):
            export_onnx(module, args, path, check=False, dynamic_batch=False)
        comparison = compare_latency(paths[0], paths[1], args, threads=threads, rounds=rounds, warmup=3)
    return comparison.a.median_ms, comparison.b.median_ms
