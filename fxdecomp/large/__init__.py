"""Large models: block-by-block compression, lazy safetensors checkpoints in and out.

Example::

    from fxdecomp.large import compress_sequential, load_compressed
    result = compress_sequential("llama-dir", (ids,), budget=0.8, calibration=batches, out="llama-small")
    model = load_compressed("llama-small")        # the model's own class, decomposed
"""

from .checkpoint import LazyCheckpoint, ShardWriter, empty_model
from .loading import load_compressed
from .sequential import SequentialResult, compress_sequential

__all__ = ["LazyCheckpoint", "SequentialResult", "ShardWriter", "compress_sequential", "empty_model", "load_compressed"]
