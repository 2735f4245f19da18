"""The damage model: a candidate option's predicted relative error, and its weight in the model's outputs.

Weight-only by default (each decomposer's own error estimate); on calibration
statistics the error is measured on the layer's inputs (and, output-aware, as
the model's outputs see it; `fxdecomp.calibration`). The planner's damage is
the error squared, times the layer's output energy when calibration is output-aware.

Example::

    error = predicted_error(ctx, candidate, "svd", (16,))
    damage = output_damage(ctx, candidate, error)
"""

from __future__ import annotations

import math

import torch

from ..calibration import OutputErrorMeter, output_energy
from ..graph.candidates import Candidate
from .signal_share import signal_shares
from .factors import factorization, fitted_to_data, gram_matrices, output_gram_matrices, output_weights


def predicted_error(ctx, candidate: Candidate, method: str, ranks: tuple[int, ...]) -> float:
    """The layer's predicted relative output error: on the calibration data when there is some, else of the weight.

    With output-aware calibration the error is relative to `output_energy` (the
    layer's output energy as the model's outputs see it), for every method.
    """
    decomposer, state = factorization(ctx, candidate, method)
    gram = ctx.grams.get(candidate.name)
    if gram is None or fitted_to_data(ctx, candidate, method):
        return decomposer.estimate_error(candidate.spec, state, ranks)
    weight_blocks = weight_matrices(candidate.spec, candidate.layer.weight.detach())
    meter = ctx.error_meters.get(candidate.name)
    if meter is None:
        weights = output_weights(ctx, candidate)
        meter = OutputErrorMeter(gram_matrices(gram), weight_blocks, output_sqrt=[w[0] for w in weights] if weights else None)
        ctx.error_meters[candidate.name] = meter
    dense = decomposer.estimate_reconstruct(candidate.spec, state, ranks)
    return meter.relative_error(weight_blocks, weight_matrices(candidate.spec, dense))


def output_energies(ctx) -> dict[str, float]:
    """Per candidate with output-aware calibration: tr(W G W^T H), what its relative errors are relative to.

    A relative error e of layer l then changes the model's outputs by about
    e^2 * energy_l (relative squared change, summed over the outputs), so the
    planner can add damages across layers. Empty without output-aware calibration.
    """
    if ctx.factorizations.output_energies is None:
        energies = {}
        for name, candidate in ctx.candidates.items():
            output_grams = output_gram_matrices(ctx, candidate)
            # Data-free priors (`fxdecomp.bn_prior`) have no gradients: their errors stay relative.
            if output_grams is not None and name in ctx.grams and not getattr(ctx.output_grams[name], "prior", False):
                blocks = weight_matrices(candidate.spec, candidate.layer.weight.detach())
                energies[name] = output_energy(blocks, gram_matrices(ctx.grams[name]), output_grams)
        ctx.factorizations.output_energies = energies
    return ctx.factorizations.output_energies


def weight_matrices(spec, weight: torch.Tensor) -> list[torch.Tensor]:
    """The weight as one matrix per group: (out, in) for Linear, the lowered (T/g, S/g*kh*kw) for Conv2d."""
    if spec.kind == "linear":
        return [weight]
    return [block.reshape(block.shape[0], -1) for block in weight.split(spec.out_per_group, dim=0)]


def retained_energy_damage(error: float) -> float:
    """-log(1 - e^2): the damage of a relative error e when errors are not measured on the model's outputs.

    A layer with relative output error e keeps a fraction 1 - e^2 of its output energy
    (the truncation error is orthogonal to what is kept); through a chain of layers these
    fractions multiply, so -log of each adds up to -log of the fraction that reaches the
    outputs. For small e it is e^2 (the old damage); as e -> 1 it grows without bound, so
    a plan no longer buys FLOPs by emptying one layer (on EfficientNet-Lite0 at 0.8 of its
    FLOPs the e^2 plan cut the head conv to a relative error of 0.85; this alone did not save
    that model: see the report of issue 16).
    """
    return -math.log(max(1.0 - error**2, 1e-6))


def candidate_share(ctx, candidate: Candidate) -> float:
    """The candidate's share of the signal at the residual sum its error joins (`fxdecomp.planning.signal_share`), cached."""
    if ctx.factorizations.signal_shares is None:
        site = next((c.sites[0] for c in ctx.candidates.values() if c.sites), None)
        gm = site.node.graph.owning_module if site is not None else None
        ctx.factorizations.signal_shares = signal_shares(gm, ctx.candidates, ctx.example_inputs) if gm is not None else {}
    return ctx.factorizations.signal_shares.get(candidate.name, 1.0)


def output_damage(ctx, candidate: Candidate, error: float) -> float | None:
    """error^2 in the unit of the model's outputs (output-aware calibration), else None (error^2) or,
    with the calibrate option ``weight_damage = "retained_energy"``, `retained_energy_damage`, and with
    ``"signal_share"`` that times the layer's share of the signal (`candidate_share`)."""
    energies = output_energies(ctx)
    if not energies:
        if ctx.calibration_stats.weight_damage == "squared":
            return None
        if ctx.calibration_stats.weight_damage == "signal_share":
            return candidate_share(ctx, candidate) * retained_energy_damage(error)
        return retained_energy_damage(error)
    # A layer the calibration could not observe counts like an average one.
    energy = energies.get(candidate.name, sum(energies.values()) / len(energies))
    return error**2 * energy
