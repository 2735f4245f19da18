"""fxdecomp: a torch.fx compiler pass that makes trained PyTorch models cheaper by low-rank decomposition.

Example::

    import fxdecomp, torch.nn as nn
    layer = nn.Conv2d(64, 64, 3, padding=1)
    small = fxdecomp.decompose_layer(layer, "tucker2", (16, 16))
"""

from importlib import metadata as _metadata

from .onnxrt import LatencyStats, benchmark_onnx
from .budget import Budget
from .compress import compress
from .compile import compile, compile_with_result
from .cost import count_flops
from .decompose import decompose_layer
from .decomposers import all_methods, methods_for
from .distilled import distilled_batches
from .export import ExportReport, export_onnx
from .inspect import LayerInfo, inspect_model
from .recipes import Recipe, load_recipe
from .training import DeepTwist, factorized_model, finetune
from .errors import (
    BudgetError,
    ExportError,
    FxDecompError,
    FxDecompWarning,
    InvalidInputError,
    ParityError,
    RecipeError,
    ResourceError,
    ShapeError,
    TraceError,
    UnknownMethodError,
    UnsupportedLayerError,
)

try:  # one source of truth: the version in pyproject.toml, read back from the installed metadata
    __version__ = _metadata.version("fxdecomp")
except _metadata.PackageNotFoundError:  # a source tree on sys.path that was never installed
    __version__ = "0+unknown"

__all__ = [
    "Budget",
    "DeepTwist",
    "BudgetError",
    "ExportReport",
    "LatencyStats",
    "LayerInfo",
    "ExportError",
    "FxDecompError",
    "FxDecompWarning",
    "InvalidInputError",
    "ParityError",
    "Recipe",
    "RecipeError",
    "ResourceError",
    "ShapeError",
    "TraceError",
    "UnknownMethodError",
    "UnsupportedLayerError",
    "all_methods",
    "benchmark_onnx",
    "compile",
    "compile_with_result",
    "compress",
    "count_flops",
    "decompose_layer",
    "distilled_batches",
    "export_onnx",
    "factorized_model",
    "finetune",
    "load_recipe",
    "inspect_model",
    "methods_for",
]


def __getattr__(name: str):
    """``fxdecomp.large`` without its own import (it is imported on first use: it needs the ``large`` extra)."""
    if name == "large":
        import importlib

        return importlib.import_module(".large", __name__)
    raise AttributeError(f"module 'fxdecomp' has no attribute {name!r}")
