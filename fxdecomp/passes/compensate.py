"""The compensate pass: refit each planned layer on the inputs of the already compressed layers before it.

After the plan, the layers to decompose are taken in data-flow order (waves of
layers that do not feed each other, `fxdecomp.graph.waves`). For each wave the
calibration batches run through the original graph and through a private copy in
which the earlier waves are already decomposed; per layer it keeps the Gram
matrix of its compressed-model inputs X_hat and the cross-Gram matrix with its
original inputs X (`fxdecomp.planning.compensation.PairedGram`), and refits its
factors at the planned ranks to minimise ||W X - B X_hat||^2 (+ a small ridge
toward W): the closed-form whitened SVD for ``svd`` (two-sided with the calibrate
pass's output Gram matrices when ``output_aware``), the same whitened fit for any
other data-aware method, and for weight-only methods the Frobenius fit of the
compensated weight B*. The ridge is chosen per layer on held-out batches (every
other batch, ``select``): factors fitted on the others at each ridge of
`DAMPINGS`, and the plan's own factors, are scored by ||W X - B X_hat||^2 on the
held-out ones; the best ridge is refitted on all batches, or the plan's factors
stay if they score best (with one batch: the ``damping`` ridge, kept only if it
beats the plan's factors on the calibration data). The refitted factorisations
replace the plan's in the factorisation cache, so the rewrite pass builds them;
this pass never changes the graph.

It is off unless ``enabled`` (recipe ``compensated``, or
``load_recipe("default").with_options(compensate={"enabled": True})``) and is a
no-op without calibration data. Compensated kinds: Linear and Conv2d (the others
keep the plan's factors, applied in their turn). Memory: two d x d float64
matrices per layer of one wave (waves are split to stay under ``wave_bytes``),
plus one batch's inputs of those layers; cost: one pass of the calibration data
through both graphs per wave (each run stops after the wave's last layer).
Everything runs in eval mode (training flags restored after). A one-shot
iterator of calibration batches is kept (inputs only) for the later passes
(``replays_calibration``: `fxdecomp.calibration_batches.replayable`).

Source: Zhang et al. 2015, "Accelerating very deep convolutional networks for
classification and detection" (asymmetric reconstruction); the sequential
calibration of GPTQ (Frantar et al. 2023) and SVD-LLM (Wang et al. 2024).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from dataclasses import dataclass

import torch
from torch import fx
from torch.fx.passes.infra.pass_base import PassResult

from ..capture.experts import expert_of, stacks_of
from ..calibration import DAMPING
from ..errors import FxDecompError, InvalidInputError
from ..graph.rewrite import rewrite_graph
from ..graph.waves import candidate_waves
from ..planning.compensation import PairedGram
from ..planning.factors import factorization, fitted_to_data, output_gram_matrices, output_weights, store_factorization
from ..progress import Progress
from ..records import Plan
from ..sketch import MAX_DENSE_DIM
from .base import Pass, log, register_pass
from ..user_warnings import warn

COMPENSATED_KINDS = ("linear", "conv2d")
DAMPINGS = (1e-3, 1e-2, 1e-1, 1.0, 10.0)  # ridges tried on held-out batches, times the mean diagonal of X_hat's Gram


@register_pass
class CompensatePass(Pass):
    name = "compensate"
    requires = ("candidates", "plan")
    replays_calibration = True  # compress keeps a generator's batches for it

    @dataclass(frozen=True)
    class Options:
        enabled: bool = False  # on in the "compensated" recipe
        max_batches: int = 0  # calibration batches per wave; 0: all of them
        damping: float = DAMPING  # ridge toward the original weight, times the mean diagonal of X_hat's Gram
        select: bool = True  # choose the ridge among DAMPINGS on held-out batches (every other one); needs 2+ batches
        output_aware: bool = True  # weight outputs by the calibrate pass's output Gram matrices where it kept them
        wave_bytes: int = 1 << 30  # most bytes of Gram matrices held at once

    def run(self, gm):
        ctx = self.context
        if not self.options.enabled:
            return PassResult(gm, False)
        if ctx.calibration is None:
            log.info("compensate: no calibration data, nothing to compensate")
            return PassResult(gm, False)
        decided = [n for n, d in ctx.plan.decisions.items() if d.decomposed and n in ctx.candidates]
        if not decided:
            return PassResult(gm, False)
        sites = {n: [s.node.name for s in ctx.candidates[n].sites] for n in decided}
        waves = [chunk for wave in candidate_waves(gm.graph, sites) for chunk in self._split(wave)]
        reference = ctx.reference if ctx.reference is not None else gm
        work = copy.deepcopy(gm)
        refitted: dict[str, float] = {}  # name -> the ridge its refit used
        with _evaluating(reference, work), Progress("compensating wave", len(waves), ctx.progress) as progress:
            for wave in waves:
                progress.step(wave[0])
                grams = {n: PairedGram(ctx.candidates[n].spec, self.options.damping) for n in wave if self._compensable(n)}
                if grams and not self._observe(reference, work, grams):
                    break
                for name in wave:
                    ridge = self._refit(name, grams.pop(name)) if name in grams else None
                    if ridge is not None:
                        refitted[name] = ridge
                rewrite_graph(work, ctx, {n: ctx.plan.decisions[n] for n in wave})
        log.info("compensate: %d of %d decomposed layers refitted on the compressed model's inputs", len(refitted), len(decided))
        # The decisions stay; their notes say which layers were refitted (the plan record, annotated).
        decisions = dict(ctx.plan.decisions)
        for name, ridge in refitted.items():
            note = f"refitted on the compressed model's inputs (ridge {ridge:g})"
            decisions[name] = dataclasses.replace(decisions[name], note="; ".join(filter(None, (decisions[name].note, note))))
        ctx.provide("plan", Plan(decisions))
        return PassResult(gm, False)

    def _compensable(self, name: str) -> bool:
        spec = self.context.candidates[name].spec
        if spec.kind not in COMPENSATED_KINDS:
            return False
        if expert_of(stacks_of(self.context.reference), name):
            # The compressed graph routes other tokens to an expert than the original: its rows do not pair.
            log.info("compensate: %s is an expert of a mixture; it keeps the plan's factors", name)
            return False
        if PairedGram.dimension(spec) > MAX_DENSE_DIM:
            log.info("compensate: %s has too many inputs for dense Gram matrices; it keeps the plan's factors", name)
            return False
        return True

    def _split(self, wave: list[str]) -> list[list[str]]:
        """The wave in chunks whose Gram matrices fit in ``wave_bytes`` (at least one layer each)."""
        chunks, size = [[]], 0
        for name in wave:
            need = PairedGram.dense_size(self.context.candidates[name].spec)
            if chunks[-1] and size + need > self.options.wave_bytes:
                chunks.append([])
                size = 0
            chunks[-1].append(name)
            size += need
        return chunks

    def _observe(self, reference: fx.GraphModule, work: fx.GraphModule, grams: dict[str, PairedGram]) -> bool:
        """Stream the batches through both graphs, pairing each layer's inputs; False (with a warning) if they do not run."""
        ctx = self.context
        keys = {s.node.name: (name, s.input_key) for name in grams for s in ctx.candidates[name].sites}
        original, compressed = _InputTap(reference, keys), _InputTap(work, keys)
        batches = 0
        with torch.no_grad():
            for batch in ctx.calibration:
                inputs = tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)
                try:
                    seen = original.inputs(inputs)
                    for site, x_hat in compressed.inputs(inputs).items():
                        grams[keys[site][0]].update(seen[site], x_hat, held_out=self.options.select and batches % 2 == 1)
                except (RuntimeError, TypeError, ValueError, IndexError) as exc:
                    warn(
                        f"fxdecomp: calibration batch {batches} does not run through the captured graph "
                        f"({type(exc).__name__}: {exc}); layers not yet refitted keep the plan's factors. Give "
                        "calibration batches shaped like example_inputs to compensate every layer"
                    )
                    return False
                batches += 1
                if self.options.max_batches and batches >= self.options.max_batches:
                    break
        if batches == 0:
            raise InvalidInputError("calibration yielded no batch to compensate with; pass a list of input tuples")
        return True

    def _refit(self, name: str, paired: PairedGram) -> float | None:
        """Store the layer's compensated factorisation unless the plan's does better; the ridge used if stored, else None.

        With held-out batches, the ridge is chosen among `DAMPINGS` (and the plan's own factors) by
        the error on them of factors fitted on the other batches; then refitted on all of them.
        """
        ctx = self.context
        candidate, decision = ctx.candidates[name], ctx.plan.decisions[name]
        decomposer, planned = factorization(ctx, candidate, decision.method)
        if planned is None or paired.count + paired.held_count == 0:
            return None
        spec, ranks, weight = candidate.spec, decision.ranks, candidate.layer.weight.detach()
        aware = self.options.output_aware
        weights, heavy = (output_weights(ctx, candidate), output_gram_matrices(ctx, candidate)) if aware else (None, None)
        fitted = fitted_to_data(ctx, candidate, decision.method)  # as the plan's factors are (the plan pass's `fit`)

        def fit(damping: float, part: str):
            target, grams = paired.target(weight, damping, part)
            if fitted and decomposer.can_fit(spec, grams):
                state = decomposer.factorize_whitened(spec, target, grams, weights)
            else:
                state = decomposer.factorize(spec, target)
            return state, target, grams

        try:
            damping, selected = self.options.damping, self.options.select and paired.count and paired.held_count
            if selected:
                scores = {d: paired.held_error(weight, decomposer.reconstruct(spec, fit(d, "fit")[0], ranks), heavy) for d in DAMPINGS}
                damping = min(scores, key=scores.get)
                if paired.held_error(weight, decomposer.reconstruct(spec, planned, ranks), heavy) <= scores[damping]:
                    log.info("compensate: %s keeps the plan's factors (better on held-out batches)", name)
                    return None
            state, target, grams = fit(damping, "all")
        except FxDecompError as exc:
            log.info("compensate: %s keeps the plan's factors (%s)", name, exc)
            return None
        if not selected:  # no held-out batches: keep the refit only if it beats the plan's factors on its own objective
            new = paired.error(target, decomposer.reconstruct(spec, state, ranks), grams, heavy)
            old = paired.error(target, decomposer.reconstruct(spec, planned, ranks), grams, heavy)
            if new > old:
                log.info("compensate: %s keeps the plan's factors (its refit is worse: %.3g > %.3g)", name, new, old)
                return None
        log.debug("compensate: %s refitted with ridge %g", name, damping)
        store_factorization(ctx, candidate, decision.method, decomposer, state)
        return damping


