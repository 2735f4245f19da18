"""fxdecomp: a torch.fx compiler pass that makes trained PyTorch models cheaper by low-rank decomposition.

Example::

    import fxdecomp, torch.nn as nn
    layer = nn.Conv2d(64, 64, 3, padding=1)
    small = fxdecomp.decompose_layer(layer, "tucker2", (16, 16))
"""

from .budget import Budget
from .compress import compress
from .cost import count_flops
from .decompose import decompose_layer
from .decomposers import all_methods, methods_for
from .errors import (
    BudgetError,
    ExportError,
    FxDecompError,
    InvalidInputError,
    ParityError,
    RecipeError,
    TraceError,
    UnknownMethodError,
    UnsupportedLayerError,
)

__version__ = "0.1.0"

__all__ = [
    "Budget",
    "BudgetError",
    "ExportError",
    "FxDecompError",
    "InvalidInputError",
    "ParityError",
    "RecipeError",
    "TraceError",
    "UnknownMethodError",
    "UnsupportedLayerError",
    "all_methods",
    "compress",
    "count_flops",
    "decompose_layer",
    "methods_for",
]
