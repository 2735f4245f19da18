"""The JSON report: a result as strict JSON data (no NaN or infinity), with the measured latency when given.

Example::

    data = result_dict(result)                         # what CompressionResult.to_dict() returns
    text = json_report(result, compare_latency("orig.onnx", "small.onnx", (x,)))
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..onnxrt.session import LatencyComparison
    from ..result import CompressionResult


def result_dict(result: CompressionResult) -> dict[str, Any]:
    """Every figure and decision of ``result`` as JSON-ready data; unknown or non-finite values are null."""
    data = {
        "flops_convention": "FLOPs = 2 x multiply-adds",
        "flops_before": result.flops_before,
        "flops_after": result.flops_after,
        "flops_ratio": result.flops_ratio,
        "params_before": result.params_before,
        "params_after": result.params_after,
        "params_ratio": result.params_ratio,
        "budget": result.budget,
        "output_error": result.output_error,
        "frontend": result.frontend,
        "pipeline": result.pipeline,
        "pass_seconds": result.pass_seconds,
        "latency_before_ms": result.latency_before_ms,
        "latency_after_ms": result.latency_after_ms,
        "decisions": [asdict(d) | {"ranks": list(d.ranks)} for d in result.decisions],
        "opaque_weights": [asdict(w) | {"shape": list(w.shape)} for w in result.opaque_weights],
        "partial": result.partial,
        "captured": [asdict(c) for c in result.captured],
    }
    return finite(data)


def json_report(result: CompressionResult, latency: LatencyComparison | None = None) -> str:
    """`result_dict` as indented JSON text; ``latency`` adds ``{"original", "compressed", "ratio"}``."""
    data = result_dict(result)
    if latency is not None:
        ratio = latency.ratio if math.isfinite(latency.ratio) else None
        data["latency"] = {"original": latency.a.to_dict(), "compressed": latency.b.to_dict(), "ratio": ratio}
    return json.dumps(data, indent=2, allow_nan=False)


def finite(value):
    """``value`` with every non-finite float replaced by None, dict keys as str and tuples as lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value
