"""Analysis passes: shapes, candidate layers, FLOPs and parameters, rank estimates.

They write ``node.meta`` (keys in `fxdecomp.meta`) and the pass context; none
changes the graph.
"""

from __future__ import annotations

import fnmatch
import operator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.infra.pass_base import PassResult
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from .. import meta
from ..calibration import OutputErrorMeter, output_energy, output_whitening
from ..cost import FLOPS_PER_MAC, count_flops, count_params, spec_macs
from ..decomposers import get_decomposer, methods_for
from ..errors import FxDecompError
from ..layer_spec import check_finite, layer_spec
from ..ranks import rule_ranks, vbmf_rank_of_spectrum
from ..transformers_layers import as_linear, is_conv1d
from .base import CallSite, Candidate, Pass, log, register_pass

aten = torch.ops.aten
CONV_FUNCTIONS = {F.conv2d, torch.conv2d, aten.conv2d.default, aten.conv2d.padding}
LINEAR_FUNCTIONS = {F.linear, aten.linear.default}
ADDMM_FUNCTIONS = {torch.addmm, aten.addmm.default}
MATMUL_FUNCTIONS = {torch.matmul, operator.matmul, torch.mm, aten.matmul.default, aten.mm.default}
TRANSPOSES = {"t", torch.t, aten.t.default}


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
            ShapeProp(gm).propagate(*self.context.example_inputs)
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
    """Every Conv2d / Linear call (module or functional, on a parameter) becomes a candidate."""

    name = "find_candidates"

    def run(self, gm):
        ctx = self.context
        by_target: dict[str, Candidate] = {}
        for node in gm.graph.nodes:
            found = _match(gm, node)
            if found is None:
                continue
            form, target, layer, input_node = found
            site = CallSite.of(node, input_node, node_shape(input_node))
            if site.input_shape is None:
                continue
            if target in by_target:
                by_target[target].sites.append(site)
                continue
            try:
                spec = layer_spec(layer)
            except FxDecompError as exc:
                log.info("not a candidate: %s (%s)", target, exc)
                continue
            name = target if form == "module" else target.rsplit(".", 1)[0] if "." in target else target
            check_finite(name, layer)
            excluded = any(fnmatch.fnmatchcase(name, pattern) or name == pattern for pattern in ctx.exclude)
            by_target[target] = Candidate(name, layer, spec, [site], form, target, excluded)
        ctx.candidates = {c.name: c for c in by_target.values()}
        for candidate in ctx.candidates.values():
            for site in candidate.sites:
                site.node.meta[meta.CANDIDATE] = candidate.name
        return PassResult(gm, False)


def _match(gm: fx.GraphModule, node: fx.Node):
    """(form, target, layer, input node) if ``node`` is a Conv2d or Linear call on parameters."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if isinstance(module, (nn.Conv2d, nn.Linear)) and node.args:
            return "module", node.target, module, node.args[0]
        if is_conv1d(module) and node.args:  # transformers' Conv1D: a Linear with its weight stored (in, out)
            return "module", node.target, as_linear(module), node.args[0]
        return None
    if node.op != "call_function":
        return None
    args = list(node.args)
    if node.target in CONV_FUNCTIONS:
        names = ["input", "weight", "bias", "stride", "padding", "dilation", "groups"]
        values = dict(zip(names, args)) | dict(node.kwargs)
        weight = _attr(gm, values.get("weight"))
        bias = _attr(gm, values.get("bias")) if values.get("bias") is not None else None
        if weight is None or weight[1].dim() != 4 or (values.get("bias") is not None and bias is None):
            return None
        layer = _lifted_conv(weight[1], bias[1] if bias else None, values)
        return "function", weight[0], layer, values["input"]
    if node.target in LINEAR_FUNCTIONS:
        values = dict(zip(["input", "weight", "bias"], args)) | dict(node.kwargs)
        weight = _attr(gm, values.get("weight"))
        bias = _attr(gm, values.get("bias")) if values.get("bias") is not None else None
        if weight is None or weight[1].dim() != 2 or (values.get("bias") is not None and bias is None):
            return None
        return "function", weight[0], _lifted_linear(weight[1], bias[1] if bias else None), values["input"]
    if node.target in ADDMM_FUNCTIONS and len(args) >= 3 and node.kwargs.get("beta", 1) == 1 and node.kwargs.get("alpha", 1) == 1:
        bias, weight = _attr(gm, args[0]), _transposed_attr(gm, args[2])
        if bias is None or weight is None or bias[1].dim() != 1:
            return None
        return "function", weight[0], _lifted_linear(weight[1], bias[1]), args[1]
    if node.target in MATMUL_FUNCTIONS and len(args) == 2:
        weight = _transposed_attr(gm, args[1])
        if weight is None or node_shape(args[0]) is None or len(node_shape(args[0])) < 2:
            return None
        return "function", weight[0], _lifted_linear(weight[1], None), args[0]
    return None


def _attr(gm: fx.GraphModule, node) -> tuple[str, torch.Tensor] | None:
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    value = operator.attrgetter(node.target)(gm)
    return (node.target, value) if isinstance(value, torch.Tensor) else None


def _transposed_attr(gm: fx.GraphModule, node) -> tuple[str, torch.Tensor] | None:
    """The Linear weight (out, in) behind a matmul's right operand: W.t() or a stored (in, out) matrix."""
    if isinstance(node, fx.Node) and node.op in ("call_method", "call_function") and node.target in TRANSPOSES:
        found = _attr(gm, node.args[0])
        return found if found is not None and found[1].dim() == 2 else None
    found = _attr(gm, node)
    if found is None or found[1].dim() != 2:
        return None
    return found[0], found[1].T


def _lifted_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    layer.weight = nn.Parameter(weight.detach(), requires_grad=False)
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach(), requires_grad=False)
    return layer


def _lifted_conv(weight: torch.Tensor, bias: torch.Tensor | None, values: dict) -> nn.Conv2d:
    groups = int(values.get("groups", 1))
    layer = nn.Conv2d(
        weight.shape[1] * groups,
        weight.shape[0],
        tuple(weight.shape[2:]),
        stride=values.get("stride", 1),
        padding=values.get("padding", 0),
        dilation=values.get("dilation", 1),
        groups=groups,
        bias=bias is not None,
        device="meta",
    )
    layer.weight = nn.Parameter(weight.detach(), requires_grad=False)
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach(), requires_grad=False)
    return layer


@register_pass
class CostPass(Pass):
    """FLOPs of the whole model (fvcore) and of each candidate call (the cost model), cross-checked."""

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
        if candidate_flops > ctx.flops_before:
            # fvcore missed some op our cost model counts: trust the larger, explicit count.
            log.warning("fvcore counted %d FLOPs, fewer than the candidates' %d; using the latter", ctx.flops_before, candidate_flops)
            ctx.flops_before = candidate_flops
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
