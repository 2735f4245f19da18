"""The calibrate pass: stream calibration batches once and keep each candidate's Gram matrices.

Per candidate it keeps the Gram matrix of the layer's inputs and, when
``output_aware`` (the default), the Gram matrix of random projections of the
gradient that reaches the layer's outputs from the model's outputs (a few
backward passes per batch; see `fxdecomp.calibration`). The second one puts every
layer's error in one unit, the relative change of the model's outputs, so the
planner can compare layers; a model that cannot be differentiated falls back to
input Gram matrices alone, with a warning.

fx graphs are run by an Interpreter that reads each candidate's input as it
passes; torch.export graphs fix the batch size, so their candidates are
observed with hooks on the matching modules of a private copy of the model
instead. Memory is bounded (two Gram matrices per layer); progress goes to
stderr when asked.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.fx.passes.infra.pass_base import PassResult
from torch.utils._pytree import tree_leaves

from ..bn_prior import batchnorm_priors
from ..calibration import GramAccumulator, OutputGramAccumulator
from ..errors import InvalidInputError
from ..progress import Progress
from ..records import CalibrationStats
from .base import Pass, log, register_pass
from ..user_warnings import warn


class _Taps:
    """Zero tensors added to the candidates' outputs during one forward pass: their gradients are the outputs'."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.taps: list[tuple[OutputGramAccumulator, torch.Tensor]] = []

    def tap(self, output: torch.Tensor, gram: OutputGramAccumulator | None) -> torch.Tensor:
        if not self.enabled or gram is None or not output.is_floating_point():
            return output
        probe = torch.zeros_like(output, requires_grad=True)
        self.taps.append((gram, probe))
        return output + probe


def output_tensors(outputs) -> list[torch.Tensor]:
    """The floating-point tensors of a model's outputs (any pytree: tuples, dicts, ModelOutput)."""
    return [t for t in tree_leaves(outputs) if isinstance(t, torch.Tensor) and t.is_floating_point()]


class _GramInterpreter(fx.Interpreter):
    def __init__(self, gm, inputs_by_node, outputs_by_node, taps: _Taps):
        super().__init__(gm)
        self.inputs_by_node, self.outputs_by_node, self.taps = inputs_by_node, outputs_by_node, taps

    def run_node(self, node):
        entry = self.inputs_by_node.get(node)
        if entry is not None:
            gram, input_node = entry
            gram.update(self.env[input_node])
        return self.taps.tap(super().run_node(node), self.outputs_by_node.get(node))


CALIBRATED_KINDS = ("linear", "conv2d")


def _checked_shrinkage(value) -> float | str:
    if value == "auto":
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0.0 <= float(value) <= 1.0:
        return float(value)
    raise InvalidInputError(f"calibrate: shrinkage must be 'auto' or a number in [0, 1], got {value!r}")


