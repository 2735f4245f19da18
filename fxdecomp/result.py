"""What `compress` returns: the decomposed GraphModule and one decision per candidate layer.

Example::

    result = fxdecomp.compress(model, (x,), budget=0.5)
    print(result.report())                 # markdown table, one row per layer
    json.dumps(result.to_dict())           # strict JSON
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import fx

from .report.json import result_dict
from .report.text import markdown_report
from .grad_mode import outside_inference_mode


@dataclass(frozen=True)
class Decision:
    """The planner's choice for one candidate layer (``method == "keep"`` leaves it as it is).

    FLOPs count 2 per multiply-add, summed over every call of the layer; ``error`` is
    the predicted relative output error of the layer (weight-only unless calibrated).
    """

    name: str
    op: str  # "conv2d" or "linear"
    method: str
    ranks: tuple[int, ...]
    flops_before: int
    flops_after: int
    params_before: int
    params_after: int
    error: float
    calls: int = 1
    reason: str = ""  # why a layer was kept: "excluded", "budget", "no cheaper option", "hooks" (the user's, on its module)
    note: str = ""  # what else happened to the layer, e.g. a weight_norm / parametrization materialized

    @property
    def decomposed(self) -> bool:
        return self.method != "keep"


@dataclass
class CompressionResult:
    graph_module: fx.GraphModule
    decisions: list[Decision]
    flops_before: int
    flops_after: int
    params_before: int
    params_after: int
    budget: dict[str, Any]
    output_error: float | None = None
    frontend: str = "fx"
    pipeline: str = "default"
    pass_seconds: dict[str, float] = field(default_factory=dict)
    latency_before_ms: float | None = None  # onnxruntime, measured for latency budgets
    latency_after_ms: float | None = None
    # Linear/Conv weights hidden in calls no frontend traces into (kept as they are; see fxdecomp.capture.hidden)
    opaque_weights: tuple = ()
    # Set when the model could not be captured whole: the submodules that were (see fxdecomp.capture.partial);
    # graph_module is then the user's model class with those submodules replaced by compressed GraphModules.
    captured: tuple = ()

    @property
    def partial(self) -> bool:
        """True when only submodules were captured (``captured`` names them) rather than the whole model."""
        return bool(self.captured)

    @property
    def flops_ratio(self) -> float:
        return self.flops_after / self.flops_before if self.flops_before else 1.0

    @property
    def params_ratio(self) -> float:
        return self.params_after / self.params_before if self.params_before else 1.0

    @outside_inference_mode
    def apply_to(self, model, example_inputs=None):
        """Keep-the-model mode: a copy of ``model`` with its decomposed layers' modules swapped in.

        The copy keeps its class and methods (``generate``, ``save_pretrained``, ``config``,
        the KV cache); see `fxdecomp.keep_model.apply_to_model` for the checks and errors.
        """
        from .keep_model import apply_to_model

        return apply_to_model(self, model, example_inputs)

    def to_dict(self) -> dict[str, Any]:
        """Strict JSON: no NaN or infinity (unknown values are null); see `fxdecomp.report.json`."""
        return result_dict(self)

    def report(self) -> str:
        """A markdown table, one row per candidate layer, and the totals; see `fxdecomp.report.text`."""
        return markdown_report(self)
