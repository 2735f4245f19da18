"""The correct_factors pass: refit each decomposed layer's last factor and bias to the original layer's outputs.

After the rewrite, for every decomposed layer whose last factor is a Linear or a
Conv2d, one streaming pass over the calibration data accumulates the Gram matrix
of the penultimate factor's outputs and their cross-covariance with the ORIGINAL
layer's outputs; the ridge-regularised normal equations then give the last
factor that best reproduces the original layer on those inputs (Zhang et al.
2015; with ``update = "bias"`` only the bias, Nagel et al. 2019). The ridge is
chosen on held-out samples (two folds) and a refit is kept only if it lowers the
held-out error and the error on all samples (`fxdecomp.factorize.least_squares`);
a layer reproduced exactly (full rank) is left alone.

``inputs = "original"`` (default): the layer's inputs are those of the original
model (each layer matches its own original, independently). ``"compressed"``: the
penultimate outputs come from the rewritten model, so each layer also absorbs the
error of the decomposed layers before it (Zhang et al.'s asymmetric
reconstruction; all layers are fitted on one pass of the uncorrected model).

Switched on in the ``corrected`` recipe; in the others the pass is present with
``enabled = false``: ``load_recipe("default").with_options(correct_factors={"enabled": True})``.
Without calibration data it changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.fx.passes.infra.pass_base import PassResult

from ..capture.experts import expert_of, stacks_of
from ..errors import RecipeError
from ..calibration_batches import calibration_batches
from ..factorize.least_squares import LeastSquaresAccumulator, refit
from ..graph.decomposed import DecomposedLayer, decomposed_layers, factor_rows, refittable
from ..graph.effects import preserved_buffers
from ..records import Corrections, LayerCorrection
from .base import Pass, log, register_pass

INPUTS = ("original", "compressed")


class _Tap(fx.Interpreter):
    """Runs a graph and hands ``(node, its input value, its output)`` of the watched nodes to ``seen``."""

    def __init__(self, gm: fx.GraphModule, watched: dict[fx.Node, object], seen):
        super().__init__(gm)
        self.watched, self.seen = watched, seen

    def run_node(self, node):
        result = super().run_node(node)
        key = self.watched.get(node)
        if key is not None:
            self.seen(node, key, result, self.env)
        return result


@register_pass
class CorrectFactorsPass(Pass):
    name = "correct_factors"
    requires = ("candidates", "plan")
    provides = ("corrections",)
    replays_calibration = True  # compress keeps a generator's batches for it

    @dataclass(frozen=True)
    class Options:
        enabled: bool = True
        inputs: str = "original"  # or "compressed" (asymmetric: the rewritten model's activations)
        update: str = "weight_and_bias"  # or "bias"
        ridge: float = -1.0  # lambda / mean Gram diagonal; negative: chosen on held-out samples
        min_gain: float = 1e-3  # a refit must lower the error by this fraction to be kept
        add_bias: bool = True  # a last factor without bias may get one (never under a params budget)
        max_batches: int = 0  # 0: all calibration batches

    def run(self, gm):
        ctx, options = self.context, self.options
        if options.inputs not in INPUTS or options.update not in ("weight_and_bias", "bias"):
            raise RecipeError(
                f"correct_factors: inputs must be one of {INPUTS} and update 'weight_and_bias' or 'bias', "
                f"got {options.inputs!r}, {options.update!r}"
            )
        if not options.enabled or ctx.calibration is None or ctx.reference is None:
            ctx.provide("corrections", Corrections())
            return PassResult(gm, False)
        layers = [layer for layer in decomposed_layers(gm) if refittable(layer.last_factor(gm))]
        if options.inputs == "compressed":  # the compressed graph routes other tokens to an expert: rows do not pair
            layers = [layer for layer in layers if not expert_of(stacks_of(ctx.reference), layer.name)]
        sites = self._reference_sites(layers)
        layers = [layer for layer in layers if layer.name in sites]
        accumulators = {layer.name: self._accumulator(layer.last_factor(gm)) for layer in layers}
        with torch.no_grad(), preserved_buffers(gm), preserved_buffers(ctx.reference):
            for index, inputs in enumerate(calibration_batches(ctx.calibration, options.max_batches)):
                self._observe(gm, layers, sites, accumulators, inputs, index)
        records, changed = {}, False
        for layer in layers:
            record = self._apply(gm, layer, accumulators[layer.name])
            if record is not None:
                records[layer.name] = record
                changed = changed or record.accepted
        ctx.provide("corrections", Corrections(records))
        gm.meta["fxdecomp.corrections"] = ctx.record("corrections")
        kept = sum(r.accepted for r in records.values())
        log.info("least-squares correction: %d of %d decomposed layers refitted", kept, len(records))
        return PassResult(gm, changed)

    def _reference_sites(self, layers: list[DecomposedLayer]) -> dict[str, list[tuple[fx.Node, int | str]]]:
        """Per layer, its call sites in the reference graph (node, input key), in graph order."""
        nodes = {n.name: n for n in self.context.reference.graph.nodes}
        order = {n: i for i, n in enumerate(self.context.reference.graph.nodes)}
        found = {}
        for layer in layers:
            candidate = self.context.candidates.get(layer.name)
            if candidate is None:
                continue
            sites = [(nodes[s.node.name], s.input_key) for s in candidate.sites if s.node.name in nodes]
            if len(sites) != len(layer.last_nodes):
                log.info("%s: call sites do not match the rewritten graph; not corrected", layer.name)
                continue
            found[layer.name] = sorted(sites, key=lambda site: order[site[0]])
        return found

    @staticmethod
    def _accumulator(factor: nn.Module) -> LeastSquaresAccumulator:
        if isinstance(factor, nn.Linear):
            return LeastSquaresAccumulator(factor.in_features, factor.out_features)
        return LeastSquaresAccumulator(factor.weight[0].numel() * factor.groups, factor.out_channels)

    def _observe(self, gm, layers, sites, accumulators, inputs: tuple, index: int) -> None:
        """One calibration batch: the factor inputs ``z`` (from the reference's layer inputs, or from the
        rewritten graph) against the reference layer's outputs ``y``."""
        penultimate: dict[tuple[str, int], torch.Tensor] = {}
        if self.options.inputs == "compressed":
            watched = {node: (layer.name, k) for layer in layers for k, node in enumerate(layer.last_nodes)}
            _Tap(gm, watched, lambda node, key, _out, env: penultimate.__setitem__(key, env[node.args[0]])).run(*inputs)
        by_name = {layer.name: layer for layer in layers}

        def seen(node, key, output, env):
            name, k = key
            layer = by_name[name]
            if self.options.inputs == "compressed":
                z = penultimate.get(key)
                if z is None:
                    return
            else:
                site_input = node.args[sites[name][k][1]] if isinstance(sites[name][k][1], int) else node.kwargs[sites[name][k][1]]
                z = env[site_input]
                for factor in list(layer.factors(gm))[:-1]:
                    z = factor(z)
            rows, targets, samples = factor_rows(layer.last_factor(gm), z, output)
            folds = (samples + index) % 2
            accumulator = accumulators[name]
            for fold in (0, 1):
                mask = folds == fold
                if bool(mask.any()):
                    accumulator.update(rows[mask], targets[mask], fold)

        watched = {node: (name, k) for name, entries in sites.items() for k, (node, _) in enumerate(entries)}
        _Tap(self.context.reference, watched, seen).run(*inputs)  # the calibrate pass already ran each batch

    def _apply(self, gm, layer: DecomposedLayer, accumulator: LeastSquaresAccumulator) -> LayerCorrection | None:
        """Refit ``layer``'s last factor in place if that lowers its error; None when it cannot be refitted."""
        factor = layer.last_factor(gm)
        options = self.options
        weight = factor.weight.detach()
        bias = factor.bias.detach() if factor.bias is not None else None
        params_budget = self.context.budget is not None and self.context.budget.metric == "params"
        fit_bias = bias is not None or (options.add_bias and not params_budget)
        groups = getattr(factor, "groups", 1)
        if not fit_bias and options.update == "bias":
            return None  # bias-only correction of a layer that may not get a bias
        fit = refit(
            accumulator, weight.reshape(weight.shape[0], -1), bias, groups, options.update, fit_bias,
            ridge=None if options.ridge < 0 else options.ridge, min_gain=options.min_gain,
        )
        energy = max(fit.energy, 1e-300)
        record = LayerCorrection((fit.error_before / energy) ** 0.5, (fit.error_after / energy) ** 0.5, fit.accepted, fit.ridge)
        if fit.accepted:
            with torch.no_grad():
                factor.weight.copy_(fit.weight.reshape(weight.shape))
                if factor.bias is not None:
                    factor.bias.copy_(fit.bias)
                elif fit.bias is not None:
                    factor.bias = nn.Parameter(fit.bias.clone(), requires_grad=factor.weight.requires_grad)
        return record
