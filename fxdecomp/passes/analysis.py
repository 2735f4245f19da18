"""Analysis passes: shapes, candidate layers, FLOPs and parameters, rank estimates.

They write ``node.meta`` (keys in `fxdecomp.meta`) and their records in the pass
context (`fxdecomp.records`); none changes the graph. The factorisation cache
and the damage model they used to hold are in `fxdecomp.planning.factors` and
`fxdecomp.planning.damage` (re-exported here for old imports).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.fx.passes.infra.pass_base import PassResult
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from .. import meta
from ..cost import FLOPS_PER_MAC, count_flops, count_params, spec_macs
from ..errors import FxDecompError
from ..graph.callsites import CONV_FUNCTIONS, LINEAR_FUNCTIONS, WeightUse, match_call, tensor_key, weight_users  # noqa: F401 (re-exported)
from ..graph.effects import fresh_inputs, preserved_buffers
from ..graph.parametrized import notes_of
from ..layer_spec import check_finite, layer_spec
from ..planning.damage import output_energies, predicted_error, weight_matrices  # noqa: F401  (re-exported)
from ..planning.factors import factorization, output_weights  # noqa: F401  (re-exported)
from ..ranks import rule_ranks, vbmf_rank_of_spectrum
from ..records import NodeShapes, RankEstimates
from .base import CallSite, Candidate, Pass, log, register_pass


def node_shape(node) -> tuple[int, ...] | None:
    if not isinstance(node, fx.Node):
        return None
    return node.meta.get(meta.SHAPE)


@register_pass
class ShapePass(Pass):
    """Record every node's output shape (ShapeProp, or torch.export's own metadata)."""

    name = "shape_prop"
    provides = ("shapes",)

    def run(self, gm):
        if not all("val" in n.meta for n in gm.graph.nodes if n.op not in ("output", "placeholder")):
            with preserved_buffers(gm):
                ShapeProp(gm).propagate(*fresh_inputs(self.context.example_inputs))
        for node in gm.graph.nodes:
            value = node.meta.get("val", node.meta.get("tensor_meta"))
            if isinstance(value, (list, tuple)) and value and not isinstance(value, TensorMetadata):
                value = value[0]  # first output of a multi-output node
            shape = getattr(value, "shape", None)
            if shape is not None:
                node.meta[meta.SHAPE] = tuple(int(d) for d in shape)
        self.context.provide("shapes", NodeShapes({n.name: n.meta[meta.SHAPE] for n in gm.graph.nodes if meta.SHAPE in n.meta}))
        return PassResult(gm, False)


@register_pass
class FindCandidatesPass(Pass):
    """Every Conv2d / Linear call on a parameter (module or functional form) becomes a candidate.

    Calls of one weight with one layer configuration are one candidate with several
    sites (see `fxdecomp.graph.callsites`). Names: a module call keeps the module's
    path (``features.3``); a functional call is named by its weight: the owner's path
    for a parameter called ``weight`` (``fc`` for ``fc.weight``, as a torch.export
    graph of an nn.Linear holds it), else the parameter's own path (``attn.wq``).
    A name already taken gets the full parameter path, then ``@<node name>``.
    """

    name = "find_candidates"
    requires = ("shapes",)
    provides = ("candidates",)

    def run(self, gm):
        ctx = self.context
        by_key: dict[tuple, Candidate] = {}
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
                continue
            name = _candidate_name(use, node, {c.name for c in by_key.values()})
            check_finite(name, use.layer)
            excluded = any(fnmatch.fnmatchcase(name, pattern) or name == pattern for pattern in ctx.exclude)
            by_key[use.key] = Candidate(name, use.layer, spec, [site], use.form, use.target, excluded)
        ctx.candidates = {c.name: c for c in by_key.values()}
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


def _candidate_name(use: WeightUse, node: fx.Node, taken: set[str]) -> str:
    if use.form == "module":
        options = [use.target, f"{use.target}@{node.name}"]
    else:
        owner, _, attribute = use.target.rpartition(".")
        options = [owner if owner and attribute == "weight" else use.target, use.target, f"{use.target}@{node.name}"]
    return next(n for n in options if n not in taken)


def _match(gm: fx.GraphModule, node: fx.Node):
    """(form, target, layer, input node) if ``node`` is a Linear or conv call on parameters (see `match_call`)."""
    use = match_call(gm, node)
    return None if use is None else (use.form, use.target, use.layer, use.input_node)


@register_pass
class CostPass(Pass):
    """FLOPs of the whole model (aten level, `count_flops`) and of each candidate call (the cost model)."""

    name = "annotate_cost"
    requires = ("candidates",)
    provides = ("cost",)

    def run(self, gm):
        ctx = self.context
        ctx.flops_before = count_flops(gm, ctx.example_inputs)
        ctx.params_before = count_params(gm)
        candidate_flops = 0
        for candidate in ctx.candidates.values():
            params = count_params(candidate.layer)
            for site in candidate.sites:
                flops = spec_macs(candidate.spec, site.input_shape) * FLOPS_PER_MAC
                site.node.meta[meta.FLOPS] = meta.NodeCost(flops, params)
                candidate_flops += flops
        if candidate_flops > ctx.flops_before:  # both count 2 per multiply-add of the same aten ops
            log.warning("the candidates' %d FLOPs exceed the model's %d: a counting bug, please report it", candidate_flops, ctx.flops_before)
        return PassResult(gm, False)


@register_pass
class RankEstimatePass(Pass):
    """VBMF and energy rank estimates per candidate and method (from the cached factorisations)."""

    name = "estimate_ranks"
    requires = ("candidates",)
    provides = ("rank_estimates",)

    @dataclass(frozen=True)
    class Options:
        methods: tuple[str, ...] = ("svd", "tucker2")

    def run(self, gm):
        ctx = self.context
        by_candidate = {}
        for candidate in ctx.candidates.values():
            estimates = {}
            for method in self.options.methods:
                decomposer, state = factorization(ctx, candidate, method)
                if state is None:
                    continue
                spectra = decomposer.rank_spectra(candidate.spec, state)
                maxima = decomposer.max_ranks(candidate.spec)
                estimates[method] = meta.RankEstimate(
                    method,
                    maxima,
                    rule_ranks(spectra, maxima, vbmf_rank_of_spectrum),
                    rule_ranks(spectra, maxima, lambda s: s.energy_rank(0.9)),
                    rule_ranks(spectra, maxima, lambda s: s.energy_rank(0.99)),
                )
            for site in candidate.sites:
                site.node.meta[meta.RANK] = estimates
            by_candidate[candidate.name] = estimates
        ctx.provide("rank_estimates", RankEstimates(by_candidate))
        return PassResult(gm, False)
