"""onnxruntime latency of an exported model on an execution provider: `benchmark_onnx`, `compare_latency`.

Example::

    from fxdecomp.onnxrt import benchmark_onnx, compare_latency
    stats = benchmark_onnx("model.onnx", (torch.randn(1, 3, 224, 224),), threads=1)
    stats.median_ms, stats.p90_ms
    both = compare_latency("original.onnx", "small.onnx", (torch.randn(1, 3, 224, 224),))
    both.ratio  # small's median latency as a fraction of original's
    benchmark_onnx("model.onnx", x, provider="CPUExecutionProvider", provider_options={})

Sessions use the given execution provider (default ``CPUExecutionProvider``; an
unavailable one is an InvalidInputError listing the available ones), sequential
execution, one inter-op thread and ``threads`` intra-op threads; full graph
optimisation by default (onnxruntime's fast blocked convolutions need it). Times
are per ``session.run`` call, in milliseconds, from the one timing loop
(`fxdecomp.onnxrt.timing.time_calls`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from ..errors import InvalidInputError
from .timing import DEFAULT_PROVIDER, LEVELS, ORT_TYPES, Provider, check_threads, make_session, session_options, time_calls

__all__ = [
    "LatencyComparison",
    "LatencyStats",
    "TensorInfo",
    "benchmark_onnx",
    "compare_latency",
    "io_info",
    "make_feed",
    "open_session",
    "session_options",
]

Inputs = torch.Tensor | np.ndarray | Sequence[torch.Tensor | np.ndarray]


@dataclass(frozen=True)
class TensorInfo:
    """One graph input or output: name, shape (a str for a symbolic dim such as the batch) and dtype."""

    name: str
    shape: tuple[int | str, ...]
    dtype: str

    def __str__(self) -> str:
        return f"{self.name}: {self.dtype}[{', '.join(map(str, self.shape))}]"


@dataclass(frozen=True)
class LatencyStats:
    """Latency of one model over ``runs`` timed calls, in milliseconds, on ``provider``."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    mean_ms: float
    min_ms: float
    runs: int
    threads: int
    provider: str = DEFAULT_PROVIDER

    @classmethod
    def from_times(cls, times_ms: Sequence[float], threads: int, provider: str = DEFAULT_PROVIDER) -> LatencyStats:
        t = np.asarray(times_ms, dtype=np.float64)
        p10, median, p90 = np.percentile(t, [10, 50, 90])
        return cls(float(median), float(p10), float(p90), float(t.mean()), float(t.min()), len(t), threads, provider)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class LatencyComparison:
    """Two models timed interleaved; ``ratio`` = b.median_ms / a.median_ms (below 1: b is faster)."""

    a: LatencyStats
    b: LatencyStats
    ratio: float

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def open_session(
    path: str | os.PathLike,
    *,
    threads: int = 1,
    optimization: str = "all",
    provider: str | None = None,
    provider_options: Mapping[str, Any] | None = None,
) -> ort.InferenceSession:
    """An InferenceSession set up for steady timings; InvalidInputError if the file is missing or unreadable,
    or the provider is not available (the message lists the available ones)."""
    check_threads(threads)
    if optimization not in LEVELS:
        raise InvalidInputError(f"optimization must be one of {sorted(LEVELS)}, got {optimization!r}")
    resolved = Provider.resolve(provider, provider_options)
    path = Path(path)
    if not path.is_file():
        raise InvalidInputError(f"no ONNX model at {str(path)!r}; export one with fxdecomp.export_onnx")
    return make_session(path, threads=threads, optimization=optimization, provider=resolved)


def io_info(args: Sequence[Any]) -> tuple[TensorInfo, ...]:
    """TensorInfo of each of a session's ``get_inputs()`` / ``get_outputs()``."""
    return tuple(
        TensorInfo(
            a.name,
            tuple(d if isinstance(d, int) else str(d) if d is not None else "?" for d in a.shape),
            ORT_TYPES.get(a.type, a.type),
        )
        for a in args
    )


def _as_arrays(inputs: Inputs) -> list[np.ndarray]:
    items = [inputs] if isinstance(inputs, (torch.Tensor, np.ndarray)) else inputs
    if not isinstance(items, (tuple, list)):
        raise InvalidInputError(f"example inputs must be a tensor or a tuple of tensors, got {type(inputs).__name__}")
    arrays = []
    for i, item in enumerate(items):
        if isinstance(item, torch.Tensor):
            arrays.append(item.detach().cpu().numpy())
        elif isinstance(item, np.ndarray):
            arrays.append(item)
        else:
            raise InvalidInputError(f"example input {i} is a {type(item).__name__}; give tensors or numpy arrays")
    return arrays


