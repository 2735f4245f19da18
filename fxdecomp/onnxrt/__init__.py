"""onnxruntime in one room: sessions and the one timing loop, whole-model and per-layer latency
(the on-disk layer-latency cache), latency tables measured on a target device, hardware facts,
and the ONNX built or counted for them.

Modules:

- `timing`: providers, sessions, the timing loop, device facts (onnxruntime + numpy only)
- `files`: the atomic write, a lock (standard library only)
- `session`: `benchmark_onnx`, `compare_latency`, feeds and I/O info of exported models
- `models`: `model_ms`, `compare_models_ms` of torch models (export, then time)
- `layer_cache`: `LayerLatency`, the per-layer timings cached on disk
- `table`: `LatencyTable`, timings read from a table measured on the device
- `hardware`: CPU model, measured rank multiple
- `static_model`: `StaticLatency`, latencies predicted from shapes (probes calibrated once per CPU)
- `layers`: a direct ONNX builder for single layers and decomposed structures
- `flops`: FLOPs and parameters counted on an ONNX graph
- `device_bench.py`: the standalone script that times a latency pack on the device

(`fxdecomp.export` stays where it is.)
"""

from .hardware import cpu_model, measured_rank_multiple, preferred_rank_multiple, rank_multiple_from_times
from .layer_cache import LayerLatency, default_cache_dir, original_module
from .models import compare_models_ms, model_ms
from .session import LatencyComparison, LatencyStats, TensorInfo, benchmark_onnx, compare_latency, io_info, make_feed, open_session
from .table import LatencyTable
from .timing import Provider, session_options

__all__ = [
    "LatencyComparison",
    "LatencyStats",
    "LatencyTable",
    "LayerLatency",
    "Provider",
    "TensorInfo",
    "benchmark_onnx",
    "compare_latency",
    "compare_models_ms",
    "cpu_model",
    "default_cache_dir",
    "io_info",
    "make_feed",
    "measured_rank_multiple",
    "model_ms",
    "open_session",
    "original_module",
    "preferred_rank_multiple",
    "rank_multiple_from_times",
    "session_options",
]
