"""The one onnxruntime timing loop of fxdecomp: sessions, providers, warm-up, repeats, interleaving.

This module needs only onnxruntime and numpy (no torch, no other fxdecomp module),
so that `device_bench.py` can import it on a device that cannot run torch: the
timings written into a latency table are made by exactly this code.

Example::

    from fxdecomp.onnxrt.timing import Provider, make_session, time_calls, summarize
    provider = Provider.resolve("CPUExecutionProvider")
    session = make_session("model.onnx", threads=1, provider=provider)
    feed = random_feed(session)
    (times,) = time_calls([lambda: session.run(None, feed)], warmup=10, runs=50)
    summarize(times)  # {"median_ms": ..., "p10_ms": ..., "p90_ms": ..., "min_ms": ..., "runs": 50}

Sessions: sequential execution, one inter-op thread, ``threads`` intra-op threads
that spin within a run and stop after it (see `session_options`), full graph
optimisation by default. Times are per ``session.run`` call, in milliseconds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

try:  # inside the package
    from ..errors import InvalidInputError
except ImportError:  # run standalone on a device (device_bench.py): no fxdecomp

    class InvalidInputError(ValueError):  # type: ignore[no-redef]
        """An argument is malformed (standalone stand-in for fxdecomp.errors.InvalidInputError)."""


DEFAULT_PROVIDER = "CPUExecutionProvider"

LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}

# onnxruntime's type strings -> numpy dtype names
ORT_TYPES = {
    "tensor(float)": "float32",
    "tensor(double)": "float64",
    "tensor(float16)": "float16",
    "tensor(bfloat16)": "bfloat16",
    "tensor(int64)": "int64",
    "tensor(int32)": "int32",
    "tensor(int16)": "int16",
    "tensor(int8)": "int8",
    "tensor(uint8)": "uint8",
    "tensor(bool)": "bool",
}


@dataclass(frozen=True)
class Provider:
    """An onnxruntime execution provider and its options (strings, as onnxruntime takes them).

    ``Provider.resolve(name, options)`` checks that this onnxruntime build has it.
    """

    name: str = DEFAULT_PROVIDER
    options: tuple[tuple[str, str], ...] = ()

    @classmethod
    def resolve(cls, name: str | None = None, options: Mapping[str, Any] | None = None) -> Provider:
        """The provider ``name`` (None: the CPU provider) with ``options``; InvalidInputError if not available here."""
        name = DEFAULT_PROVIDER if name is None else name
        available = ort.get_available_providers()
        if not isinstance(name, str) or name not in available:
            raise InvalidInputError(
                f"onnxruntime execution provider {name!r} is not available in this onnxruntime "
                f"({ort.__version__}); available: {available}. Install the onnxruntime build that has it "
                f"(e.g. onnxruntime-gpu for CUDAExecutionProvider), or time on the device with a latency table"
            )
        if options is not None and not isinstance(options, Mapping):
            raise InvalidInputError(f"provider options must be a mapping of names to values, got {type(options).__name__}")
        return cls(name, tuple(sorted((str(k), str(v)) for k, v in (options or {}).items())))

    def as_dict(self) -> dict[str, Any]:
        """{"provider": name, "provider_options": {...}}: how keys and tables record it."""
        return {"provider": self.name, "provider_options": dict(self.options)}

    def ort_providers(self) -> list[Any]:
        """The ``providers`` argument of ``onnxruntime.InferenceSession`` (the CPU provider as fallback)."""
        first = (self.name, dict(self.options))
        return [first] if self.name == DEFAULT_PROVIDER else [first, DEFAULT_PROVIDER]


def session_options(threads: int, optimization: str = "all") -> ort.SessionOptions:
    """Sequential execution on ``threads`` intra-op threads that spin within a run, not after it.

    Spinning threads (onnxruntime's default) hold their cores after each run: with
    two sessions alive, as in an interleaved comparison, the idle one's threads
    take the cores the running one needs. `tools/study_spinning.py` (ResNet-50,
    2 threads on 2 cores, interleaved): spinning 40-41 ms, never spinning (a
    wake-up per op) 20.1 ms, spinning within a run and stopping after it 19.3-19.6 ms.
    """
    check_threads(threads)
    if optimization not in LEVELS:
        raise InvalidInputError(f"optimization must be one of {sorted(LEVELS)}, got {optimization!r}")
    options = ort.SessionOptions()
    options.graph_optimization_level = LEVELS[optimization]
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3  # errors only
    options.add_session_config_entry("session.force_spinning_stop", "1")
    return options


def check_threads(threads: Any) -> int:
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
        raise InvalidInputError(f"threads must be a positive int, got {threads!r}")
    return threads


def make_session(
    model: str | os.PathLike | bytes,
    *,
    threads: int = 1,
    optimization: str = "all",
    provider: Provider | None = None,
) -> ort.InferenceSession:
    """An InferenceSession of ``model`` (a path or serialized bytes) on ``provider``, set up for steady timings.

    Raises InvalidInputError if onnxruntime cannot load the model, or if the session
    did not get ``provider`` (onnxruntime falls back to the CPU when a provider fails to start).
    """
    provider = provider or Provider()
    options = session_options(threads, optimization)
    source = model if isinstance(model, bytes) else os.fspath(model)
    try:
        session = ort.InferenceSession(source, options, providers=provider.ort_providers())
    except Exception as exc:  # onnxruntime raises its own Fail / InvalidProtobuf / ... types
        what = "the model" if isinstance(model, bytes) else repr(os.fspath(model))
        raise InvalidInputError(f"onnxruntime cannot load {what} on {provider.name}: {exc}") from exc
    if session.get_providers()[0] != provider.name:
        raise InvalidInputError(
            f"onnxruntime did not start {provider.name} (options {dict(provider.options)}); the session runs on "
            f"{session.get_providers()}. Check the provider's options and drivers"
        )
    return session


def random_feed(session: ort.InferenceSession, seed: int = 0) -> dict[str, np.ndarray]:
    """Seeded random inputs for a session whose inputs have static shapes (latency does not depend on values)."""
    rng = np.random.default_rng(seed)
    feed = {}
    for arg in session.get_inputs():
        shape = tuple(d if isinstance(d, int) else 1 for d in arg.shape)  # a symbolic dim (the batch) -> 1
        dtype = ORT_TYPES.get(arg.type, "float32")
        feed[arg.name] = rng.standard_normal(shape).astype(dtype) if dtype.startswith("float") else np.zeros(shape, dtype)
    return feed


def time_calls(
    calls: Sequence[Callable[[], object]],
    *,
    warmup: int,
    runs: int,
    min_seconds: float = 0.0,
    max_runs: int | None = None,
) -> list[list[float]]:
    """Time each call ``runs`` times (more until ``min_seconds`` of timed rounds, at most ``max_runs``), in ms.

    ``warmup`` untimed rounds first. With several calls, each round runs all of them,
    in reverse order every other round (AB BA AB ...), so machine noise and warm
    caches hit all alike. Returns one list of times per call.
    """
    if not calls:
        raise InvalidInputError("nothing to time")
    for name, value, low in (("warmup", warmup, 0), ("runs", runs, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise InvalidInputError(f"{name} must be an int >= {low}, got {value!r}")
    if not min_seconds >= 0.0:
        raise InvalidInputError(f"min_seconds must be >= 0, got {min_seconds!r}")
    for _ in range(warmup):
        for call in calls:
            call()
    times: list[list[float]] = [[] for _ in calls]
    order = list(range(len(calls)))
    start = time.perf_counter()
    rounds = 0
    while rounds < runs or (time.perf_counter() - start < min_seconds and (max_runs is None or rounds < max_runs)):
        # Alternate who goes first: a fixed order would favour whichever model finds warmer caches.
        for k in order if rounds % 2 == 0 else order[::-1]:
            t0 = time.perf_counter()
            calls[k]()
            times[k].append((time.perf_counter() - t0) * 1e3)
        rounds += 1
    return times


def summarize(times_ms: Sequence[float]) -> dict[str, Any]:
    """median_ms, p10_ms, p90_ms, mean_ms, min_ms and runs of a list of times (ms)."""
    t = np.asarray(times_ms, dtype=np.float64)
    p10, median, p90 = (float(v) for v in np.percentile(t, [10, 50, 90]))
    return {"median_ms": median, "p10_ms": p10, "p90_ms": p90, "mean_ms": float(t.mean()), "min_ms": float(t.min()), "runs": len(t)}


@dataclass(frozen=True)
class Protocol:
    """How one layer or structure is timed alone: the loop's settings (LayerLatency's, and device_bench's)."""

    warmup: int = 1
    runs: int = 5
    min_seconds: float = 0.05
    max_runs: int = 10_000

    def time_model(self, model: str | os.PathLike | bytes, threads: int, provider: Provider | None = None) -> dict[str, Any]:
        """Statistics (`summarize`) of one model timed alone; its first run is untimed, then ``warmup`` more."""
        session = make_session(model, threads=threads, provider=provider)
        feed = random_feed(session)
        (times,) = time_calls(
            [lambda: session.run(None, feed)], warmup=self.warmup + 1, runs=self.runs, min_seconds=self.min_seconds, max_runs=self.max_runs
        )
        return summarize(times)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@functools.lru_cache(maxsize=1)
def cpu_model() -> str:
    """The CPU's 'model name' from /proc/cpuinfo (platform.processor() elsewhere)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown"


def device_facts() -> dict[str, str]:
    """Where timings were made: platform, machine, processor (the CPU model) and onnxruntime version."""
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": cpu_model(),
        "onnxruntime": ort.__version__,
    }
