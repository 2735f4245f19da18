"""`compress`: trace a model, plan every layer's decomposition under one budget, rewrite, verify.

Example::

    import fxdecomp, torch
    result = fxdecomp.compress(model, (torch.randn(1, 3, 224, 224),), budget=0.5)
    result.graph_module          # the decomposed torch.fx.GraphModule
    print(result.report())
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .budget import Budget
from .cost import count_flops, count_params
from .decomposers import all_methods
from .capture.hidden import OPAQUE_WEIGHTS
from .calibration_batches import replayable
from .capture.partial import compress_partial
from .errors import BudgetError, InvalidInputError, TraceError, UnknownMethodError
from .frontend import capture_with_source
from .passes import PassManager
from .planning.replay import normalize_plan
from .progress import stderr_is_terminal
from .records import PassContext, Request, Verification
from .recipes import Recipe, load_recipe
from .result import CompressionResult
from .grad_mode import outside_inference_mode


@outside_inference_mode
def compress(
    model: nn.Module,
    example_inputs: tuple | torch.Tensor,
    budget: float | Budget = 0.5,
    methods: Sequence[str] | None = None,
    calibration: Iterable | None = None,
    exclude: Sequence[str] | str = (),
    pipeline: str | os.PathLike | Recipe | None = None,
    *,
    frontend: str = "auto",
    dynamic_shapes: Any = "auto",
    plan: Mapping[str, Any] | Sequence[Any] | None = None,
    sensitivity: Callable[[nn.Module], float] | None = None,
    progress: bool | None = None,
    partial: bool | None = None,
) -> CompressionResult:
    """Decompose ``model``'s Linear and conv (Conv1d/2d/3d, ConvTranspose1d/2d/3d) layers so that it keeps ``budget`` of its FLOPs.

    ``budget`` is a fraction in (0, 1] of the whole model's FLOPs (2 per multiply-add,
    every op counted) or a `Budget` of FLOPs, parameters or onnxruntime latency. ``methods``
    restricts the methods (None: the recipe's); ``exclude`` holds qualified names or glob patterns
    left alone; ``pipeline`` names a recipe in ``passes/``, a path to one, or is a `Recipe`
    (``load_recipe("hardware").with_options(plan={"round_to": 8})``). The default recipe's
    FLOP plan keeps its savings in onnxruntime latency on this CPU (ranks on its SIMD block,
    a static latency model; ``pipeline="flops"``: the plain FLOP plan, the same on every
    machine). ``frontend``
    forces "fx" or "export". ``dynamic_shapes`` (torch.export capture only): "auto" leaves
    every input dimension free that the model allows (batch, sequence length), "static" fixes
    all at the example's sizes, or a torch.export ``dynamic_shapes`` spec pins chosen ones
    (``({0: Dim.AUTO, 1: Dim.STATIC},)``); other shapes raise `ShapeError`. ``calibration`` is an iterable of input tuples: the
    calibrate pass keeps each layer's input Gram matrix and the Gram matrix of the
    gradients reaching its outputs, so that options are planned on the first-order
    change of the model's outputs (see `fxdecomp.calibration`). ``sensitivity`` is
    a callback scoring a model (higher is better, e.g. validation accuracy): each
    candidate option is scored with only that layer decomposed, and the planner
    minimises the summed score drops instead of the predicted errors. ``progress`` shows per-layer
    progress on stderr (default: when stderr is a terminal). ``plan`` re-applies saved decisions (``result.decisions``,
    ``result.to_dict()`` or its "decisions" list, or a mapping name -> (method, ranks))
    instead of searching: same structure, no budget. The input model and example
    inputs are never modified. When neither torch.fx nor torch.export captures the whole model,
    its largest capturable submodules are compressed under the one budget, counted on the whole
    model, with a warning (``partial=None``); ``partial=True`` always does so, ``partial=False``
    raises the `TraceError` instead. Then ``result.partial`` is true, ``result.captured`` names the
    submodules, and ``result.graph_module`` is a copy of the model (its own class) with those
    submodules replaced by compressed GraphModules (see `fxdecomp.capture.partial`).

    Every Conv2d / Linear weight is a candidate however it is called (module, keyword
    input, ``F.linear`` / ``F.conv2d``, ``addmm``, ``x @ W.t()``), including
    nn.MultiheadAttention's ``in_proj_weight`` and ``out_proj``; a tied weight counts once
    in the parameters, and decomposing one of its users saves none of it while another
    user keeps it. Weights computed by ``torch.nn.utils.parametrize`` or the old
    ``weight_norm`` / ``spectral_norm`` hooks are decomposed at their effective value (the
    decision's ``note`` says so). In-place ops survive the rewrite. Raises BudgetError
    when the budget cannot be met (or, as a safeguard, when the result's unique
    parameters exceed a params budget).
    """
    _check_model(model)
    budget = Budget.parse(budget)
    example_inputs = as_example_inputs(example_inputs)
    recipe = load_recipe(pipeline)
    methods = _methods(methods if methods is not None else recipe.methods)
    exclude = (exclude,) if isinstance(exclude, str) else tuple(exclude)

    with torch.no_grad():
        try:
            if partial:
                raise TraceError("partial capture asked for (partial=True)")
            gm, frontend_used, source = capture_with_source(model, example_inputs, frontend, dynamic_shapes)
        except TraceError as exc:
            if partial is False:
                raise
            if calibration is not None or sensitivity is not None:
                raise TraceError(f"{exc}; compressing its capturable submodules instead (partial capture) "
                                 "does not take calibration or sensitivity yet: drop them, or pass partial=False") from exc
            return compress_partial(
                model, example_inputs, budget, methods=methods, exclude=exclude, pipeline=pipeline,
                frontend=frontend, plan=normalize_plan(plan), progress=progress, reason=None if partial else exc,
            )
        opaque = gm.meta.get(OPAQUE_WEIGHTS, ())
        request = Request(
            example_inputs=example_inputs,
            budget=budget,
            methods=methods,
            exclude=exclude,
            calibration=replayable(calibration, recipe.steps),  # a generator's batches kept if a pass runs them again
            sensitivity=sensitivity,
            progress=stderr_is_terminal() if progress is None else bool(progress),
            frontend=frontend_used,
            fixed_plan=normalize_plan(plan),
        )
        context = PassContext(request, reference=copy.deepcopy(gm), source_model=source)
        run = PassManager.from_steps(((s.name, s.options) for s in recipe.steps), context, f"recipe {recipe.name!r}")(gm)
        gm = run.graph_module
        flops_after = count_flops(gm, example_inputs)
    cost = context.cost if context.has("cost") else None
    verification = context.verification if context.has("verification") else Verification(None)
    params_before = cost.params if cost else count_params(context.reference)
    params_after = count_params(gm)
    _check_params_budget(budget, params_before, params_after, context.fixed_plan is not None)
    return CompressionResult(
        graph_module=gm,
        decisions=list(context.plan.decisions.values()) if context.has("plan") else [],
        flops_before=cost.flops if cost else count_flops(context.reference, example_inputs),
        flops_after=flops_after,
        params_before=params_before,
        params_after=params_after,
        budget={budget.metric: budget.fraction},
        output_error=verification.output_error,
        frontend=frontend_used,
        pipeline=recipe.name,
        pass_seconds=run.seconds,
        latency_before_ms=context.latency.before_ms,
        latency_after_ms=verification.latency_after_ms,
        opaque_weights=opaque,
    )


def _check_model(model) -> None:
    """Refuse, by name, models no capture can read: not a module, TorchScript, or weights without values."""
    if not isinstance(model, nn.Module):
        raise InvalidInputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, torch.jit.ScriptModule):
        raise InvalidInputError(
            f"the model is a TorchScript module ({type(model).__name__}, from torch.jit.script or torch.jit.trace), whose "
            "code torch.fx and torch.export cannot read: pass the eager nn.Module it was made from"
        )
    meta = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.is_meta]
    if meta:
        raise InvalidInputError(
            f"{len(meta)} parameter(s) or buffer(s) of {type(model).__name__} are on the meta device, which holds shapes but "
            f"no values ({', '.join(meta[:3])}{', ...' if len(meta) > 3 else ''}): load real weights first "
            "(model.to_empty(device='cpu'), then load_state_dict), or stream a checkpoint with "
            "fxdecomp.large.compress_sequential"
        )


def _check_params_budget(budget: Budget, before: int, after: int, fixed_plan: bool) -> None:
    """A parameter budget the planned model does not meet is an error, never a silent result."""
    if budget.metric == "params" and not fixed_plan and after > budget.fraction * before:
        raise BudgetError(
            f"the compressed model keeps {after} of {before} parameters ({after / before:.4f}), over the params budget "
            f"of {budget.fraction:g}; this is a bug in fxdecomp's parameter accounting (shared weights?): please report "
            "it, and exclude the layers that share weights to work around it",
            smallest_reachable=None,
        )


def as_example_inputs(example_inputs) -> tuple:
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if isinstance(example_inputs, Mapping):  # a tokenizer's BatchEncoding, a dict of keyword arguments
        keys = list(example_inputs)
        raise InvalidInputError(
            f"example_inputs is a {type(example_inputs).__name__} with keys {keys}; fxdecomp takes the model's positional "
            f"inputs: pass a tuple in the order of forward's parameters, e.g. ({', '.join(f'inputs[{k!r}]' for k in keys[:3])}{',' if len(keys) == 1 else ''})"
        )
    if not isinstance(example_inputs, (tuple, list)) or not example_inputs:
        raise InvalidInputError(
            f"example_inputs must be a tensor or a non-empty tuple of tensors, got {type(example_inputs).__name__}"
        )
    # Private copies: a model that writes into its inputs must not change the caller's tensors.
    return tuple(x.detach().clone() if isinstance(x, torch.Tensor) else copy.deepcopy(x) for x in example_inputs)


def _methods(methods) -> tuple[str, ...] | None:
    if methods is None:
        return None
    methods = (methods,) if isinstance(methods, str) else tuple(methods)
    unknown = [m for m in methods if m not in all_methods()]
    if unknown or not methods:
        raise UnknownMethodError(f"unknown method(s) {unknown or methods}; known methods: {all_methods()}")
    return methods
