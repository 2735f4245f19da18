"""Capture a model as a GraphModule: torch.fx first, torch.export (non-strict) where fx cannot trace.

Conv2d and Linear modules, subclasses included, stay leaves of the fx graph so
that each is one ``call_module`` node. torch.export graphs hold aten-level
``linear`` / ``conv2d`` calls on ``get_attr`` weights instead; both forms are
candidates for the rewrite (see `fxdecomp.passes.candidates`).

Example::

    gm, frontend = capture(model, (torch.randn(1, 3, 32, 32),))   # frontend: "fx" or "export"
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
import traceback

import torch
from torch import fx, nn

from .graph.attention import functional_attention
from .graph.parametrized import private_copy
from .graph.effects import fresh_inputs, preserved_buffers
from .graph.hooks import EXPORT_DROPS, describe, user_hooks
from .capture.hidden import OPAQUE_WEIGHTS, OpaqueWeight, opaque_weights, used_as_layers
from .capture.experts import lower_grouped_experts, stacked_weights, stacks_of
from .errors import InvalidInputError, TraceError
from .export_capture import check_dynamic_shapes, export_trace
from .transformers_layers import conv1d_types
from .layer_spec import LAYER_TYPES, computes_plain_linear
from .user_warnings import warn

log = logging.getLogger(__name__)


class LayerLeafTracer(fx.Tracer):
    """The default tracer, with every Linear and conv (Conv1d/2d/3d, ConvTranspose1d/2d/3d; subclasses too) kept as a
    leaf, except a Linear subclass whose own forward computes more than the Linear."""

    def __init__(self, leaf_types: tuple[type, ...] = (), traced_into: frozenset[int] = frozenset()):
        super().__init__()
        self.leaf_types = (*LAYER_TYPES, *conv1d_types(), *leaf_types)
        self.traced_into = traced_into  # ids of Linear modules whose own forward computes more than the Linear
        # Buffers as graph inputs: an in-place write into one (a counter) is recorded, not run once while tracing.
        self.proxy_buffer_attributes = True

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        if id(module) in self.traced_into:
            # Traced into: its forward computes more than the Linear (PhiMoE's router returns a tuple), and the
            # F.linear inside is a candidate of its own. (Conv subclasses stay leaves: layer_spec checks their forward.)
            return False
        if type(module) is nn.DataParallel:
            return False  # torch.nn's, so a leaf to fx; its forward calls the module it wraps (on the CPU), traced into
        return isinstance(module, self.leaf_types) or super().is_leaf_module(module, qualified_name)


def fx_trace(model: nn.Module) -> fx.GraphModule:
    # Probed before tracing: while fx traces, a module's parameters read as proxies.
    tracer = LayerLeafTracer(traced_into=frozenset(id(m) for m in model.modules() if isinstance(m, nn.Linear) and not computes_plain_linear(m)))
    with preserved_buffers(model):
        graph = tracer.trace(model)
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


def capture(
    model: nn.Module, example_inputs: tuple, frontend: str = "auto", dynamic_shapes="auto"
) -> tuple[fx.GraphModule, str]:
    """Trace a private copy of ``model``; returns (graph module, "fx" or "export").

    ``dynamic_shapes`` applies to torch.export capture (see `fxdecomp.export_capture.export_trace`).
    """
    gm, used, _ = capture_with_source(model, example_inputs, frontend, dynamic_shapes)
    return gm, used


def capture_with_source(
    model: nn.Module, example_inputs: tuple, frontend: str = "auto", dynamic_shapes="auto"
) -> tuple[fx.GraphModule, str, nn.Module]:
    """Like `capture`, also returning the private eval-mode copy of ``model`` that was traced."""
    model = functional_attention(private_copy(model)[0])  # computed weights made plain; MHA projections visible
    check_runs(model, example_inputs)
    if frontend not in ("auto", "fx", "export"):
        raise InvalidInputError(f"unknown frontend {frontend!r}; use 'auto', 'fx' or 'export'")
    check_dynamic_shapes(dynamic_shapes)
    fx_error = None
    if root_hooks := user_hooks(model):
        # torch.fx traces forward, not __call__: the model's own hooks would be lost. torch.export records them.
        if frontend == "fx":
            raise TraceError(
                f"the model carries hooks of yours ({describe({'': root_hooks})}), which torch.fx does not trace (it traces "
                "forward, not the hooks around it); use frontend='auto' or 'export', which records them, or remove the hooks"
            )
        warn(
            f"fxdecomp: the model carries hooks of yours ({', '.join(root_hooks)}), which torch.fx does not trace: it is "
            f"captured with torch.export, which records what forward hooks compute on tensors; {EXPORT_DROPS}. "
            "result.apply_to(model) returns your model's class, which keeps its hooks."
        )
    elif frontend in ("auto", "fx"):
        printed = io.StringIO()  # torch prints a failing fx graph's traceback to stderr, as if compress had crashed
        try:
            gm = lower_grouped_experts(fx_trace(model))
            with preserved_buffers(gm), contextlib.redirect_stderr(printed):
                gm(*fresh_inputs(example_inputs))  # fx can trace graphs that do not run (e.g. data-dependent shapes)
            sys.stderr.write(printed.getvalue())  # what the model itself printed
        except Exception as exc:
            fx_error = exc
            log.info("torch.fx cannot trace %s (%s); trying torch.export", type(model).__name__, exc)
            if frontend == "fx":
                raise TraceError(_trace_message(model, fx_error, None)) from exc
        else:
            gm, used = _see_opaque_weights(model, example_inputs, gm, frontend == "auto", dynamic_shapes)
            return gm, used, model
    try:
        gm = lower_grouped_experts(export_trace(model, example_inputs, dynamic_shapes))
    except Exception as exc:
        if root_hooks:
            raise TraceError(
                f"cannot capture {type(model).__name__}: it carries hooks of yours ({describe({'': root_hooks})}), which "
                f"torch.fx would drop, and torch.export failed: {str(exc).splitlines()[0] if str(exc) else exc}. Way out: "
                "remove the hooks before compress (handle.remove()) and register them on the result"
            ) from exc
        raise TraceError(_trace_message(model, fx_error, exc)) from exc
    gm.meta[OPAQUE_WEIGHTS] = opaque_weights(gm)
    _warn_opaque(model, gm.meta[OPAQUE_WEIGHTS])
    _warn_unlowered_stacks(model, gm)
    return gm, "export", model


def _see_opaque_weights(
    model: nn.Module, example_inputs: tuple, gm: fx.GraphModule, try_export: bool, dynamic_shapes="auto"
) -> tuple[fx.GraphModule, str]:
    """Prefer torch.export when fx hides Linear/Conv weights in opaque calls and export sees more of them.

    torch.fx keeps ``torch.fx.wrap``'d functions and scripted submodules opaque; non-strict
    torch.export traces into the former. The weights still hidden are recorded in
    ``gm.meta[OPAQUE_WEIGHTS]`` and named in a warning.
    """
    hidden, used = used_as_layers(gm, example_inputs, opaque_weights(gm)), "fx"
    if hidden and try_export:
        try:
            exported = lower_grouped_experts(export_trace(model, example_inputs, dynamic_shapes))
        except Exception as exc:  # e.g. export cannot call a scripted submodule
            log.info("torch.export cannot capture %s either (%s); keeping the fx graph", type(model).__name__, exc)
        else:
            still = opaque_weights(exported)
            if {w.parameter for w in still} < {w.parameter for w in hidden}:
                log.info("torch.fx hides %d weight(s) in opaque calls; torch.export sees into them", len(hidden) - len(still))
                gm, hidden, used = exported, still, "export"
    gm.meta[OPAQUE_WEIGHTS] = hidden
    _warn_opaque(model, hidden)
    return gm, used


def _warn_unlowered_stacks(model: nn.Module, gm: fx.GraphModule) -> None:
    """Name the stacked (E, a, b) expert weights of a transformers mixture of experts that capture did not lower
    (an experts implementation other than transformers' grouped matmul): they keep their cost."""
    lowered = stacks_of(gm)
    implementation = getattr(getattr(model, "config", None), "_experts_implementation", None)
    stacked = [name for name in stacked_weights(model) if name not in lowered]
    if stacked and implementation not in (None, "grouped_mm"):
        warn(
            f"fxdecomp: {len(stacked)} stacked expert weight(s) of {type(model).__name__} are applied by its "
            f"{implementation!r} experts implementation, which fxdecomp does not decompose, so they keep their cost: "
            f"{', '.join(stacked[:4])}{', ...' if len(stacked) > 4 else ''}. Way out: "
            "model.set_experts_implementation('grouped_mm') before compress"
        )


def _warn_opaque(model: nn.Module, hidden: tuple[OpaqueWeight, ...]) -> None:
    if not hidden:
        return
    listed = ", ".join(f"{w.parameter!r} {tuple(w.shape)} in {w.consumer}" for w in hidden[:8])
    more = f" and {len(hidden) - 8} more" if len(hidden) > 8 else ""
    warn(
        f"fxdecomp: {len(hidden)} Linear/Conv weight(s) of {type(model).__name__} reach calls that neither torch.fx "
        f"nor torch.export trace into, so they are kept and their FLOPs cannot be reduced: {listed}{more}. "
        "Way out: apply them in Python with nn.Linear/nn.Conv2d or F.linear/F.conv2d (not inside a "
        "torch.fx.wrap'd function or a scripted submodule), or compress that submodule on its own"
    )


def check_runs(model: nn.Module, example_inputs: tuple) -> None:
    """Run the model once (no grad) to check that the example inputs fit it."""
    try:
        with torch.no_grad(), preserved_buffers(model):
            model(*fresh_inputs(example_inputs))
    except Exception as exc:
        shapes = [tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__ for x in example_inputs]
        raise InvalidInputError(
            f"the example inputs (shapes {shapes}) do not fit {type(model).__name__}: {exc}. "
            "Pass a tuple of tensors that the model's forward accepts"
        ) from exc


def _trace_message(model: nn.Module, fx_error: Exception | None, export_error: Exception | None) -> str:
    culprit = _failing_module(model, fx_error) if fx_error is not None else None
    parts = [f"cannot capture {type(model).__name__}"]
    if fx_error is not None:
        where = f" in module {culprit!r}" if culprit else f" in {type(model).__name__}.forward" if culprit == "" else ""
        parts.append(f"torch.fx failed{where}: {fx_error}")
    if export_error is not None:
        parts.append(f"torch.export failed: {str(export_error).splitlines()[0] if str(export_error) else export_error}")
    hint = (
        f"mark {culprit!r} a leaf or exclude it, or make its forward traceable"
        if culprit
        else "make the forward traceable by torch.fx or torch.export, or decompose its layers with decompose_layer"
    )
    return "; ".join(parts) + f". Way out: {hint}"


def _failing_module(model: nn.Module, error: Exception) -> str | None:
    """The submodule whose forward torch.fx was running when it failed: the innermost frame of the error's traceback
    whose ``self`` is one of the model's modules that fx traces into ("" for the model's own forward). Without such a
    frame (the traced graph failed when run), the deepest submodule that fx cannot trace on its own, a guess."""
    tracer = LayerLeafTracer()
    # Leaves are never traced into; a frame in one means the traced graph failed while it ran.
    names = {id(module): name for name, module in model.named_modules() if not name or not tracer.is_leaf_module(module, name)}
    found = None
    for frame, _ in traceback.walk_tb(error.__traceback__):
        owner = frame.f_locals.get("self")
        if owner is not None and id(owner) in names:
            found = names[id(owner)]
    return found if found is not None else _first_untraceable(model)


def _first_untraceable(model: nn.Module) -> str | None:
    """The deepest submodule that torch.fx cannot trace on its own, leaves as the tracer treats them skipped."""
    failing, tracer = [], LayerLeafTracer()
    for name, module in model.named_modules():
        if not name or tracer.is_leaf_module(module, name):
            continue
        try:
            LayerLeafTracer().trace(module)
        except Exception:
            failing.append(name)
    return max(failing, key=lambda name: name.count("."), default=None)
