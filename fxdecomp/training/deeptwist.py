"""DeepTwist (Lee et al., 2019): train the original structure, pulling its weights to low rank now and then.

The model keeps its layers; every ``every`` optimizer steps (S_D) each planned
weight is replaced, in place, by its low-rank reconstruction under the plan's
method and ranks: the factors composed back in closed form (`low_rank`, the same
weight as ``decompose_layer(layer, method, ranks)`` computes with; biases unchanged). Between distortions the weights move freely, so training
finds weights that stay accurate after the final decomposition. `finalize`
distorts once more and returns the decomposed GraphModule, whose outputs equal
the model's after that distortion.

Layers are named as in the plan (qualified module names). Functional-form
candidates (``F.linear(x, self.w)``, no module holding the weight) are not
supported: exclude them when planning.

Example::

    twist = DeepTwist(model, 0.3, example_inputs=(x,), every=200)   # or DeepTwist(model, result.decisions)
    for inputs, targets in loader:
        optimizer.zero_grad(); loss_fn(model(inputs), targets).backward(); optimizer.step()
        twist.step()
    small = twist.finalize()            # torch.fx.GraphModule
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import fx, nn

from ..compress import compress
from ..errors import InvalidInputError
from ..result import CompressionResult
from .plan import Plan, PlanLike, installed_module, normalize_plan, planned_layers
from ..transformers_layers import is_conv1d, lifted_layer
from .reconstruct import LowRank, low_rank


class DeepTwist:
    """Periodic low-rank distortion of a model's planned weights, for use inside any training loop.

    ``plan_or_budget``: a plan from `fxdecomp.compress` (result, ``result.decisions``,
    ``result.to_dict()``, or name -> (method, ranks)), or a budget (then the plan is
    made once here with ``compress(model, example_inputs, budget, methods=methods, **compress_options)``).
    The model is modified in place (that is the point); parameters keep their identity,
    so any optimizer keeps working.
    """

    def __init__(
        self,
        model: nn.Module,
        plan_or_budget: PlanLike | float | Any,
        example_inputs: tuple | torch.Tensor | None = None,
        every: int = 100,
        methods: Sequence[str] | None = None,
        **compress_options: Any,
    ):
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise InvalidInputError(f"every must be an int >= 1 (optimizer steps between distortions), got {every!r}")
        if not isinstance(model, nn.Module):
            raise InvalidInputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model, self.every, self.example_inputs = model, every, example_inputs
        self.result: CompressionResult | None = None  # the latest compress result (planning, then finalize)
        if _is_plan(plan_or_budget):
            self.plan: Plan = normalize_plan(plan_or_budget)
        else:
            if example_inputs is None:
                raise InvalidInputError("DeepTwist with a budget needs example_inputs to plan the decomposition")
            self.result = compress(model, example_inputs, plan_or_budget, methods=methods, **compress_options)
            self.plan = normalize_plan(self.result.decisions)
        self.layers = planned_layers(model, self.plan)
        self.steps = 0
        self.distortions = 0
        self._last: dict[str, LowRank] = {}

    def step(self) -> bool:
        """Count one optimizer step; distort when the count reaches a multiple of ``every``. True if it did."""
        self.steps += 1
        if self.steps % self.every:
            return False
        self.distort()
        return True

    @torch.no_grad()
    def distort(self) -> None:
        """Replace every planned weight by its low-rank reconstruction now (in place, same Parameter)."""
        for name, (layer, method, ranks) in self.layers.items():
            self._last[name] = approx = low_rank(lifted_layer(layer), method, ranks)
            layer.weight.copy_(approx.weight.T if is_conv1d(layer) else approx.weight)  # Conv1D stores (in, out)
        self.distortions += 1

    def finalize(self, example_inputs: tuple | torch.Tensor | None = None) -> fx.GraphModule:
        """Distort once more and return the decomposed GraphModule (``self.result`` holds the full result).

        The factors are those of this last distortion (not a new factorisation of the distorted
        weights), so the GraphModule computes what the distorted model computes, to float
        rounding, for every method, CP included.
        """
        example_inputs = example_inputs if example_inputs is not None else self.example_inputs
        if example_inputs is None:
            raise InvalidInputError("finalize needs example_inputs (give them here or to DeepTwist)")
        self.distort()
        self.result = compress(self.model, example_inputs, plan=self.plan)
        gm = self.result.graph_module
        with torch.no_grad():
            for name, approx in self._last.items():
                bias = self.layers[name][0].bias
                module = approx.build(bias.detach() if bias is not None else None)
                installed_module(gm, name).load_state_dict(module.state_dict())
        return gm

    def __repr__(self) -> str:
        planned = ", ".join(f"{n}: {m} {r}" for n, (_, m, r) in self.layers.items())
        return f"DeepTwist(every={self.every}, steps={self.steps}, distortions={self.distortions}, layers={{{planned}}})"


def _is_plan(value: Any) -> bool:
    if isinstance(value, CompressionResult):
        return True
    if isinstance(value, (str, bytes)):
        return False
    return isinstance(value, (dict, list, tuple)) or hasattr(value, "items")
