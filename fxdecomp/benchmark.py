"""Moved to `fxdecomp.onnxrt.session` (and `fxdecomp.onnxrt.timing`); this module re-exports its names."""

from .onnxrt.session import (  # noqa: F401
    LatencyComparison,
    LatencyStats,
    TensorInfo,
    benchmark_onnx,
    compare_latency,
    io_info,
    make_feed,
    open_session,
)
from .onnxrt.timing import session_options  # noqa: F401
