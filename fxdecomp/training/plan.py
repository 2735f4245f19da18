"""Plans for training: saved decisions normalised, and each planned layer found in the model.

A plan is what `fxdecomp.compress` decided: ``result`` itself, ``result.decisions``,
``result.to_dict()`` (or its "decisions" list), or a mapping name -> (method, ranks).
Names are qualified module names; layers the planner saw as functional calls
(``F.linear(x, self.w)``) have no module holding their weight and are refused here.

Example::

    plan = normalize_plan(fxdecomp.compress(model, (x,), budget=0.5))
    layers = planned_layers(model, plan)   # {"features.3": (Conv2d, "tucker2", (16, 32)), ...}
    installed_module(result.graph_module, "features.3")   # the decomposed module compress put there
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import fx, nn

from .. import meta
from ..planning.replay import normalize_plan  # noqa: F401  (re-exported)
from ..decomposers import get_decomposer
from ..errors import InvalidInputError, UnsupportedLayerError
from ..layer_spec import LAYER_TYPES, layer_spec
from ..ranks import resolve_ranks
from ..transformers_layers import is_conv1d, lifted_layer
from ..result import CompressionResult

Plan = dict[str, tuple[str, tuple[int, ...]]]
PlanLike = CompressionResult | Mapping[str, Any] | Sequence[Any]


def planned_layers(model: nn.Module, plan: Plan) -> dict[str, tuple[nn.Module, str, tuple[int, ...]]]:
    """name -> (the model's layer, method, ranks) for every decomposed entry, checked against the layer."""
    modules = dict(model.named_modules())
    params = {name for name, _ in model.named_parameters()}
    found = {}
    for name, (method, ranks) in plan.items():
        layer = modules.get(name)
        functional = not (isinstance(layer, LAYER_TYPES) or is_conv1d(layer)) and (
            layer is not None or any(p == name or p.startswith(name + ".") for p in params)
        )
        if layer is None and not functional:
            known = sorted(n for n, m in modules.items() if isinstance(m, LAYER_TYPES))
            raise InvalidInputError(f"the plan names a layer this model does not have: {name!r}; its layers: {known}")
        if method == "keep":
            continue
        if functional:
            raise UnsupportedLayerError(
                f"plan entry {name!r} is a functional call (its weight is not held by an nn.Conv2d or nn.Linear "
                "module); DeepTwist and factorized training support module layers only: exclude it when planning "
                f"(compress(..., exclude=[{name!r}])) or drop it from the plan"
            )
        spec = layer_spec(lifted_layer(layer))  # transformers' Conv1D as its Linear
        if spec.kind not in ("linear", "conv2d"):
            raise UnsupportedLayerError(
                f"plan entry {name!r} is a {spec.kind} layer; DeepTwist and factorized training support Linear and "
                f"Conv2d layers only (their dense weights are read back by impulse responses): exclude it when planning "
                f"(compress(..., exclude=[{name!r}])) or drop it from the plan"
            )
        decomposer = get_decomposer(spec.kind, method)
        decomposer.check(spec)
        found[name] = (layer, method, resolve_ranks(tuple(ranks), decomposer, spec, None))
    return found


def installed_module(gm: fx.GraphModule, name: str) -> nn.Module:
    """The decomposed module that `compress` installed for layer ``name`` (found by the rewrite's provenance)."""
    return installed_modules(gm, [name])[name]


def installed_modules(gm: fx.GraphModule, names: list[str]) -> dict[str, nn.Module]:
    """`installed_module` of every layer in ``names``, in one scan of the graph (a mixture of experts decides thousands)."""
    paths: dict[str, set[str]] = {name: set() for name in names}
    for node in gm.graph.nodes:
        provenance = node.meta.get(meta.DECOMPOSED_FROM)
        if provenance is not None and provenance.original in paths:
            paths[provenance.original].add(provenance.module)
    missing = [name for name, found in paths.items() if not found]
    if missing:
        raise InvalidInputError(f"layer {missing[0]!r} was not decomposed in this GraphModule")
    # One path, or several for a weight installed once per call configuration.
    return {name: gm.get_submodule(min(found)) for name, found in paths.items()}
