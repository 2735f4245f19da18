"""Moved to `fxdecomp.onnxrt` (layer_cache, models, hardware); this module re-exports its names.

The verify pass reads ``model_ms`` from here at call time, so patching
``fxdecomp.latency.model_ms`` still reaches it.
"""

from .onnxrt.hardware import _cpu_flags, cpu_model, measured_rank_multiple, preferred_rank_multiple  # noqa: F401
from .onnxrt.layer_cache import PROTOCOL, STATISTICS, LayerLatency, default_cache_dir, original_module  # noqa: F401
from .onnxrt.models import compare_models_ms, model_ms  # noqa: F401

__all__ = ["LayerLatency", "cpu_model", "default_cache_dir", "model_ms", "original_module", "preferred_rank_multiple"]
