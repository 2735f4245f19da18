"""onnxruntime latency of whole torch models: exported (static batch, no parity check), then timed.

Example::

    from fxdecomp.onnxrt import model_ms, compare_models_ms
    model_ms(model, (x,), threads=1)                    # median ms
    compare_models_ms(original, small, (x,), rounds=20)  # (ms, ms), timed interleaved
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import InvalidInputError
from .layer_cache import STATISTICS
from .session import benchmark_onnx, compare_latency

__all__ = ["compare_models_ms", "model_ms"]


def model_ms(
    module: nn.Module,
    example_inputs: tuple | torch.Tensor,
    threads: int = 1,
    *,
    runs: int = 20,
    warmup: int = 5,
    statistic: str = "median",
    provider: str | None = None,
    provider_options: Mapping[str, Any] | None = None,
) -> float:
    """onnxruntime latency (ms) of a whole model on ``provider`` (default: the CPU provider).

    ``statistic`` ("median", "p10" or "min") should match the `LayerLatency` whose
    layer times are set against this total.
    """
    if statistic not in STATISTICS:
        raise InvalidInputError(f"statistic must be one of {STATISTICS}, got {statistic!r}")
    from ..export import export_onnx

    args = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    with tempfile.TemporaryDirectory(prefix="fxdecomp-model-") as scratch:
        path = Path(scratch) / "model.onnx"
        export_onnx(module, args, path, check=False, dynamic_batch=False)
        stats = benchmark_onnx(path, args, threads=threads, runs=runs, warmup=warmup, provider=provider, provider_options=provider_options)
    return float(getattr(stats, f"{statistic}_ms"))


def compare_models_ms(
    module_a: nn.Module,
    module_b: nn.Module,
    example_inputs: tuple | torch.Tensor,
    threads: int = 1,
    *,
    rounds: int = 20,
    provider: str | None = None,
    provider_options: Mapping[str, Any] | None = None,
) -> tuple[float, float]:
    """Median onnxruntime latencies (ms) of two whole models, timed interleaved so machine drift hits both alike."""
    from ..export import export_onnx

    args = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    with tempfile.TemporaryDirectory(prefix="fxdecomp-models-") as scratch:
        paths = [Path(scratch) / f"{name}.onnx" for name in ("a", "b")]
        for module, path in zip((module_a, module_b), paths):
            export_onnx(module, args, path, check=False, dynamic_batch=False)
        comparison = compare_latency(
            paths[0], paths[1], args, threads=threads, rounds=rounds, warmup=3, provider=provider, provider_options=provider_options
        )
    return comparison.a.median_ms, comparison.b.median_ms
