"""The find_candidates pass: every Linear and conv weight at its call sites becomes a candidate.

Matching the call forms is `fxdecomp.graph.callsites`; this pass names the candidates,
applies ``exclude``, and notes shared (tied) weights and materialized parametrizations.
"""

from __future__ import annotations

import fnmatch

from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from ..kept_experts import KeptExperts
from ..capture.experts import expert_of, stacks_of
from .. import meta
from ..meta import node_shape
from ..errors import FxDecompError
from ..graph.callsites import WeightUse, match_call, module_aliases, tensor_key, weight_aliases, weight_users
from ..graph.hooks import EXPORT_DROPS, describe, kept_for_hooks, user_hooks
from ..graph.parametrized import notes_of
from ..layer_spec import check_finite, layer_spec
from .base import CallSite, Candidate, Pass, log, register_pass
from ..user_warnings import warn


@register_pass
class FindCandidatesPass(Pass):
    """Every Conv2d / Linear call on a parameter (module or functional form) becomes a candidate.

    Calls of one weight with one layer configuration are one candidate with several
    sites (see `fxdecomp.graph.callsites`). Names: a module call keeps the module's
    path (``features.3``); a functional call is named by its weight: the owner's path
    for a parameter called ``weight`` (``fc`` for ``fc.weight``, as a torch.export
    graph of an nn.Linear holds it), else the parameter's own path (``attn.wq``).
    A tied weight is named the same under both frontends: by the module whose call
    torch.export recorded (its ``nn_module_stack``) when that module holds it, else by its
    first path in the model (``emb`` for an output head computed as ``F.linear(h, emb.weight)``).
    A name already taken gets the full parameter path, then ``@<node name>``.
    ``exclude`` patterns match the name or the owner of any path of the weight.
    """

    name = "find_candidates"
    requires = ("shapes",)
    provides = ("candidates",)

    def run(self, gm):
        ctx = self.context
        by_key: dict[tuple, Candidate] = {}
        refused: dict[str, str] = {}
        hooked: dict[str, list[str]] = {}
        matched: set[str] = set()  # the exclude patterns that name a layer
        aliases, modules = weight_aliases(ctx.source_model), module_aliases(ctx.source_model)
        stacks = stacks_of(gm)
        # A kept mixture compressed again: its experts stay as kept (planned apart, their FLOPs would follow the routing).
        kept_experts = tuple(f"{n}." for n, m in (ctx.source_model.named_modules() if ctx.source_model is not None else ())
                             if isinstance(m, KeptExperts))
        for node in gm.graph.nodes:
            use = match_call(gm, node)
            if use is None:
                continue
            site = CallSite.of(node, use.input_node, node_shape(use.input_node))
            if site.input_shape is None:
                continue
            if use.key in by_key:
                by_key[use.key].sites.append(site)
                continue
            try:
                spec = layer_spec(use.layer)
            except FxDecompError as exc:
                log.info("not a candidate: %s (%s)", use.target, exc)
                refused.setdefault(use.target, str(exc))
                matched |= {p for p in ctx.exclude if fnmatch.fnmatchcase(use.target, p) or use.target == p}
                continue
            paths = aliases.get(use.weight_path, (use.weight_path,))
            name = _candidate_name(use, node, {c.name for c in by_key.values()}, paths, modules)
            check_finite(name, use.layer)
            labels = {name} | {_owner(path) for path in paths}
            stack = expert_of(stacks, name)
            if stack:  # an expert of a stacked weight: excluded by the stack's path or its experts module's too
                labels |= {stack[0], stack[0].rpartition(".")[0]}
            hits = {pattern for pattern in ctx.exclude for label in labels if fnmatch.fnmatchcase(label, pattern) or label == pattern}
            matched |= hits
            excluded = bool(hits)
            excluded = excluded or any(label.startswith(kept_experts) for label in labels)
            kinds = _hooks_of(gm, ctx.source_model, use, paths, node)
            if kinds and not excluded:
                hooked[name] = kinds  # its replacement would not run them
            excluded = excluded or bool(kinds)
            by_key[use.key] = Candidate(name, use.layer, spec, [site], use.form, use.target, excluded, hooks=tuple(kinds))
        ctx.candidates = {c.name: c for c in by_key.values()}
        if unmatched := [p for p in ctx.exclude if p not in matched]:
            names = sorted(c.name for c in ctx.candidates.values())
            warn(
                f"fxdecomp: exclude pattern(s) {unmatched} name no layer of this model, so they exclude nothing; its layers "
                f"are named like {names[:4]} (a wrapped model's names carry the wrapper's prefix: '_orig_mod.' under "
                "torch.compile, 'module.' under DataParallel)"
            )
        if hooked and ctx.frontend == "export":
            warn(
                f"fxdecomp: {len(hooked)} layer(s) carry hooks of yours: {describe(hooked)}. They are kept as they are, but "
                f"the graph torch.export captured (result.graph_module) holds only what forward hooks compute on tensors: "
                f"{EXPORT_DROPS}. result.apply_to(model) returns your model's class, in which kept layers keep their hooks."
            )
        elif hooked:
            warn(kept_for_hooks(hooked, "compress"))
        ctx.provide("refused", refused)
        users = weight_users(gm)
        notes = notes_of(ctx.source_model)
        for candidate in ctx.candidates.values():
            weight = candidate.layer.weight
            others = users.get(tensor_key(weight), set()) - {site.node for site in candidate.sites}
            candidate.shared_params = weight.numel() if others else 0
            candidate.note = notes.get(candidate.target if candidate.form == "function" else f"{candidate.target}.weight", "")
            for site in candidate.sites:
                site.node.meta[meta.CANDIDATE] = candidate.name
        return PassResult(gm, False)


