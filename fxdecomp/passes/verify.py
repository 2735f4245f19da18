"""The verify pass: the rewritten graph still runs, keeps the output shapes, and its error is recorded."""

from __future__ import annotations

import copy
import operator

import torch
from torch import fx
from torch.fx.passes.infra.pass_base import PassResult
from torch.fx.passes.shape_prop import ShapeProp
from torch.utils._pytree import tree_leaves

from ..graph.effects import fresh_inputs, preserved_buffers
from ..errors import FxDecompError
from ..records import Verification
from .base import Pass, register_pass
from ..user_warnings import warn


def output_error(reference, candidate, example_inputs, counts_may_vary: bool | None = None) -> float | None:
    """Largest relative L2 error over the tensor outputs of ``candidate`` against ``reference``.

    Each model runs on its own copy of the inputs, and its buffers are put back
    afterwards: a model that writes into its inputs or buffers cannot leak one
    run's writes into the other run. Where outputs may change their count with the data
    (``counts_may_vary``; None: when ``reference`` is a graph with an op whose output size
    depends on values, `data_dependent_sizes`) and differ only in their leading size
    (detections kept after NMS), returns None with a warning: no elementwise error compares
    them. Any other difference in number or shape is a bug (`FxDecompError`).
    """
    with torch.no_grad():
        with preserved_buffers(reference):
            expected = [t for t in tree_leaves(reference(*fresh_inputs(example_inputs))) if isinstance(t, torch.Tensor)]
        with preserved_buffers(candidate):
            actual = [t for t in tree_leaves(candidate(*fresh_inputs(example_inputs))) if isinstance(t, torch.Tensor)]
    if len(expected) != len(actual):
        raise _shape_bug()
    changed = [(tuple(e.shape), tuple(a.shape)) for a, e in zip(actual, expected) if a.shape != e.shape]
    if changed:
        leading_only = all(a.dim() == e.dim() and a.shape[1:] == e.shape[1:] for a, e in zip(actual, expected))
        if counts_may_vary is None and leading_only:
            counts_may_vary = isinstance(reference, fx.GraphModule) and data_dependent_sizes(reference, example_inputs)
        if not (leading_only and counts_may_vary):
            raise _shape_bug()
        warn(
            f"fxdecomp: the output error is not measured: {len(changed)} output(s) change their leading size "
            f"(e.g. {changed[0][0]} -> {changed[0][1]}), a count that depends on the data (detections kept after "
            "NMS, say); judge the result on your own metric"
        )
        return None
    errors = [float((a.double() - e.double()).norm() / e.double().norm().clamp_min(1e-30)) for a, e in zip(actual, expected) if e.is_floating_point()]
    return max(errors, default=0.0)


def _shape_bug() -> FxDecompError:
    return FxDecompError(
        "the rewritten model's outputs do not match the original's in number or shape; this is a bug in "
        "fxdecomp: please report it, and exclude the layer named in the decisions to work around it"
    )


# Ops whose output size depends on tensor values (besides indexing with a boolean mask).
_VALUE_SIZED = {torch.nonzero, torch.masked_select, torch.unique, torch.argwhere}
_VALUE_SIZED_ATEN = {"nonzero", "masked_select", "_unique2", "unique_dim", "unique_consecutive", "argwhere", "nms"}


def data_dependent_sizes(gm: fx.GraphModule, example_inputs: tuple) -> bool:
    """Whether ``gm`` calls an op whose output size depends on values (nonzero, boolean-mask indexing, NMS).

    Runs torch.fx's ShapeProp on a copy of ``gm`` for the dtypes of index arguments.
    """
    gm = copy.deepcopy(gm)
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(*fresh_inputs(example_inputs))
    except Exception:  # no dtypes then: only the ops themselves count
        pass
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method"):
            continue
        if node.target in _VALUE_SIZED or node.target in ("nonzero", "masked_select", "unique", "argwhere"):
            return True
        packet = getattr(node.target, "_overloadpacket", None)
        if packet is not None and getattr(packet, "__name__", "") in _VALUE_SIZED_ATEN:
            return True
        if node.target in (operator.getitem, torch.ops.aten.index.Tensor):
            indices = [a for arg in node.args[1:] for a in (arg if isinstance(arg, (tuple, list)) else (arg,))]
            if any(isinstance(i, fx.Node) and _is_bool(i) for i in indices):
                return True
    return False


def _is_bool(node: fx.Node) -> bool:
    value = node.meta.get("val", node.meta.get("tensor_meta"))
    return getattr(value, "dtype", None) == torch.bool


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
