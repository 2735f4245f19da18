"""Stacked experts in a streamed model: each opened as a Linear module, all experts of a stack tied in the plan.

transformers (5.x) keeps a mixture of experts' weights stacked, ``experts.gate_up_proj`` (E, 2I, H) and
``experts.down_proj`` (E, H, I), or (E, in, out) where the class says ``is_transposed``, in a module made
with its ``use_experts_implementation`` (which sets ``is_transposed``). `compress_sequential` finds its
candidates as modules and their statistics with forward hooks, so `open_stacks` gives each such stack of
a block the form keep mode gives it (`fxdecomp.kept_experts`): a `KeptExperts` child
``<stack>_experts`` whose layer e is an nn.Linear on a view of expert e's slice (no copy), named
``<stack>_expert<e>`` as `fxdecomp.compress` names it. The experts module's ``grouped_mm``
implementation runs those layers through the stack's `AbsentStack`.

In the plan the experts of a stack share one option (`tie`), as in `fxdecomp.planning.tied`: a
stack then costs its rows times one cost per row wherever the router sends them, so the budget holds at
any routing. `close_stacks` puts a stack back as it was where none of its experts is decomposed.

Hand-written: no library exposes a stacked expert as a module.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ..capture.experts import EXPERT_SUFFIX, expert_of
from ..kept_experts import EXPERTS_CHILD, KeptExperts, owner_class, own_stacks
from ..kept_layer import KeptLayer
from .layers import LayerOption, LayerRecord

# The implementation that runs an opened stack's experts as modules (so forward hooks see their rows): transformers'
# grouped matmul, the default. The eager loop reads ``stack[e]`` as a weight, which no hook sees.
IMPLEMENTATIONS = ("grouped_mm",)


@dataclass
class OpenedStack:
    """One stack of a block opened as a `KeptExperts` of nn.Linear views: where it was, and what it was."""

    name: str  # the stack's qualified path, e.g. model.layers.0.mlp.experts.down_proj
    owner: nn.Module
    attribute: str
    parameter: nn.Parameter
    linear_layout: bool  # stored (E, out, in)

    @property
    def experts(self) -> KeptExperts:
        return self.owner._modules[EXPERTS_CHILD.format(self.attribute)]

    def expert_name(self, index: int) -> str:
        return f"{self.name}{EXPERT_SUFFIX}{index}"

    @property
    def expert_names(self) -> list[str]:
        return [self.expert_name(e) for e in range(len(self.experts))]


def stacked_experts(block: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """(owner path, owner, attribute) of every stacked expert weight of ``block`` that `open_stacks` opens: a 3-D
    Parameter of a module made with transformers' ``use_experts_implementation`` set to one of `IMPLEMENTATIONS`."""
    found = []
    for path, module in block.named_modules():
        if not hasattr(module, "is_transposed") or isinstance(module, KeptExperts):
            continue
        if getattr(getattr(module, "config", None), "_experts_implementation", None) not in IMPLEMENTATIONS:
            continue
        for attribute, parameter in module.named_parameters(recurse=False):
            if parameter.dim() == 3 and parameter.shape[0] > 1 and parameter.is_floating_point():
                found.append((path, module, attribute))
    return found


def open_stacks(block: nn.Module, prefix: str) -> list[OpenedStack]:
    """Open every stack `stacked_experts` finds in ``block`` (in place); names are qualified with ``prefix``."""
    opened = []
    for path, owner, attribute in stacked_experts(block):
        parameter = owner._parameters[attribute]
        linear_layout = not owner.is_transposed
        out_features, in_features = parameter.shape[1:] if linear_layout else parameter.shape[:0:-1]
        layers = []
        for e in range(parameter.shape[0]):
            with torch.device("meta"):
                layer = nn.Linear(in_features, out_features, bias=False)
            view = parameter[e] if linear_layout else parameter[e].T
            layer.weight = nn.Parameter(view, requires_grad=parameter.requires_grad)
            layers.append(layer)
        name = ".".join(p for p in (prefix, path, attribute) if p)
        own_stacks(owner, {attribute: KeptExperts(layers, tuple(parameter.shape), linear_layout, repr(name))})
        opened.append(OpenedStack(name, owner, attribute, parameter, linear_layout))
    return opened