def make_feed(session: ort.InferenceSession, inputs: Inputs) -> dict[str, np.ndarray]:
    """Map ``inputs`` (in order) to the session's input names, checking count, rank, fixed dims and dtype."""
    arrays, expected = _as_arrays(inputs), io_info(session.get_inputs())
    wanted = ", ".join(map(str, expected)) or "none"
    if len(arrays) != len(expected):
        given = ", ".join(f"{a.dtype}{list(a.shape)}" for a in arrays) or "none"
        raise InvalidInputError(f"the model takes {len(expected)} input(s) ({wanted}); got {len(arrays)} ({given})")
    for array, info in zip(arrays, expected):
        fixed_ok = len(array.shape) == len(info.shape) and all(
            not isinstance(d, int) or d == n for d, n in zip(info.shape, array.shape)
        )
        if not fixed_ok or str(array.dtype) != info.dtype:
            raise InvalidInputError(
                f"input {info.name!r} must be {info}; got {array.dtype}{list(array.shape)} (model inputs: {wanted})"
            )
    return {info.name: np.ascontiguousarray(a) for info, a in zip(expected, arrays)}


def _first_run(session: ort.InferenceSession, feed: dict[str, np.ndarray]) -> None:
    # Symbolic dims are only checked when the graph runs: report a bad shape as bad input.
    try:
        session.run(None, feed)
    except Exception as exc:
        wanted = ", ".join(map(str, io_info(session.get_inputs())))
        raise InvalidInputError(f"the model rejected the inputs ({wanted}): {exc}") from exc


def _check_counts(**counts: int) -> None:
    for name, value in counts.items():
        low = 1 if name in ("runs", "rounds") else 0
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise InvalidInputError(f"{name} must be an int >= {low}, got {value!r}")


def benchmark_onnx(
    path: str | os.PathLike,
    example_inputs: Inputs,
    *,
    threads: int = 1,
    warmup: int = 10,
    runs: int = 50,
    min_seconds: float = 0.0,
    optimization: str = "all",
    provider: str | None = None,
    provider_options: Mapping[str, Any] | None = None,
) -> LatencyStats:
    """Time ``runs`` calls of the model at ``path`` (more if ``min_seconds`` of timed calls are not yet reached).

    ``optimization`` is onnxruntime's graph optimisation level: "all", "extended", "basic" or "disable".
    ``provider`` is an onnxruntime execution provider (default "CPUExecutionProvider") and
    ``provider_options`` its options; an unavailable provider raises InvalidInputError naming the available ones.
    """
    _check_counts(warmup=warmup, runs=runs)
    if not min_seconds >= 0.0:
        raise InvalidInputError(f"min_seconds must be >= 0, got {min_seconds!r}")
    session = open_session(path, threads=threads, optimization=optimization, provider=provider, provider_options=provider_options)
    feed = make_feed(session, example_inputs)
    _first_run(session, feed)
    (times,) = time_calls([lambda: session.run(None, feed)], warmup=warmup, runs=runs, min_seconds=min_seconds)
    return LatencyStats.from_times(times, threads, session.get_providers()[0])


def compare_latency(
    path_a: str | os.PathLike,
    path_b: str | os.PathLike,
    example_inputs: Inputs,
    *,
    threads: int = 1,
    rounds: int = 50,
    warmup: int = 10,
    optimization: str = "all",
    provider: str | None = None,
    provider_options: Mapping[str, Any] | None = None,
) -> LatencyComparison:
    """Time two models on the same inputs, interleaved (AB BA AB ...) so machine noise hits both alike."""
    _check_counts(rounds=rounds, warmup=warmup)
    sessions = [
        open_session(p, threads=threads, optimization=optimization, provider=provider, provider_options=provider_options)
        for p in (path_a, path_b)
    ]
    feeds = [make_feed(s, example_inputs) for s in sessions]
    for s, f in zip(sessions, feeds):
        _first_run(s, f)
    calls = [lambda s=s, f=f: s.run(None, f) for s, f in zip(sessions, feeds)]
    times = time_calls(calls, warmup=warmup, runs=rounds)
    name = sessions[0].get_providers()[0]
    a, b = (LatencyStats.from_times(t, threads, name) for t in times)
    return LatencyComparison(a, b, b.median_ms / a.median_ms if a.median_ms > 0 else float("inf"))
