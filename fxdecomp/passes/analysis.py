"""Analysis passes: shapes, candidate layers, FLOPs and parameters, rank estimates.

They write ``node.meta`` (keys in `fxdecomp.meta`) and the pass context; none
changes the graph.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.fx.passes.infra.pass_base import PassResult
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from .. import meta
from ..calibration import OutputErrorMeter, output_energy, output_whitening
from ..cost import FLOPS_PER_MAC, count_flops, count_params, spec_macs
from ..decomposers import get_decomposer, methods_for
from ..errors import FxDecompError
from ..graph.callsites import CONV_FUNCTIONS, LINEAR_FUNCTIONS, WeightUse, match_call, tensor_key, weight_users  # noqa: F401 (re-exported)
from ..graph.effects import fresh_inputs, preserved_buffers
from ..graph.parametrized import notes_of
from ..layer_spec import check_finite, layer_spec
from ..ranks import rule_ranks, vbmf_rank_of_spectrum
from .base import CallSite, Candidate, Pass, log, register_pass


def node_shape(node) -> tuple[int, ...] | None:
    if not isinstance(node, fx.Node):
        return None
    return node.meta.get(meta.SHAPE)


@register_pass
class ShapePass(Pass):
    """Record every node's output shape (ShapeProp, or torch.export's own metadata)."""

    name = "shape_prop"

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
    """(form, target, layer, input node) if ``node`` is a Conv2d or Linear call on parameters (see `match_call`)."""
    use = match_call(gm, node)
    return None if use is None else (use.form, use.target, use.layer, use.input_node)


@register_pass
class CostPass(Pass):
    """FLOPs of the whole model (aten level, `count_flops`) and of each candidate call (the cost model)."""

    name = "annotate_cost"

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

    @dataclass(frozen=True)
    class Options:
        methods: tuple[str, ...] = ("svd", "tucker2")

    def run(self, gm):
        ctx = self.context
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
        return PassResult(gm, False)


def factorization(ctx, candidate: Candidate, method: str):
    """(decomposer, state) for a candidate and method, computed once per compress call; state None if n/a.

    With calibration data, data-aware decomposers (svd) factorise the whitened weight
    (on both sides when the calibration was output-aware).
    """
    gram = ctx.grams.get(candidate.name)
    key = (candidate.name, method, gram is not None)
    if key not in ctx.states:
        decomposer = get_decomposer(candidate.kind, method) if method in methods_for(candidate.kind) else None
        state = None
        if decomposer is not None:
            weight = candidate.layer.weight.detach()
            try:
                decomposer.check(candidate.spec)
                if gram is not None and decomposer.data_aware:
                    state = decomposer.factorize_whitened(
                        candidate.spec, weight, _gram_matrices(gram), output_weights(ctx, candidate)
                    )
                else:
                    state = decomposer.factorize(candidate.spec, weight)
            except FxDecompError as exc:
                log.info("%s: %s does not apply (%s)", candidate.name, method, exc)
        ctx.states[key] = (decomposer, state)
    return ctx.states[key]


def _gram_matrices(gram) -> list[torch.Tensor]:
    return [gram.matrix(g) for g in range(gram.groups)]


def _output_gram_matrices(ctx, candidate: Candidate) -> list[torch.Tensor] | None:
    output_gram = ctx.output_grams.get(candidate.name)
    return _gram_matrices(output_gram) if output_gram is not None else None


def output_weights(ctx, candidate: Candidate) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """(H^(1/2), H^(-1/2)) per group of the candidate's output Gram matrices, computed once; None without."""
    cache = ctx.extras.setdefault("output_weights", {})
    if candidate.name not in cache:
        output_grams = _output_gram_matrices(ctx, candidate)
        cache[candidate.name] = [output_whitening(h) for h in output_grams] if output_grams else None
    return cache[candidate.name]


def predicted_error(ctx, candidate: Candidate, method: str, ranks: tuple[int, ...]) -> float:
    """The layer's predicted relative output error: on the calibration data when there is some, else of the weight.

    With output-aware calibration the error is relative to `output_energy` (the
    layer's output energy as the model's outputs see it), for every method.
    """
    decomposer, state = factorization(ctx, candidate, method)
    gram = ctx.grams.get(candidate.name)
    if gram is None or decomposer.data_aware:
        return decomposer.estimate_error(candidate.spec, state, ranks)
    weight_blocks = weight_matrices(candidate.spec, candidate.layer.weight.detach())
    meter = ctx.error_meters.get(candidate.name)
    if meter is None:
        weights = output_weights(ctx, candidate)
        meter = OutputErrorMeter(_gram_matrices(gram), weight_blocks, output_sqrt=[w[0] for w in weights] if weights else None)
        ctx.error_meters[candidate.name] = meter
    dense = decomposer.estimate_reconstruct(candidate.spec, state, ranks)
    return meter.relative_error(weight_blocks, weight_matrices(candidate.spec, dense))


def output_energies(ctx) -> dict[str, float]:
    """Per candidate with output-aware calibration: tr(W G W^T H), what its relative errors are relative to.

    A relative error e of layer l then changes the model's outputs by about
    e^2 * energy_l (relative squared change, summed over the outputs), so the
    planner can add damages across layers. Empty without output-aware calibration.
    """
    if "output_energies" not in ctx.extras:
        energies = {}
        for name, candidate in ctx.candidates.items():
            output_grams = _output_gram_matrices(ctx, candidate)
            if output_grams is not None and name in ctx.grams:
                blocks = weight_matrices(candidate.spec, candidate.layer.weight.detach())
                energies[name] = output_energy(blocks, _gram_matrices(ctx.grams[name]), output_grams)
        ctx.extras["output_energies"] = energies
    return ctx.extras["output_energies"]


def weight_matrices(spec, weight: torch.Tensor) -> list[torch.Tensor]:
    """The weight as one matrix per group: (out, in) for Linear, the lowered (T/g, S/g*kh*kw) for Conv2d."""
    if spec.kind == "linear":
        return [weight]
    return [block.reshape(block.shape[0], -1) for block in weight.split(spec.out_per_group, dim=0)]
