"""The verify pass: the rewritten graph still runs, keeps the output shapes, and its error is recorded."""

from __future__ import annotations

import warnings

import torch
from torch.fx.passes.infra.pass_base import PassResult
from torch.utils._pytree import tree_leaves

from ..graph.effects import fresh_inputs, preserved_buffers
from ..errors import FxDecompError
from ..records import Verification
from .base import Pass, register_pass


def output_error(reference, candidate, example_inputs) -> float | None:
    """Largest relative L2 error over the tensor outputs of ``candidate`` against ``reference``.

    Each model runs on its own copy of the inputs, and its buffers are put back
    afterwards: a model that writes into its inputs or buffers cannot leak one
    run's writes into the other run. None, with a warning, when outputs differ only in
    their leading size: a count that depends on the data (detections kept after NMS), which
    no elementwise error can compare. Any other difference in number or shape is a bug
    (`FxDecompError`).
    """
    with torch.no_grad():
        with preserved_buffers(reference):
            expected = [t for t in tree_leaves(reference(*fresh_inputs(example_inputs))) if isinstance(t, torch.Tensor)]
        with preserved_buffers(candidate):
            actual = [t for t in tree_leaves(candidate(*fresh_inputs(example_inputs))) if isinstance(t, torch.Tensor)]
    if len(expected) != len(actual) or any(a.shape[1:] != e.shape[1:] or a.dim() != e.dim() for a, e in zip(actual, expected)):
        raise FxDecompError(
            "the rewritten model's outputs do not match the original's in number or shape; this is a bug in "
            "fxdecomp: please report it, and exclude the layer named in the decisions to work around it"
        )
    counts = [(tuple(e.shape), tuple(a.shape)) for a, e in zip(actual, expected) if a.shape != e.shape]
    if counts:
        warnings.warn(
            f"fxdecomp: the output error is not measured: {len(counts)} output(s) change their leading size "
            f"(e.g. {counts[0][0]} -> {counts[0][1]}), a count that depends on the data (detections kept after "
            "NMS, say); judge the result on your own metric",
            stacklevel=2,
        )
        return None
    errors = [float((a.double() - e.double()).norm() / e.double().norm().clamp_min(1e-30)) for a, e in zip(actual, expected) if e.is_floating_point()]
    return max(errors, default=0.0)


@register_pass
class VerifyPass(Pass):
    name = "verify"
    provides = ("verification",)

    def run(self, gm):
        ctx = self.context
        error = output_error(ctx.reference, gm, ctx.example_inputs) if ctx.reference is not None else None
        latency_after_ms = None
        if ctx.latency.before_ms is not None:  # latency budgets, and plans made to follow latency
            from ..latency import model_ms

            latency = ctx.latency
            if latency.predicted_after_ms is not None:  # planned on a device's table: its prediction stands
                latency_after_ms = latency.predicted_after_ms
            else:
                on = dict(provider=latency.provider or None, provider_options=dict(latency.provider_options))
                latency_after_ms = model_ms(gm, ctx.example_inputs, threads=latency.threads, **on)
        ctx.provide("verification", Verification(error, latency_after_ms))
        return PassResult(gm, False)
