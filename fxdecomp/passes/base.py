"""Pass infrastructure: the shared context, the pass registry, and the candidate record.

A pass is a callable ``GraphModule -> PassResult(graph_module, modified)`` (the
torch.fx pass-infra shape), built from the `PassContext` and its recipe options.
Analyses only write ``node.meta`` and the context; only the rewrite changes the graph.

Example::

    @register_pass
    class ShapePass(Pass):
        name = "shape_prop"
        def run(self, gm): ...
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import fx, nn
from torch.fx.passes.infra.pass_base import PassResult

from ..budget import Budget
from ..errors import RecipeError
from ..layer_spec import ConvSpec, LinearSpec

log = logging.getLogger("fxdecomp")


@dataclass
class CallSite:
    node: fx.Node
    input_node: fx.Node
    input_shape: tuple[int, ...]
    # Where the input sits in the call (args index or kwarg name): unlike ``input_node``,
    # it stays valid after the rewrite of an earlier layer replaces the producer.
    input_key: int | str = 0

    @classmethod
    def of(cls, node: fx.Node, input_node: fx.Node, input_shape: tuple[int, ...]) -> "CallSite":
        key = next((i for i, arg in enumerate(node.args) if arg is input_node), None)
        if key is None:
            key = next(k for k, value in node.kwargs.items() if value is input_node)
        return cls(node, input_node, input_shape, key)


@dataclass
class Candidate:
    """One decomposable layer: a Conv2d/Linear module, or a functional call on a parameter.

    ``layer`` is the module holding the weights (the original one, or an equivalent
    built from the functional call); a module called twice is one candidate with two sites.
    """

    name: str
    layer: nn.Module
    spec: ConvSpec | LinearSpec
    sites: list[CallSite]
    form: str  # "module" or "function"
    target: str  # call_module target, or the weight's get_attr target
    excluded: bool = False
    # Parameters of this layer's weight that stay in the model if it is decomposed, because
    # another user reads the same tensor (a tied embedding, the same weight called another way).
    shared_params: int = 0
    note: str = ""  # e.g. a parametrization that was materialized (see graph.parametrized)

    @property
    def kind(self) -> str:
        return self.spec.kind


@dataclass
class PassContext:
    """What the passes of one `compress` call share."""

    example_inputs: tuple
    budget: Budget
    methods: tuple[str, ...] | None = None
    exclude: tuple[str, ...] = ()
    calibration: Any = None
    sensitivity: Any = None  # callable(module) -> score, higher is better
    progress: bool = False
    frontend: str = "fx"
    reference: fx.GraphModule | None = None  # the captured graph before any rewrite
    candidates: dict[str, Candidate] = field(default_factory=dict)
    states: dict[tuple[str, str], Any] = field(default_factory=dict)  # (candidate, method) -> factorisation
    flops_before: int = 0
    params_before: int = 0
    plan: dict[str, Any] = field(default_factory=dict)  # candidate name -> Decision
    fixed_plan: dict[str, tuple[str, tuple[int, ...]]] | None = None  # name -> (method, ranks): apply, don't solve
    output_error: float | None = None
    source_model: nn.Module | None = None  # the private copy that was captured (never the user's model)
    grams: dict[str, Any] = field(default_factory=dict)  # candidate name -> GramAccumulator (calibration)
    output_grams: dict[str, Any] = field(default_factory=dict)  # candidate name -> OutputGramAccumulator
    error_meters: dict[str, Any] = field(default_factory=dict)  # candidate name -> OutputErrorMeter
    extras: dict[str, Any] = field(default_factory=dict)


_PASSES: dict[str, type[Pass]] = {}


class Pass:
    """Base class: subclasses set ``name``, an ``Options`` dataclass, and implement `run`."""

    name: ClassVar[str]

    @dataclass(frozen=True)
    class Options:
        pass

    def __init__(self, context: PassContext, **options: Any):
        known = {f.name for f in dataclasses.fields(self.Options)}
        unknown = set(options) - known
        if unknown:
            raise RecipeError(
                f"pass {self.name!r} has no option(s) {sorted(unknown)}; its options are {sorted(known) or 'none'}"
            )
        self.context = context
        self.options = self.Options(**options)

    def __call__(self, gm: fx.GraphModule) -> PassResult:
        return self.run(gm)

    def run(self, gm: fx.GraphModule) -> PassResult:
        raise NotImplementedError


def register_pass(cls: type[Pass]) -> type[Pass]:
    _PASSES[cls.name] = cls
    return cls


def known_passes() -> list[str]:
    return sorted(_PASSES)


def make_pass(name: str, context: PassContext, options: dict[str, Any]) -> Pass:
    cls = _PASSES.get(name)
    if cls is None:
        raise RecipeError(f"unknown pass {name!r}; known passes: {known_passes()}")
    return cls(context, **options)
