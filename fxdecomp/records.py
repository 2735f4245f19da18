"""What flows through the pipeline: the user's request and the record each analysis produces.

The request is a frozen `Request`. Each pass states, by name, the records it
requires and the ones it provides (`RECORDS` lists them); `PassContext` holds
them and hands them out through accessors, raising `MissingRecordError` for a
record that no pass has provided yet. Caches that any pass may fill (the
factorisations, per-candidate output weights) live in `Factorizations`.

Example::

    context = PassContext(Request(example_inputs=(x,), budget=Budget(flops=0.5)))
    context.provide("cost", ModelCost(flops=..., params=...))
    context.cost.flops          # 2 FLOPs per multiply-add
    context.plan.decisions      # MissingRecordError until the plan pass has run
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import fx, nn

from .budget import Budget
from .errors import FxDecompError
from .graph.candidates import Candidate
from .meta import RankEstimate
from .result import Decision


class MissingRecordError(FxDecompError, RuntimeError):
    """A pass read a record that no earlier pass provided (a recipe in the wrong order)."""


@dataclass(frozen=True)
class Request:
    """The user's request to `compress` (or `inspect_model`), as given, after validation.

    ``budget`` is None for analysis-only runs; ``calibration`` is an iterable of
    input tuples (consumed once); ``sensitivity`` scores a model (higher is better);
    ``fixed_plan`` maps a layer name to (method, ranks) to re-apply a saved plan.
    """

    example_inputs: tuple
    budget: Budget | None = None
    methods: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()
    calibration: Any = None
    sensitivity: Callable[[nn.Module], float] | None = None
    progress: bool = False
    frontend: str = "fx"
    fixed_plan: Mapping[str, tuple[str, tuple[int, ...]]] | None = None


@dataclass(frozen=True)
class NodeShapes:
    """Output shape of every node that has a tensor output, by node name (also in ``node.meta[meta.SHAPE]``)."""

    by_node: Mapping[str, tuple[int, ...]]


@dataclass(frozen=True)
class ModelCost:
    """The whole model before any rewrite: FLOPs (2 per multiply-add, every op) and parameters."""

    flops: int
    params: int


@dataclass(frozen=True)
class CalibrationStats:
    """Per candidate name: input Gram accumulators, output-gradient Gram accumulators, and error meters.

    ``error_meters`` fills lazily (`fxdecomp.planning.damage.predicted_error`); empty maps without calibration.
    """

    grams: Mapping[str, Any] = field(default_factory=dict)  # GramAccumulator
    output_grams: Mapping[str, Any] = field(default_factory=dict)  # OutputGramAccumulator
    error_meters: dict[str, Any] = field(default_factory=dict)  # OutputErrorMeter
    # Damage of an error not measured on the model's outputs (`fxdecomp.planning.damage.output_damage`):
    # "retained_energy" (-log(1 - e^2)), "signal_share" (that times the layer's share of the signal) or "squared" (e^2).
    # The calibrate pass's default, also for a recipe without that pass.
    weight_damage: str = "signal_share"


@dataclass(frozen=True)
class RankEstimates:
    """Candidate name -> method -> the rank rules' estimates (also in ``node.meta[meta.RANK]``)."""

    by_candidate: Mapping[str, Mapping[str, RankEstimate]]


@dataclass(frozen=True)
class Plan:
    """The one place decisions live: candidate name -> `Decision`, in graph order, kept layers included."""

    decisions: Mapping[str, Decision]


@dataclass(frozen=True)
class LatencyRecord:
    """onnxruntime timings the plan made: the reference model in milliseconds (None if not timed),
    at ``threads`` intra-op threads on ``provider`` (empty: the CPU provider) with its options;
    ``layer_latency`` is the per-layer timer and its cache, or the device's table (or None);
    ``predicted_after_ms`` the planned model's latency predicted from a device table (None when timed here)."""

    before_ms: float | None
    threads: int = 1
    layer_latency: Any = None
    provider: str = ""
    provider_options: Mapping[str, Any] = field(default_factory=dict)
    predicted_after_ms: float | None = None


