"""The Linear layers of a streamed model: their statistics, options, one global plan, and the swap.

transformers' ``Conv1D`` (the GPT-2 family's projections, weight stored (in, out)) counts as the
Linear it computes (`fxdecomp.transformers_layers.as_linear`): its statistics, options and factors are
that Linear's, and the decomposed module (a chain of Linears) takes the Conv1D's place.

Per layer the statistics pass keeps a `LayerRecord` (its FLOPs on the example
batch, parameters, and the options of the plan: ranks on the planner's grid
with cost and predicted error); the factorization is dropped once the options
are known. `solve` picks one option per layer under the budget with the
planner's multiple-choice knapsack; `apply_option` factorizes a layer again
(on the calibration statistics of that moment) and puts the decomposed module
in its place.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..kept_experts import KeptExperts
from ..calibration import GramAccumulator
from ..cost import FLOPS_PER_MAC, module_macs
from ..decomposers import get_decomposer
from ..decomposers.base import inherit_trainable
from ..errors import BudgetError
from ..graph.hooks import user_hooks
from ..kept_layer import KeptLayer
from ..layer_spec import LinearSpec, layer_spec
from ..planning.grid import rank_grid
from ..planning.search import TIE_BREAK
from ..planning.solver import Infeasible, Option, solve_mckp
from ..result import Decision
from ..transformers_layers import is_conv1d, lifted_layer

METHOD = "svd"


@dataclass(frozen=True)
class LayerOption:
    ranks: tuple[int, ...]
    flops: int
    params: int
    error: float


@dataclass
class LayerRecord:
    """One Linear candidate after the statistics pass. FLOPs: 2 per multiply-add, over its calls."""

    name: str
    flops: int
    params: int
    tied: bool  # its weight is shared with another module: decomposing it saves no parameters
    options: list[LayerOption] = field(default_factory=list)


def linears(module: nn.Module, prefix: str, exclude: Sequence[str] = ()) -> list[tuple[str, nn.Module]]:
    """(qualified name, layer) of every nn.Linear (and transformers Conv1D) under ``module``, names prefixed,
    excluded ones and ones carrying hooks of the user's (`hooked_linears`: a factorized layer would not run them)
    left out."""
    found = []
    # The experts of a kept mixture (fxdecomp.kept_experts) stay as kept: planned apart, their FLOPs would follow the routing.
    experts = tuple(f"{name}." for name, child in module.named_modules() if isinstance(child, KeptExperts))
    for name, child in module.named_modules():
        full = ".".join(p for p in (prefix, name) if p)
        if name.startswith(experts):
            continue
        if (isinstance(child, nn.Linear) or is_conv1d(child)) and not any(fnmatch.fnmatchcase(full, p) or full == p for p in exclude):
            if not user_hooks(child):
                found.append((full, child))
    return found


def hooked_linears(model: nn.Module) -> dict[str, list[str]]:
    """{name: hook kinds} of the Linear layers (and Conv1D) of ``model`` that carry hooks of the user's."""
    return {name: kinds for name, child in model.named_modules()
            if (isinstance(child, nn.Linear) or is_conv1d(child)) and (kinds := user_hooks(child))}


class observe:
    """Forward pre-hooks on named Linear layers: record input shapes and/or accumulate input Gram matrices.

    Layers that read the same input tensor (q, k and v projections) share one accumulator.
    """

    def __init__(self, layers: list[tuple[str, nn.Linear]], shapes: dict | None = None, grams: dict | None = None):
        self.layers, self.shapes, self.grams, self.handles = layers, shapes, grams, []
        self._by_input: dict[tuple, tuple[torch.Tensor, GramAccumulator]] = {}

    def __enter__(self) -> "observe":
        for name, linear in self.layers:
            self.handles.append(linear.register_forward_pre_hook(self._hook(name, linear)))
        return self

    def _hook(self, name: str, linear: nn.Linear):
        def hook(module, args):
            x = args[0]
            if self.shapes is not None:
                self.shapes.setdefault(name, []).append(tuple(x.shape))
            if self.grams is not None:
                # The tensor is held with its key, so that no later input can reuse its address.
                key = (x.data_ptr(), tuple(x.shape), x.stride())
                if key not in self._by_input:
                    shared = self.grams.get(name) or GramAccumulator.for_spec(linear_spec(linear)).to(x.device)
                    shared.update(x)
                    self._by_input[key] = (x, shared)
                self.grams[name] = self._by_input[key][1]

        return hook

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        self._by_input.clear()


def linear_spec(layer: nn.Module):
    """The `LinearSpec` of an nn.Linear, or of the Linear a transformers Conv1D computes (its weight is (in, out))."""
    if is_conv1d(layer):
        in_features, out_features = layer.weight.shape
        return LinearSpec(in_features, out_features, layer.bias is not None)
    return layer_spec(layer)


