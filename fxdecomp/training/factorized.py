"""Factorized training from scratch: the decomposed structure with freshly drawn factors.

`factorized_model` plans (or re-applies a plan) with `fxdecomp.compress`, then
redraws every factor so that the decomposed layer's dense equivalent weight has
the variance PyTorch's default init gives the original layer (kaiming_uniform
with a = sqrt(5): Var = 1 / (3 * fan_in)), and redraws its bias like the original
layer's default (uniform in +-1/sqrt(fan_in)).

How the factors are scaled, for any method: each entry of the dense weight is a
sum over paths through the chain of factors, one entry of each factor per path.
With independent zero-mean factors, Var(entry) = paths(entry) * prod_k Var_k. The
number of paths is the dense equivalent of the chain with every factor entry set
to 1 (svd: r; tucker2: r_in * r_out; cp: R; tt: r1 * r2 * r3; ...). Each factor gets
Var_k = c / fan_in_k (the shape of a default init, so every stage keeps the scale of
its activations) and the common gain c makes mean(paths) * prod_k Var_k equal the
target. Factor entries that the planned structure holds at exactly zero (tiled_svd
pads lower-rank tiles with zero components) stay zero.

Example::

    small = factorized_model(model, (x,), budget=0.3, seed=0)   # a GraphModule, trained from scratch next
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import fx, nn

from ..compress import compress
from ..errors import InvalidInputError
from ..layer_spec import ConvSpec, LinearSpec, layer_spec
from ..transformers_layers import lifted_layer
from .plan import PlanLike, installed_modules, normalize_plan, planned_layers
from .reconstruct import dense_weight


def factorized_model(
    model: nn.Module,
    example_inputs: tuple | torch.Tensor,
    budget: float | Any = None,
    plan: PlanLike | None = None,
    seed: int = 0,
    methods: Sequence[str] | None = None,
    reinit_rest: bool = True,
    **compress_options: Any,
) -> fx.GraphModule:
    """The decomposed GraphModule of ``model`` (under ``budget`` or ``plan``) with freshly initialised factors.

    ``reinit_rest`` also resets every other layer that has ``reset_parameters`` (kept convs and
    linears, norms), so the whole model starts from scratch; parameters outside such layers keep
    their values. The input model is never modified. The result is in eval mode, like `compress`'s;
    ``result.fxdecomp_result`` holds the `CompressionResult` whose plan it follows.
    """
    if (budget is None) == (plan is None):
        raise InvalidInputError("give exactly one of budget= (to plan) or plan= (to re-apply saved decisions)")
    if plan is not None:
        plan = normalize_plan(plan)
        planned_layers(model, plan)  # refuse bad plans before the (slower) compress
        result = compress(model, example_inputs, plan=plan, **compress_options)
    else:
        result = compress(model, example_inputs, budget, methods=methods, **compress_options)
    gm = result.graph_module
    layers = planned_layers(model, normalize_plan(result.decisions))
    generator = torch.Generator().manual_seed(seed)
    installed = installed_modules(gm, list(layers))
    for name, (layer, _, _) in layers.items():
        init_factors(installed[name], layer_spec(lifted_layer(layer)), generator)
    if reinit_rest:
        _reset_others(gm, {_path(module, gm) for module in installed.values()}, seed)
    gm.fxdecomp_result = result
    return gm


def default_weight_variance(spec: ConvSpec | LinearSpec) -> float:
    """Var of a weight entry under PyTorch's default Conv2d/Linear init: 1 / (3 * fan_in)."""
    return 1.0 / (3.0 * _fan_in(spec))


@torch.no_grad()
def init_factors(module: nn.Module, spec: ConvSpec | LinearSpec, generator: torch.Generator | None = None) -> None:
    """Redraw the factors and bias of a decomposed ``module`` of a layer with ``spec`` (see the module docstring)."""
    factors = [(owner, p) for owner in module.modules() for name, p in owner.named_parameters(recurse=False) if name != "bias"]
    if not factors:
        raise InvalidInputError(f"{type(module).__name__} has no factor to initialise")
    masks = [(p != 0).to(p.dtype) for _, p in factors]
    mean_paths = float(_path_counts(module, spec, masks).mean())
    if mean_paths <= 0:
        raise InvalidInputError("the decomposed structure has no path from input to output (all factors zero)")
    fan_ins = [_factor_fan_in(owner, p) for owner, p in factors]
    log_gain = (math.log(default_weight_variance(spec) / mean_paths) + sum(map(math.log, fan_ins))) / len(factors)
    for (_, p), mask, fan_in in zip(factors, masks, fan_ins):
        bound = math.sqrt(3.0 * math.exp(log_gain) / fan_in)  # uniform(-b, b) has variance b^2 / 3
        p.copy_(_uniform(p.shape, bound, generator).to(p) * mask)
    bound = 1.0 / math.sqrt(_fan_in(spec))
    for name, p in module.named_parameters():
        if name.rsplit(".", 1)[-1] == "bias":
            p.copy_(_uniform(p.shape, bound, generator).to(p))


def _path_counts(module: nn.Module, spec, masks) -> torch.Tensor:
    """The dense equivalent of ``module`` with every factor entry 1 (0 where masked) and no bias."""
    ones = copy.deepcopy(module)
    factors = [p for owner in ones.modules() for name, p in owner.named_parameters(recurse=False) if name != "bias"]
    for p, mask in zip(factors, masks):
        p.copy_(mask)
    for name, p in ones.named_parameters():
        if name.rsplit(".", 1)[-1] == "bias":
            p.zero_()
    return dense_weight(ones, spec)


def _fan_in(spec: ConvSpec | LinearSpec) -> int:
    return spec.in_per_group * spec.kernel_area if isinstance(spec, ConvSpec) else spec.in_features


def _factor_fan_in(owner: nn.Module, p: torch.Tensor) -> int:
    if isinstance(owner, (nn.Conv2d, nn.Linear)):
        return p.shape[1] * math.prod(p.shape[2:])
    # fxdecomp.layers (TTLinear cores, TiledLinear left/right) multiply as x @ P: fan-in is the row count.
    return p.shape[-2]


def _uniform(shape, bound: float, generator: torch.Generator | None) -> torch.Tensor:
    return (torch.rand(shape, generator=generator, dtype=torch.float64) * 2 - 1) * bound


def _path(module: nn.Module, gm: nn.Module) -> str:
    return next(name for name, sub in gm.named_modules() if sub is module)


def _reset_others(gm: nn.Module, decomposed: set[str], seed: int) -> None:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name, sub in gm.named_modules():
            inside = any(name == d or name.startswith(d + ".") for d in decomposed)
            if not inside and hasattr(sub, "reset_parameters"):
                sub.reset_parameters()