def _hooks_of(gm: fx.GraphModule, source, use: WeightUse, paths: tuple[str, ...], node: fx.Node) -> list[str]:
    """The user's hooks on the module that calls the weight: the called module, or (a functional call, as
    torch.export records an nn.Linear) the innermost module on the call's ``nn_module_stack`` that owns the weight
    under one of its paths (a tied weight: the module that made this call, not every owner)."""
    if use.form == "module":
        return user_hooks(gm.get_submodule(use.target))
    if source is None:
        return []
    owners = [path.rpartition(".")[0] for path in paths if path.rpartition(".")[2] == "weight"]
    callers = [path for path, _ in node.meta.get("nn_module_stack", {}).values()]
    caller = next((path for path in reversed(callers) if path in owners), None)
    kinds: list[str] = []
    for owner in [caller] if caller is not None else owners:
        try:
            kinds += user_hooks(source.get_submodule(owner))
        except AttributeError:
            continue
    return kinds


def _owner(path: str) -> str:
    """``fc`` for ``fc.weight``; any other path is its own name."""
    owner, _, attribute = path.rpartition(".")
    return owner if owner and attribute == "weight" else path


def _candidate_name(use: WeightUse, node: fx.Node, taken: set[str], paths: tuple[str, ...], modules: dict[str, str]) -> str:
    if use.form == "module":
        options = [use.target, f"{use.target}@{node.name}"]
    else:
        options = [_owner(_function_weight_path(use.target, node, paths, modules)), use.target, f"{use.target}@{node.name}"]
    return next(n for n in options if n not in taken)


def _function_weight_path(target: str, node: fx.Node, paths: tuple[str, ...], modules: dict[str, str]) -> str:
    """The path a functional call's weight is named by: the recorded module's (by its first name), else the
    weight's first path (see the pass)."""
    if len(paths) < 2:
        return target
    stack = node.meta.get("nn_module_stack") or {}
    module = next(reversed(stack.values()))[0] if stack else ""
    module = modules.get(module, module)
    return f"{module}.weight" if module and f"{module}.weight" in paths else paths[0]