def _factorize(linear: nn.Module, gram: GramAccumulator | None):
    linear = lifted_layer(linear)
    spec, decomposer = layer_spec(linear), get_decomposer("linear", METHOD)
    weight = linear.weight.detach().float()
    if gram is None or gram.count == 0:  # no calibration row reached it (an expert the router skipped): weight-only
        return spec, decomposer, decomposer.factorize(spec, weight)
    return spec, decomposer, decomposer.factorize_whitened(spec, weight, [gram.matrix(0)])


def layer_record(
    name: str, linear: nn.Linear, shapes: list[tuple[int, ...]], gram: GramAccumulator | None, grid: int, tied: bool
) -> LayerRecord:
    """The layer's cost and its options on the plan pass's rank grid (weight-only or whitened errors)."""
    spec, decomposer, state = _factorize(linear, gram)
    with torch.device("meta"):
        dense = nn.Linear(spec.in_features, spec.out_features, bias=spec.has_bias)  # a Conv1D's as the Linear it computes
    keep_flops = sum(module_macs(dense, s) for s in shapes) * FLOPS_PER_MAC
    record = LayerRecord(name, keep_flops, sum(p.numel() for p in linear.parameters()), tied)
    for ranks in rank_grid(decomposer.planning_max_ranks(spec), grid, 1):
        with torch.device("meta"):
            structure = decomposer.structure(spec, ranks)
        flops = sum(module_macs(structure, s) for s in shapes) * FLOPS_PER_MAC
        if flops >= keep_flops and keep_flops:
            continue  # never chosen: costs at least as much as the layer (an expert no row reaches: each option costs 0)
        params = sum(p.numel() for p in structure.parameters())
        record.options.append(LayerOption(ranks, flops, params, decomposer.estimate_error(spec, state, ranks)))
    return record


def solve(records: list[LayerRecord], fraction: float, total: int, scope: str) -> list[LayerOption | None]:
    """One option per layer (None: keep) within ``fraction`` of the FLOPs, least summed squared error.

    ``scope="model"``: of ``total`` (the whole model, what is not a candidate counted
    as fixed); ``"layers"``: of the candidates' FLOPs. Raises `BudgetError` with
    the smallest reachable fraction.
    """
    layers_total = sum(r.flops for r in records)
    base, fixed = (total, total - layers_total) if scope == "model" else (layers_total, 0)
    groups = [[Option(r.flops, 0.0)] + [Option(o.flops, o.error**2 + TIE_BREAK) for o in r.options] for r in records]
    try:
        picks = solve_mckp(groups, fraction * base - fixed)
    except Infeasible as exc:
        smallest = (exc.smallest + fixed) / base
        raise BudgetError(
            f"a FLOP budget of {fraction:g} cannot be reached: the smallest reachable is {smallest:.4f} of the "
            f"{'model' if scope == 'model' else 'candidate layers'}' FLOPs; ask for at least {smallest:.3f}",
            smallest_reachable=smallest,
        ) from None
    return [None if i == 0 else r.options[i - 1] for r, i in zip(records, picks)]


def apply_option(
    root: nn.Module,
    record: LayerRecord,
    linear: nn.Linear,
    option: LayerOption | None,
    gram: GramAccumulator | None,
    factorize: bool = True,
    install: Callable[[str, nn.Module], None] | None = None,
) -> tuple[Decision, nn.Module | None]:
    """Swap the layer at ``record.name`` in ``root`` for its decomposition at the planned ranks.

    ``install(name, module)`` puts the module in place instead (an expert of an opened stack).
    Returns the decision and the new module (None when kept). With ``factorize=False``
    the module has the planned structure but unset factors (another process sends
    them, see `fxdecomp.large.distributed`). ``params_after`` of a tied layer counts
    the factors on top of the weight that stays.
    """
    if option is None:
        decision = Decision(record.name, "linear", "keep", (), record.flops, record.flops, record.params, record.params, 0.0, reason="budget")
        return decision, None
    if factorize:
        spec, decomposer, state = _factorize(linear, gram)
        bias = linear.bias.detach() if linear.bias is not None else None
        module = inherit_trainable(decomposer.build(spec, state, option.ranks, bias, linear.weight), linear)
    else:
        spec, decomposer = linear_spec(linear), get_decomposer("linear", METHOD)
        module = inherit_trainable(decomposer.structure(spec, option.ranks).to(linear.weight.dtype), linear)
    # A KeptLayer (the same children and state-dict keys) keeps the Linear's configuration and answers
    # ``weight.dtype`` for model code that reads it (Mamba's head).
    module = KeptLayer(module, linear, repr(record.name))
    if install is not None:  # an expert of an opened stack (fxdecomp.large.experts): its place is not its name
        install(record.name, module)
    else:
        parent, _, attribute = record.name.rpartition(".")
        setattr(root.get_submodule(parent) if parent else root, attribute, module)
    params_after = option.params + (record.params if record.tied else 0)
    return Decision(record.name, "linear", METHOD, option.ranks, record.flops, option.flops, record.params, params_after, option.error), module


def factorization_cost(linear: nn.Module) -> float:
    """Relative cost of the layer's SVD: in * out * min(in, out)."""
    out_features, in_features = linear.weight.shape  # (in, out) for a Conv1D: the same product
    return float(in_features) * out_features * min(in_features, out_features)
