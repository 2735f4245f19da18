"""What `compress` returns: the decomposed GraphModule and one decision per candidate layer.

Example::

    result = fxdecomp.compress(model, (x,), budget=0.5)
    print(result.report())                 # markdown table, one row per layer
    json.dumps(result.to_dict())           # strict JSON
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import fx


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
    reason: str = ""  # why a layer was kept: "excluded", "budget", "no cheaper option"
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

    def apply_to(self, model, example_inputs=None):
        """Keep-the-model mode: a copy of ``model`` with its decomposed layers' modules swapped in.

        The copy keeps its class and methods (``generate``, ``save_pretrained``, ``config``,
        the KV cache); see `fxdecomp.keep_model.apply_to_model` for the checks and errors.
        """
        from .keep_model import apply_to_model

        return apply_to_model(self, model, example_inputs)

    def to_dict(self) -> dict[str, Any]:
        """Strict JSON: no NaN or infinity (unknown values are null)."""
        data = {
            "flops_convention": "FLOPs = 2 x multiply-adds",
            "flops_before": self.flops_before,
            "flops_after": self.flops_after,
            "flops_ratio": self.flops_ratio,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "params_ratio": self.params_ratio,
            "budget": self.budget,
            "output_error": self.output_error,
            "frontend": self.frontend,
            "pipeline": self.pipeline,
            "pass_seconds": self.pass_seconds,
            "latency_before_ms": self.latency_before_ms,
            "latency_after_ms": self.latency_after_ms,
            "decisions": [asdict(d) | {"ranks": list(d.ranks)} for d in self.decisions],
            "opaque_weights": [asdict(w) | {"shape": list(w.shape)} for w in self.opaque_weights],
            "partial": self.partial,
            "captured": [asdict(c) for c in self.captured],
        }
        return _finite(data)

    def report(self) -> str:
        """A markdown table, one row per candidate layer, and the totals."""
        lines = [
            f"Budget {self.budget}: FLOPs {_num(self.flops_before)} -> {_num(self.flops_after)} "
            f"({self.flops_ratio:.1%}), parameters {_num(self.params_before)} -> {_num(self.params_after)} "
            f"({self.params_ratio:.1%}); FLOPs = 2 x multiply-adds."
            + (f" Output relative error on the example inputs: {self.output_error:.3g}." if self.output_error is not None else "")
            + (
                f" onnxruntime latency {self.latency_before_ms:.3g} ms -> {self.latency_after_ms:.3g} ms."
                if self.latency_before_ms is not None and self.latency_after_ms is not None
                else ""
            ),
            *(
                [f"Captured in parts (the whole model could not be): {', '.join(f'{c.name} ({c.frontend}, {c.fraction:.1%} of the FLOPs)' for c in self.captured)}."]
                if self.partial
                else []
            ),
            *(
                [f"Kept because no frontend sees into their calls: {', '.join(f'{w.parameter} ({w.consumer})' for w in self.opaque_weights)}."]
                if self.opaque_weights
                else []
            ),
            "",
            "| layer | op | method | ranks | FLOPs before | FLOPs after | params before | params after | predicted error |",
            "|---|---|---|---|---:|---:|---:|---:|---:|",
        ]
        for d in self.decisions:
            method = d.method if d.decomposed or not d.reason else f"keep ({d.reason})"
            ranks = ", ".join(map(str, d.ranks)) if d.ranks else "-"
            lines.append(
                f"| {d.name} | {d.op} | {method} | {ranks} | {_num(d.flops_before)} | {_num(d.flops_after)} | "
                f"{_num(d.params_before)} | {_num(d.params_after)} | {d.error:.3g} |"
            )
        lines += [f"Note on {d.name}: {d.note}." for d in self.decisions if d.note]
        return "\n".join(lines)


def _num(value: int) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.2f}{unit}"
    return str(value)


def _finite(value):
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value
