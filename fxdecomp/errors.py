"""The project's exception types: one base class, one subclass per kind of failure.

Every message names the problem and the way out, e.g.::

    raise UnsupportedLayerError("tt: grouped convolutions (groups=4) are not supported; use svd, tucker2 or cp")
"""

from __future__ import annotations


class FxDecompError(Exception):
    """Base class of every error fxdecomp raises on purpose."""


class FxDecompWarning(UserWarning):
    """Every warning fxdecomp gives (a layer kept, a pattern that names nothing, what a capture loses):
    ``warnings.filterwarnings("ignore", category=fxdecomp.FxDecompWarning)`` silences them all."""


class InvalidInputError(FxDecompError, ValueError):
    """An argument is malformed: a rank spec, example inputs, a layer with non-finite weights."""


class UnknownMethodError(FxDecompError, ValueError):
    """A method name that no decomposer is registered under."""


class UnsupportedLayerError(FxDecompError, ValueError):
    """A method cannot decompose this layer (the message names the attribute)."""


class BudgetError(FxDecompError, ValueError):
    """A budget outside (0, 1] or one the model cannot reach.

    ``smallest_reachable`` holds the smallest fraction that can be reached, when known.
    """

    def __init__(self, message: str, smallest_reachable: float | None = None):
        super().__init__(message)
        self.smallest_reachable = smallest_reachable


class ResourceError(FxDecompError, MemoryError):
    """A factorisation would need more memory than the machine has (the message gives the estimate)."""


class TraceError(FxDecompError, RuntimeError):
    """Neither torch.fx nor torch.export could capture the model."""


class RecipeError(FxDecompError, ValueError):
    """A pass recipe names an unknown pass or option, cannot be found, or runs a pass before what it requires."""


class RegistrationError(FxDecompError, ValueError):
    """A pass or decomposer registered under a name that is already taken."""


class ExportError(FxDecompError, RuntimeError):
    """ONNX export failed."""


class ParityError(ExportError):
    """The exported ONNX model disagrees with torch beyond the tolerance."""


class ShapeError(InvalidInputError):
    """Inputs whose shape the captured graph does not accept (the message names the input, dim and allowed sizes)."""