@register_pass
class CalibratePass(Pass):
    name = "calibrate"
    requires = ("candidates",)
    provides = ("calibration",)

    @dataclass(frozen=True)
    class Options:
        max_batches: int = 0  # 0: all of them
        output_aware: bool = True  # also the Gram matrices of output gradients (backward passes)
        # Random output projections (backward passes) per batch. Fewer give a noisier output-side Gram matrix,
        # which the plan over-fits: EfficientNet-Lite0 at 0.8 of its FLOPs, unseen photos, 4 / 8 / 16 / 32 probes:
        # top-1 agreement 30.5 / 37.5 / 46.1 / 40.6 %, KL 1.81 / 1.70 / 1.62 / 1.60; MiniLM at 0.6, mean cosine
        # 0.9245 (4) / 0.9290 (16) / 0.9299 (32) (tools/bench_calibration.py). 16 costs 1.4x (MiniLM) to about 2x
        # (EfficientNet-Lite0, 1.7-2.6x over runs) the compress time of 4.
        probes: int = 16
        seed: int = 0  # of the random projections: the result is deterministic
        # Gram matrices shrunk toward their weight-only limit (a scaled identity): "auto" (Ledoit-Wolf,
        # images / sequences as the samples: `fxdecomp.calibration.ledoit_wolf_shrinkage`), a fixed
        # weight in [0, 1], or 0 (none). Input and output-side Gram matrices alike. "auto" by default:
        # on EfficientNet-Lite0 at 0.8 of its FLOPs it lifts unseen-photo agreement from 3 % to 22 %
        # and halves the KL on held-out crops (tools/bench_calibration.py --only efficientnet).
        shrinkage: float | str = "auto"
        # Without calibration data: "batchnorm" measures errors (and fits svd) on the output of the
        # BatchNorm after each conv, with input scales from the one before (`fxdecomp.bn_prior`); "none":
        # plain weight errors.
        weight_prior: str = "none"
        # The planner's damage of an error not measured on the model's outputs: "signal_share" (the default:
        # -log(1 - e^2) times the layer's share of the signal at the residual sum it joins,
        # `fxdecomp.planning.signal_share`), "retained_energy" (-log(1 - e^2),
        # `fxdecomp.planning.damage.retained_energy_damage`) or "squared" (e^2: the flops recipe's, and what
        # `fxdecomp.large.compress_sequential` plans on). Weight-only, default recipe, against e^2:
        # EfficientNet-Lite0 and MiniLM keep far more of their outputs (tools/bench_calibration.py).
        weight_damage: str = "signal_share"

    def run(self, gm):
        ctx = self.context
        if self.options.weight_damage not in ("signal_share", "retained_energy", "squared"):
            raise InvalidInputError(
                f"calibrate: weight_damage must be 'signal_share', 'retained_energy' or 'squared', got {self.options.weight_damage!r}"
            )
        if ctx.calibration is None:
            ctx.provide("calibration", dataclasses.replace(self._prior(gm), weight_damage=self.options.weight_damage))
            return PassResult(gm, False)
        # Input patches (and so whitened errors) are written for Linear and Conv2d only: the other
        # conv kinds (1-d, 3-d, transposed) keep weight-only errors.
        active = [name for name, c in ctx.candidates.items() if not c.excluded and c.kind in CALIBRATED_KINDS]
        shrinkage = _checked_shrinkage(self.options.shrinkage)
        grams = {name: GramAccumulator(ctx.candidates[name].spec) for name in active}
        output_grams = {name: OutputGramAccumulator(ctx.candidates[name].spec) for name in active}
        for accumulator in (*grams.values(), *output_grams.values()):
            accumulator.shrinkage = shrinkage
        self.generator = torch.Generator().manual_seed(self.options.seed)
        self.differentiable = self.options.output_aware and self.options.probes > 0
        self.taps = taps = _Taps(self.differentiable)
        if ctx.frontend == "export":
            forward = self._hooks(grams, output_grams, taps)
        else:
            forward = self._interpreter(gm, grams, output_grams, taps)
        batches = samples = 0
        progress = Progress("calibration batch", None, ctx.progress)
        with progress:
            for batch in ctx.calibration:
                inputs = batch if isinstance(batch, (tuple, list)) else (batch,)
                if not all(isinstance(x, torch.Tensor) for x in inputs):
                    raise InvalidInputError("calibration must yield input tuples (or single tensors) like example_inputs")
                # A batch made under torch.inference_mode cannot be saved for backward: a normal copy can.
                inputs = tuple(x.clone() if x.is_inference() else x for x in inputs)
                self._observe(forward, inputs, batches, output_grams)
                batches += 1
                samples += inputs[0].shape[0] if inputs[0].dim() else 1
                progress.step()
                if self.options.max_batches and batches >= self.options.max_batches:
                    break
        if batches == 0:
            raise InvalidInputError("calibration yielded no batch; pass an iterable of input tuples")
        kept = {name: g for name, g in grams.items() if g.count}
        kept_output = {}
        if self.differentiable:
            # Layers no gradient reached (detached or integer outputs only) keep input-only errors.
            kept_output = {name: g for name, g in output_grams.items() if g.count and g.updates and name in kept}
        ctx.provide("calibration", CalibrationStats(kept, kept_output, weight_damage=self.options.weight_damage))
        # Samples (batch entries: dim 0 of the first input) because few of them cap what calibration can do (README).
        log.info("calibrated %d layers on %d batches, %d samples (output-aware: %s)", len(ctx.grams), batches, samples,
                 self.differentiable)
        return PassResult(gm, False)

    def _prior(self, gm) -> CalibrationStats:
        prior = self.options.weight_prior
        if prior == "none":
            return CalibrationStats()
        if prior != "batchnorm":
            raise InvalidInputError(f"calibrate: weight_prior must be 'batchnorm' or 'none', got {prior!r}")
        grams, output_grams = batchnorm_priors(gm, self.context.candidates)
        log.info("weight-only errors of %d layers weighted by their BatchNorms", len(grams))
        return CalibrationStats(grams, output_grams)

    def _observe(self, forward, inputs, index: int, output_grams) -> None:
        """One forward pass (input Gram matrices), then the probes' backward passes (output Gram matrices)."""
        taps = self.taps
        if self.differentiable:
            taps.taps.clear()
            try:
                with torch.enable_grad():
                    try:
                        outputs = output_tensors(forward(inputs))
                    except RuntimeError as exc:
                        self._run(forward, inputs, index)  # a bad batch raises here; else only autograd failed
                        return self._stop_differentiating(exc)
                    try:
                        self._probe(outputs, taps, output_grams)
                    except RuntimeError as exc:  # in-place ops on saved tensors, ops without a backward, ...
                        self._stop_differentiating(exc)
            finally:
                taps.taps.clear()
        else:
            self._run(forward, inputs, index)

    @staticmethod
    def _run(forward, inputs, index: int) -> None:
        try:
            with torch.no_grad():
                forward(inputs)
        except (RuntimeError, TypeError, ValueError, IndexError) as exc:
            raise InvalidInputError(
                f"calibration batch {index} does not run through the model ({type(exc).__name__}: {exc}); "
                "calibration must yield input tuples shaped like example_inputs"
            ) from exc

    def _stop_differentiating(self, exc: Exception) -> None:
        warn(
            f"fxdecomp: the model cannot be differentiated for output-aware calibration ({exc}); "
            "layer errors are measured on their own outputs instead"
        )
        self.differentiable = self.taps.enabled = False

    def _probe(self, outputs: list[torch.Tensor], taps: _Taps, output_grams) -> None:
        outputs = [t for t in outputs if t.requires_grad]
        if not outputs or not taps.taps:
            return
        probes = [p for _, p in taps.taps]
        for k in range(self.options.probes):
            # Each output counts by its relative change: v . y / ||y|| with v standard normal.
            projection = sum(
                (torch.randn(t.shape, generator=self.generator, dtype=t.dtype) * t).sum() / t.detach().norm().clamp_min(1e-30)
                for t in outputs
            )
            gradients = torch.autograd.grad(projection, probes, retain_graph=k + 1 < self.options.probes, allow_unused=True)
            for (gram, _), gradient in zip(taps.taps, gradients):
                if gradient is not None:
                    gram.update(gradient)
            for gram in output_grams.values():
                gram.end_probe()

    def _interpreter(self, gm, grams, output_grams, taps):
        inputs_by_node, outputs_by_node = {}, {}
        for name, candidate in self.context.candidates.items():
            if name in grams:
                for site in candidate.sites:
                    inputs_by_node[site.node] = (grams[name], site.input_node)
                    outputs_by_node[site.node] = output_grams[name]
        interpreter = _GramInterpreter(gm, inputs_by_node, outputs_by_node, taps)
        return lambda inputs: interpreter.run(*inputs)

    def _hooks(self, grams, output_grams, taps):
        model = self.context.source_model
        modules = dict(model.named_modules())
        for name, gram in grams.items():
            candidate = self.context.candidates[name]
            module = modules.get(name)
            if not isinstance(module, (nn.Linear, nn.Conv2d)) or module.weight.shape != candidate.layer.weight.shape:
                log.info("%s: no module to observe; its error stays weight-only", name)
                continue
            module.register_forward_pre_hook(lambda _m, args, gram=gram: gram.update(args[0]))
            module.register_forward_hook(lambda _m, _args, out, g=output_grams[name]: taps.tap(out, g))
        return lambda inputs: model(*inputs)
