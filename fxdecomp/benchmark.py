"""onnxruntime latency of an exported model, on the CPU it runs on.

Example::

    from fxdecomp.benchmark import benchmark_onnx, compare_latency
    stats = benchmark_onnx("model.onnx", (torch.randn(1, 3, 224, 224),), threads=1)
    stats.median_ms, stats.p90_ms
    both = compare_latency("original.onnx", "small.onnx", (torch.randn(1, 3, 224, 224),))
    both.ratio  # small's median latency as a fraction of original's

Sessions use ``CPUExecutionProvider``, sequential execution, one inter-op thread and
``threads`` intra-op threads; full graph optimisation by default (onnxruntime's fast
blocked convolutions need it). Times are per ``session.run`` call, in milliseconds.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch

from .errors import InvalidInputError

_LEVELS = {
    "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}

# onnxruntime's type strings -> numpy dtype names
_ORT_TYPES = {
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
    """Latency of one model over ``runs`` timed calls, in milliseconds."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    mean_ms: float
    min_ms: float
    runs: int
    threads: int

    @classmethod
    def from_times(cls, times_ms: Sequence[float], threads: int) -> LatencyStats:
        t = np.asarray(times_ms, dtype=np.float64)
        p10, median, p90 = np.percentile(t, [10, 50, 90])
        return cls(float(median), float(p10), float(p90), float(t.mean()), float(t.min()), len(t), threads)

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


def session_options(threads: int, optimization: str = "all") -> ort.SessionOptions:
    """Sequential CPU execution on ``threads`` intra-op threads that spin within a run, not after it.

    Spinning threads (onnxruntime's default) hold their cores after each run: with
    two sessions alive, as in an interleaved comparison, the idle one's threads
    take the cores the running one needs. `tools/study_spinning.py` (ResNet-50,
    2 threads on 2 cores, interleaved): spinning 40-41 ms, never spinning (a
    wake-up per op) 20.1 ms, spinning within a run and stopping after it 19.3-19.6 ms.
    """
    options = ort.SessionOptions()
    options.graph_optimization_level = _LEVELS[optimization]
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3  # errors only
    options.add_session_config_entry("session.force_spinning_stop", "1")
    return options


def open_session(path: str | os.PathLike, *, threads: int = 1, optimization: str = "all") -> ort.InferenceSession:
    """A CPU InferenceSession set up for steady timings; InvalidInputError if the file is missing or unreadable."""
    if not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
        raise InvalidInputError(f"threads must be a positive int, got {threads!r}")
    if optimization not in _LEVELS:
        raise InvalidInputError(f"optimization must be one of {sorted(_LEVELS)}, got {optimization!r}")
    path = Path(path)
    if not path.is_file():
        raise InvalidInputError(f"no ONNX model at {str(path)!r}; export one with fxdecomp.export_onnx")
    try:
        return ort.InferenceSession(str(path), session_options(threads, optimization), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own Fail / InvalidProtobuf / ... types
        raise InvalidInputError(f"onnxruntime cannot load {str(path)!r}: {exc}") from exc


def io_info(args: Sequence[Any]) -> tuple[TensorInfo, ...]:
    """TensorInfo of each of a session's ``get_inputs()`` / ``get_outputs()``."""
    return tuple(
        TensorInfo(
            a.name,
            tuple(d if isinstance(d, int) else str(d) if d is not None else "?" for d in a.shape),
            _ORT_TYPES.get(a.type, a.type),
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


def _timed(session: ort.InferenceSession, feed: dict[str, np.ndarray]) -> float:
    start = time.perf_counter()
    session.run(None, feed)
    return (time.perf_counter() - start) * 1e3


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
) -> LatencyStats:
    """Time ``runs`` calls of the model at ``path`` (more if ``min_seconds`` of timed calls are not yet reached).

    ``optimization`` is onnxruntime's graph optimisation level: "all", "extended", "basic" or "disable".
    """
    _check_counts(warmup=warmup, runs=runs)
    if not min_seconds >= 0.0:
        raise InvalidInputError(f"min_seconds must be >= 0, got {min_seconds!r}")
    session = open_session(path, threads=threads, optimization=optimization)
    feed = make_feed(session, example_inputs)
    _first_run(session, feed)
    for _ in range(warmup):
        session.run(None, feed)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < runs or time.perf_counter() - start < min_seconds:
        times.append(_timed(session, feed))
    return LatencyStats.from_times(times, threads)


def compare_latency(
    path_a: str | os.PathLike,
    path_b: str | os.PathLike,
    example_inputs: Inputs,
    *,
    threads: int = 1,
    rounds: int = 50,
    warmup: int = 10,
    optimization: str = "all",
) -> LatencyComparison:
    """Time two models on the same inputs, interleaved (AB BA AB ...) so machine noise hits both alike."""
    _check_counts(rounds=rounds, warmup=warmup)
    sessions = [open_session(p, threads=threads, optimization=optimization) for p in (path_a, path_b)]
    feeds = [make_feed(s, example_inputs) for s in sessions]
    for s, f in zip(sessions, feeds):
        _first_run(s, f)
    for _ in range(warmup):
        for s, f in zip(sessions, feeds):
            s.run(None, f)
    times: tuple[list[float], list[float]] = ([], [])
    for i in range(rounds):
        # Alternate who goes first: a fixed order would favour whichever model finds warmer caches.
        for k in (0, 1) if i % 2 == 0 else (1, 0):
            times[k].append(_timed(sessions[k], feeds[k]))
    a, b = (LatencyStats.from_times(t, threads) for t in times)
    return LatencyComparison(a, b, b.median_ms / a.median_ms if a.median_ms > 0 else float("inf"))