class _Stop(Exception):
    """Raised once a run has seen every input it was asked for: the rest of the graph is not needed."""


class _InputTap(fx.Interpreter):
    """Runs a graph up to the last of the given call sites and hands back their inputs, by site node name."""

    def __init__(self, gm: fx.GraphModule, keys: dict[str, tuple[str, int | str]]):
        super().__init__(gm)
        self.keys = {n.name: keys[n.name][1] for n in gm.graph.nodes if n.name in keys}
        self.seen: dict[str, torch.Tensor] = {}

    def inputs(self, args: tuple) -> dict[str, torch.Tensor]:
        self.seen = {}
        try:
            self.run(*args)
        except _Stop:
            pass
        finally:
            self.env.clear()
        return self.seen

    def run_node(self, node):
        key = self.keys.get(node.name)
        if key is not None:
            source = node.args[key] if isinstance(key, int) else node.kwargs[key]
            self.seen[node.name] = self.env[source].clone()  # a later in-place op must not change it
            if len(self.seen) == len(self.keys):
                raise _Stop
        return super().run_node(node)


@contextlib.contextmanager
def _evaluating(*modules):
    """Eval mode (no dropout, BatchNorm's running statistics) for the duration; training flags restored after."""
    flags = [(m, m.training) for module in modules for m in module.modules()]
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for m, training in flags:
            m.training = training