def expert_layers(opened: list[OpenedStack], exclude: Sequence[str] = ()) -> list[tuple[str, nn.Module]]:
    """(``<stack>_expert<e>``, nn.Linear) of the opened stacks' experts that are still dense. A stack is left out
    whole where ``exclude`` names its path, its experts module's path or any of its experts: an expert kept dense
    beside tied decomposed ones would cost what the router sends it, which the plan cannot bound."""
    found = []
    for stack in opened:
        names = [stack.name, stack.name.rpartition(".")[0], *stack.expert_names]
        if any(fnmatch.fnmatchcase(name, p) or name == p for p in exclude for name in names):
            continue
        found += [(name, layer) for name, layer in zip(stack.expert_names, stack.experts) if type(layer) is nn.Linear]
    return found


def install_expert(opened: list[OpenedStack], name: str, module: nn.Module) -> None:
    """Put ``module`` (a KeptLayer of expert ``name``'s factors) in its stack's `KeptExperts`."""
    stacks = {s.name: s for s in opened}
    stack, index = expert_of(dict.fromkeys(stacks, True), name)
    stacks[stack].experts[index] = module


def close_stacks(opened: list[OpenedStack], only_dense: bool = True) -> list[OpenedStack]:
    """Put back the stacks none of whose experts is decomposed (all with ``only_dense=False``); returns those left open."""
    left = []
    for stack in reversed(opened):  # an owner with two stacks gets its class back after its last one
        if only_dense and any(isinstance(layer, KeptLayer) for layer in stack.experts):
            left.append(stack)
            continue
        owner = stack.owner
        del owner._modules[EXPERTS_CHILD.format(stack.attribute)]
        owner._parameters[stack.attribute] = stack.parameter
        # The class of the stacks still held as experts (an earlier keep's included), or the module's own.
        held = tuple(n for n in getattr(owner, "_fxdecomp_stacks", ()) if EXPERTS_CHILD.format(n) in owner._modules)
        owner.__class__ = owner_class(owner._fxdecomp_base, held) if held else owner._fxdecomp_base
    return list(reversed(left))


def tie(records: list[LayerRecord], stack_of: dict[str, str]) -> tuple[list[LayerRecord], dict[str, list[str]]]:
    """The records with each stack's experts merged into one record, in the place of its first expert (their FLOPs,
    parameters and squared errors summed, on the ranks every expert offers), and {stack: its experts' names}.

    ``stack_of`` maps an expert's name to its stack's. An expert the example routes no row to has options of 0
    FLOPs (`layer_record` with no calls), so it takes its stack's option and adds its error to it."""
    groups: dict[str, list[LayerRecord]] = {}
    for record in records:
        if record.name in stack_of:
            groups.setdefault(stack_of[record.name], []).append(record)
    placed = {group[0].name: stack for stack, group in groups.items()}
    out = [_merged(placed[r.name], groups[placed[r.name]]) if r.name in placed else r
           for r in records if r.name not in stack_of or r.name in placed]
    return out, {stack: [r.name for r in group] for stack, group in groups.items()}


def _merged(stack: str, group: list[LayerRecord]) -> LayerRecord:
    offered = [{o.ranks: o for o in r.options} for r in group]
    options = [
        LayerOption(ranks, sum(o[ranks].flops for o in offered), sum(o[ranks].params for o in offered),
                    sum(o[ranks].error ** 2 for o in offered) ** 0.5)
        for ranks in offered[0] if all(ranks in o for o in offered)
    ]
    return LayerRecord(stack, sum(r.flops for r in group), sum(r.params for r in group), False, options)


def expand(option: LayerOption | None, record: LayerRecord) -> LayerOption | None:
    """An expert's share of its stack's option: its own option at the stack's ranks (None: kept)."""
    if option is None:
        return None
    return next(o for o in record.options if o.ranks == option.ranks)
