"""The rewrite: each decomposed candidate becomes real graph nodes of its factors.

The decomposed module is installed where the layer was (``features.3`` becomes a
Sequential whose children are ``features.3.0``, ``features.3.1``, ...), and each
call site becomes a chain of ``call_module`` nodes, one per factor, carrying
``fxdecomp.decomposed_from``. A layer called twice is decomposed once and both
sites share the factors. Functional calls (``F.linear(x, self.w)``) get their
module next to their weight, which is dropped once nothing reads it.

A plain function: the rewrite pass applies the plan with it, and the planner
uses it on copies of the reference to time or score a variant.
"""

from __future__ import annotations

import operator

from torch import fx, nn

from .. import meta
from ..decomposers.base import inherit_trainable
from ..planning.factors import factorization
from .candidates import Candidate
from .effects import has_side_effect


def rewrite_graph(gm: fx.GraphModule, ctx, plan: dict) -> bool:
    """Apply the decomposed decisions of ``plan`` (name -> Decision) to ``gm`` in place.

    Call sites are found by node name, so ``gm`` may be a copy of the analysed graph.
    """
    decomposed = [c for c in ctx.candidates.values() if plan.get(c.name) is not None and plan[c.name].decomposed]
    if not decomposed:
        return False
    for unused in [n for n in gm.graph.nodes if n.op == "get_attr" and not n.users]:
        # Capture can leave reads of a weight nothing uses (torch.export after a dtype check, as in T5's
        # feed-forward); once the layer is replaced they would name a missing attribute.
        gm.graph.erase_node(unused)
    nodes = {n.name: n for n in gm.graph.nodes}
    for candidate in decomposed:
        decision = plan[candidate.name]
        decomposer, state = factorization(ctx, candidate, decision.method)
        layer = candidate.layer
        bias = layer.bias.detach() if layer.bias is not None else None
        module = inherit_trainable(decomposer.build(candidate.spec, state, decision.ranks, bias, layer.weight), layer)
        if candidate.form == "function" and not isinstance(operator.attrgetter(candidate.target)(gm), nn.Parameter):
            _as_buffers(module)  # a weight the model stores as a buffer: its factors are buffers too
        module.train(layer.training)
        site_nodes = [nodes[s.node.name] for s in candidate.sites]
        path = _install_path(gm, candidate, set(site_nodes))
        for site, node in zip(candidate.sites, site_nodes):
            # Its input read now: an earlier site of this layer may produce it (``conv(conv(x))``).
            _replace_site(gm, *_current(node, site.input_key), path, module, decision)
        _set_submodule(gm, path, module)  # after the old get_attr nodes are gone: it may replace their owner
        gm.meta[meta.DECOMPOSED_SPECS] = {**gm.meta.get(meta.DECOMPOSED_SPECS, {}), candidate.name: candidate.spec}
    gm.graph.eliminate_dead_code(is_impure_node=has_side_effect)  # in-place ops whose result is unused stay
    _drop_unused_attributes(gm)
    gm.delete_all_unused_submodules()
    gm.graph.lint()
    gm.recompile()
    return True


def _current(node: fx.Node, key: int | str) -> tuple[fx.Node, fx.Node]:
    """(call node, its input as it is now): an earlier rewrite may have replaced the producer."""
    return node, node.args[key] if isinstance(key, int) else node.kwargs[key]


def _replace_site(gm: fx.GraphModule, node: fx.Node, value: fx.Node, path: str, module: nn.Module, decision) -> None:
    stages = [f"{path}.{i}" for i in range(len(module))] if isinstance(module, nn.Sequential) else [path]
    with gm.graph.inserting_before(node):
        for index, target in enumerate(stages):
            value = gm.graph.create_node("call_module", target, (value,))  # installed right after
            value.meta[meta.DECOMPOSED_FROM] = meta.Provenance(decision.name, decision.method, decision.ranks, index, path)
            if meta.SHAPE in node.meta and index == len(stages) - 1:
                value.meta[meta.SHAPE] = node.meta[meta.SHAPE]
    node.replace_all_uses_with(value)
    inputs = node.all_input_nodes
    gm.graph.erase_node(node)
    for unused in (n for n in inputs if n.op == "get_attr" and not n.users):
        gm.graph.erase_node(unused)


def _install_path(gm: fx.GraphModule, candidate: Candidate, site_nodes: set[fx.Node]) -> str:
    """Where the decomposed module goes: in the layer's place when nothing else reads it, else beside it."""
    if candidate.form == "module":
        # The graph may read the module's weight for something else (``self.fc.weight.sum()``): the module then stays.
        target = candidate.target
        if not any(
            n.op == "get_attr" and n.target.startswith(target + ".") and any(user not in site_nodes for user in n.users)
            for n in gm.graph.nodes
        ):
            return target
        path = f"{target}_lowrank"
    else:
        owner, _, attribute = candidate.target.rpartition(".")
        still_read = {
            n.target
            for n in gm.graph.nodes
            if n.op == "call_module" or (n.op == "get_attr" and any(user not in site_nodes for user in n.users))
        }
        if owner and not any(t == owner or t.startswith(owner + ".") for t in still_read):
            return owner  # nothing else reads the weight's owner: the decomposed module takes its place
        path = f"{owner}.{attribute}_lowrank" if owner else f"{attribute}_lowrank"
    free, index = path, 2
    while _exists(gm, free):  # the same weight decomposed for another call configuration
        free, index = f"{path}{index}", index + 1
    return free


def _exists(gm: fx.GraphModule, path: str) -> bool:
    try:
        gm.get_submodule(path)
    except AttributeError:
        return False
    return True


def _set_submodule(gm: fx.GraphModule, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = gm.get_submodule(parent_path) if parent_path else gm
    if name in parent._parameters or name in parent._buffers:
        delattr(parent, name)
    setattr(parent, name, module)


def _as_buffers(module: nn.Module) -> None:
    """Every parameter of ``module`` re-registered as a buffer of the same name: not trained, not counted as a
    parameter, still in the state_dict."""
    for sub in module.modules():
        for name, parameter in list(sub._parameters.items()):
            if parameter is not None:
                del sub._parameters[name]
                sub.register_buffer(name, parameter.detach())


def _drop_unused_attributes(gm: fx.GraphModule) -> None:
    """Delete parameters and buffers no node reads any more (the weights of decomposed functional calls)."""
    read = {n.target for n in gm.graph.nodes if n.op in ("get_attr", "call_module")}
    for name, _ in list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False)):
        if any(name == t or name.startswith(t + ".") for t in read):
            continue  # read by a get_attr, or owned by a called module whose forward reads it
        owner_path, _, attribute = name.rpartition(".")
        owner = gm.get_submodule(owner_path) if owner_path else gm
        # Left registered as None, not deleted: a module kept for its weight alone (read by a functional call) still
        # answers its other attributes, as a Conv2d's repr and export read its ``bias``.
        if attribute in owner._parameters:
            owner.register_parameter(attribute, None)
        elif attribute in owner._buffers:
            owner.register_buffer(attribute, None)