@dataclass(frozen=True)
class Verification:
    """The rewritten model against the reference: largest relative L2 output error, and its latency (ms) if timed."""

    output_error: float | None
    latency_after_ms: float | None = None


@dataclass(frozen=True)
class LayerCorrection:
    """One decomposed layer's relative output error on the calibration data (sqrt of the summed squared
    error over the summed squared original output) before and after the least-squares correction of its
    last factor; ``accepted`` false: the factor was left as built. ``ridge``: lambda / mean Gram diagonal."""

    error_before: float
    error_after: float
    accepted: bool
    ridge: float | None = None


@dataclass(frozen=True)
class Corrections:
    """What the correction passes changed: decomposed layer name -> `LayerCorrection`
    (`fxdecomp.passes.correct_factors`), and the BatchNorm modules whose running statistics were
    re-estimated on the calibration data (`fxdecomp.passes.reestimate_batchnorm`)."""

    layers: Mapping[str, LayerCorrection] = field(default_factory=dict)
    batchnorms: tuple[str, ...] = ()


@dataclass
class Factorizations:
    """Caches any pass may fill, computed once per run: (candidate, method, fitted to data) -> (decomposer, state),
    candidate -> output whitening weights, and the per-candidate output energies (None until computed)."""

    states: dict[tuple[str, str, bool], Any] = field(default_factory=dict)
    output_weights: dict[str, Any] = field(default_factory=dict)
    output_energies: dict[str, float] | None = None
    signal_shares: dict[str, float] | None = None  # weight_damage = "signal_share" (planning.signal_share)
    # Which methods fit their factors to calibration data: "data" (every data-aware one),
    # "svd" (svd only, as before #16) or "weights" (none); set by the plan pass's option ``fit``.
    fit: str = "data"
    fitted: dict[tuple[str, str, str], bool] = field(default_factory=dict)  # (candidate, method, fit) -> fitted?


# Record name -> (type, what it is). Passes name these in ``requires`` and ``provides``.
RECORDS: dict[str, tuple[type, str]] = {
    "shapes": (NodeShapes, "every node's output shape"),
    "candidates": (dict, "candidate name -> Candidate (call sites, spec, exclusion)"),
    "refused": (dict, "conv / Linear weight path -> why it is not a candidate"),
    "cost": (ModelCost, "the whole model's FLOPs and parameters"),
    "calibration": (CalibrationStats, "Gram matrices from calibration batches"),
    "rank_estimates": (RankEstimates, "VBMF and energy rank estimates"),
    "plan": (Plan, "one decision per candidate"),
    "latency": (LatencyRecord, "onnxruntime timings of the reference"),
    "verification": (Verification, "the result's output error and latency"),
    "corrections": (Corrections, "least-squares corrections of last factors on the calibration data"),
    "batchnorm_stats": (Corrections, "BatchNorm statistics re-estimated on the calibration data"),
}
# Records an accessor hands out empty when no pass provided them (optional inputs).
_EMPTY: dict[str, Callable[[], Any]] = {
    "calibration": CalibrationStats,
    "latency": lambda: LatencyRecord(None),
    "refused": dict,
}


class PassContext:
    """The request, the reference graph, the records provided so far, and the shared caches of one run.

    Records are read through accessors (``context.cost``, ``context.plan``, ...);
    reading one no pass provided raises `MissingRecordError`, except the optional
    ones (calibration, latency), which read as empty. Request fields read through
    (``context.example_inputs``, ``context.exclude``, ...).
    """

    def __init__(self, request: Request, reference: fx.GraphModule | None = None, source_model: nn.Module | None = None):
        self.request = request
        self.reference = reference  # the captured graph before any rewrite
        self.source_model = source_model  # the private copy that was captured (never the user's model)
        self.factorizations = Factorizations()
        self._records: dict[str, Any] = {}

    # -- records -----------------------------------------------------------------------------
    def provide(self, name: str, record: Any) -> None:
        """Store ``record`` as record ``name``; its type must be the one `RECORDS` names."""
        kind = RECORDS.get(name)
        if kind is None:
            raise MissingRecordError(f"no record named {name!r}; known records: {sorted(RECORDS)}")
        if not isinstance(record, kind[0]):
            raise TypeError(f"record {name!r} must be a {kind[0].__name__}, got {type(record).__name__}")
        self._records[name] = record

    def has(self, name: str) -> bool:
        return name in self._records

    def provided(self) -> frozenset[str]:
        return frozenset(self._records)

    def record(self, name: str) -> Any:
        """Record ``name``; optional records read as empty, others raise `MissingRecordError` until provided."""
        if name in self._records:
            return self._records[name]
        if name in _EMPTY:
            return _EMPTY[name]()
        raise MissingRecordError(f"record {name!r} ({RECORDS[name][1]}) was read before any pass provided it; check the recipe's order")

    @property
    def shapes(self) -> NodeShapes:
        return self.record("shapes")

    @property
    def candidates(self) -> dict[str, Candidate]:
        return self.record("candidates")

    @candidates.setter
    def candidates(self, value: dict[str, Candidate]) -> None:
        self.provide("candidates", value)

    @property
    def refused(self) -> dict[str, str]:
        return self.record("refused")

    @property
    def cost(self) -> ModelCost:
        return self.record("cost")

    # The cost pass writes these two one at a time.
    @property
    def flops_before(self) -> int:
        return self.cost.flops

    @flops_before.setter
    def flops_before(self, value: int) -> None:
        self.provide("cost", ModelCost(int(value), self.cost.params if self.has("cost") else 0))

    @property
    def params_before(self) -> int:
        return self.cost.params

    @params_before.setter
    def params_before(self, value: int) -> None:
        self.provide("cost", ModelCost(self.cost.flops if self.has("cost") else 0, int(value)))

    @property
    def calibration_stats(self) -> CalibrationStats:
        return self.record("calibration")

    @property
    def grams(self) -> Mapping[str, Any]:
        return self.calibration_stats.grams

    @property
    def output_grams(self) -> Mapping[str, Any]:
        return self.calibration_stats.output_grams

    @property
    def error_meters(self) -> dict[str, Any]:
        if not self.has("calibration"):  # meters are built from Gram matrices: keep them with them
            self.provide("calibration", CalibrationStats())
        return self.calibration_stats.error_meters

    @property
    def states(self) -> dict[tuple[str, str, bool], Any]:
        return self.factorizations.states

    @property
    def rank_estimates(self) -> RankEstimates:
        return self.record("rank_estimates")

    @property
    def plan(self) -> Plan:
        return self.record("plan")

    @property
    def latency(self) -> LatencyRecord:
        return self.record("latency")

    @property
    def verification(self) -> Verification:
        return self.record("verification")

    # -- the request, read through ------------------------------------------------------------
    @property
    def example_inputs(self) -> tuple:
        return self.request.example_inputs

    @property
    def budget(self) -> Budget | None:
        return self.request.budget

    @property
    def methods(self) -> tuple[str, ...] | None:
        return self.request.methods

    @property
    def exclude(self) -> tuple[str, ...]:
        return self.request.exclude

    @property
    def calibration(self) -> Any:
        return self.request.calibration

    @property
    def sensitivity(self) -> Callable[[nn.Module], float] | None:
        return self.request.sensitivity

    @property
    def progress(self) -> bool:
        return self.request.progress

    @property
    def frontend(self) -> str:
        return self.request.frontend

    @property
    def fixed_plan(self) -> Mapping[str, tuple[str, tuple[int, ...]]] | None:
        return self.request.fixed_plan
