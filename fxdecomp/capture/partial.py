"""Partial capture: compress the largest submodules that can be captured when the whole model cannot.

Detection models (torchvision's Faster R-CNN) branch on tensor values, loop over
data-dependent counts and return lists of dicts: neither torch.fx nor torch.export
captures them whole. Their backbone, neck and heads usually can be captured on the
inputs they receive. `compress_partial`:

1. runs the model once with forward pre-hooks on every submodule, recording the
   inputs each one receives (each call);
2. walks the module tree top-down and captures each submodule that holds a Conv2d
   or Linear weight with fx, else torch.export (`capture_with_source`), on its
   recorded inputs; a captured submodule must reproduce its outputs on every
   recorded call, else its children are tried;
3. inlines every call of every captured submodule into ONE combined GraphModule
   (attribute paths as in the model, so decisions carry the model's own names) and
   plans it under one global budget: the budget is a fraction of the WHOLE model's
   FLOPs (counted by running it with `torch.utils.flop_counter`), the uncaptured rest
   keeps its FLOPs, so the captured part keeps ``(budget * total - rest) / captured``;
4. applies each submodule's share of that plan to the submodule (`compress` with
   ``plan=``) and puts the compressed GraphModule in its place in a deep copy of the
   model (the user's class; the input model is never modified).

Example::

    result = fxdecomp.compress(detector, (image,), budget=0.5)   # warns: captured 'backbone' (fx), 'head' (fx)
    result.partial, [c.name for c in result.captured]
    result.graph_module                                          # the detector, submodules replaced
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.utils._pytree import tree_leaves, tree_map

from ..budget import Budget
from ..cost import count_flops, count_params
from ..errors import BudgetError, FxDecompError, InvalidInputError, TraceError
from ..layer_spec import LAYER_TYPES
from ..graph.hooks import user_hooks
from ..user_warnings import warn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CapturedPart:
    """One submodule captured on its own: its qualified name, frontend, calls and FLOPs (2 per multiply-add)."""

    name: str
    frontend: str  # "fx" or "export"
    calls: int
    flops: int  # over all its calls in one forward pass of the model
    fraction: float  # of the whole model's FLOPs


@dataclass
class _Part:
    name: str
    module: nn.Module
    gm: fx.GraphModule
    frontend: str
    calls: list[tuple]  # positional inputs of each call
    bindings: list[list]  # per call: the value of each placeholder of gm


def model_flops(model: nn.Module, example_inputs: tuple) -> int:
    """FLOPs of one forward pass, counted as `fxdecomp.count_flops` counts them (aten level, 2 per multiply-add)."""
    return count_flops(model, _clone(example_inputs))


def record_calls(model: nn.Module, example_inputs: tuple) -> dict[str, list[tuple[tuple, dict]]]:
    """Run ``model`` once; per submodule name, the (args, kwargs) of each of its calls (tensors cloned)."""
    calls: dict[str, list[tuple[tuple, dict]]] = {}
    handles = []
    for name, module in model.named_modules():
        if not name:
            continue

        def hook(_module, args, kwargs, name=name):
            calls.setdefault(name, []).append((_clone(args), _clone(kwargs)))

        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            model(*_clone(example_inputs))
    finally:
        for handle in handles:
            handle.remove()
    return calls


def find_parts(model: nn.Module, calls: dict, frontend: str = "auto") -> tuple[list[_Part], list[str]]:
    """The largest capturable submodules holding Conv2d/Linear weights (top-down), and why others were not. A
    submodule carrying hooks of the user's is not one (its graph would not run them): its children may be."""
    parts: list[_Part] = []
    notes: list[str] = []

    def walk(module: nn.Module, prefix: str) -> None:
        for name, child in module.named_children():
            path = prefix + name
            if not _has_layer_weights(child):
                continue
            if path not in calls:  # a container (ModuleList, ModuleDict) or an unused branch
                notes.append(f"{path}: not called itself")
                walk(child, path + ".")
                continue
            if kinds := user_hooks(child):  # its graph would stand in for it, without running them: keep it, go inside
                notes.append(f"{path}: carries hooks of yours ({', '.join(kinds)}), kept so that they run")
                walk(child, path + ".")
                continue
            part, why = _try_capture(path, child, calls[path], frontend)
            if part is not None:
                parts.append(part)
            else:
                notes.append(f"{path}: {why}")
                walk(child, path + ".")

    walk(model, "")
    return parts, notes


def compress_partial(
    model: nn.Module,
    example_inputs: tuple,
    budget: Budget,
    *,
    methods: Sequence[str] | None,
    exclude: tuple[str, ...],
    pipeline,
    frontend: str = "auto",
    plan: dict | None = None,
    progress: bool | None = None,
    reason: Exception | None = None,
):
    """Compress the capturable submodules of ``model`` under one budget on the whole model; see the module doc.

    Returns a `CompressionResult` whose ``graph_module`` is a deep copy of ``model`` (its own
    class, eval mode) with the captured submodules replaced by compressed GraphModules,
    ``captured`` names them, and FLOPs are counted on the whole model.
    Raises `TraceError` when no submodule can be captured, `BudgetError` (with
    ``smallest_reachable`` a fraction of the whole model) when the budget cannot be met,
    `InvalidInputError` for latency budgets.
    """
    from ..compress import compress  # compress calls this module on a TraceError
    from ..passes.verify import output_error
    from ..result import CompressionResult

    if budget.metric == "latency":
        raise InvalidInputError(
            "latency budgets need the whole model in onnxruntime, which partial capture cannot give; "
            "use a FLOP or parameter budget"
        )
    source = copy.deepcopy(model).eval()
    calls = record_calls(source, example_inputs)
    parts, notes = find_parts(source, calls, frontend)
    if not parts:
        why = f" ({reason})" if reason else ""
        raise TraceError(
            f"cannot capture {type(model).__name__} whole{why}, nor any submodule holding Conv2d/Linear weights: "
            + "; ".join(notes[:6])
            + ". Way out: make the forward (or its backbone/head submodules) traceable by torch.fx or torch.export"
        )
    total_flops = model_flops(source, example_inputs)
    part_flops = {p.name: sum(model_flops(p.module, args) for args in p.calls) for p in parts}
    captured = tuple(
        CapturedPart(p.name, p.frontend, len(p.calls), part_flops[p.name], part_flops[p.name] / total_flops if total_flops else 0.0)
        for p in parts
    )
    if reason is not None:
        warn(
            f"fxdecomp: {type(model).__name__} cannot be captured whole ({_first_line(reason)}); compressing the "
            f"submodules that can be: {', '.join(f'{c.name!r} ({c.frontend}, {c.fraction:.1%} of the FLOPs)' for c in captured)}; "
            "the rest is kept as it is"
        )
    if plan is None:
        combined, inputs = combined_graph(parts)
        whole = {"flops": total_flops, "params": count_params(source)}[budget.metric]
        inside = {"flops": sum(part_flops.values()), "params": sum(count_params(p.module) for p in parts)}[budget.metric]
        rest = whole - inside
        fraction = (budget.fraction * whole - rest) / inside if inside else 1.0
        # Layers the parts miss (none in them, some outside): the budget cannot be served, an error below, not the
        # "returned unchanged" warning of a model without any layer.
        layers_outside = any(isinstance(m, LAYER_TYPES) for m in source.modules())
        try:
            with warnings.catch_warnings():
                if layers_outside:
                    warnings.filterwarnings("ignore", message=r"fxdecomp: the model has (no Conv2d or Linear layer|\d+ Conv/Linear)")
                planned = compress(
                    combined,
                    inputs,
                    budget=Budget(**{budget.metric: min(1.0, max(fraction, 1e-9))}),
                    methods=methods,
                    exclude=exclude,
                    pipeline=pipeline,
                    frontend="fx",
                    progress=progress,
                )
        except BudgetError as exc:
            if exc.smallest_reachable is None:
                raise
            smallest = (rest + exc.smallest_reachable * inside) / whole
            raise BudgetError(
                f"a {budget.metric} budget of {budget.fraction:g} cannot be reached: the smallest reachable is "
                f"{smallest:.4f} of the whole model's {budget.metric} (only submodules {[p.name for p in parts]} "
                f"could be captured; they hold {inside / whole:.1%}); ask for at least {math.ceil(smallest * 1000) / 1000:g}",
                smallest_reachable=smallest,
            ) from None
        decisions = planned.decisions
        if not decisions and budget.fraction < 1.0 and layers_outside:  # they all sit in what could not be captured
            raise BudgetError(
                f"a {budget.metric} budget of {budget.fraction:g} cannot be reached: {type(model).__name__} cannot be "
                f"captured whole{f' ({_first_line(reason)})' if reason else ''}, and the submodules that can be ({[p.name for p in parts]}) hold no "
                "Conv or Linear layer to decompose; make the module that failed traceable (see the reason) to compress it",
                smallest_reachable=1.0,
            )
        plan = {d.name: (d.method, d.ranks) for d in decisions if d.decomposed}
    else:
        decisions = None
    result_model = copy.deepcopy(source)
    part_results = []
    for part in parts:
        share = {_inside(part, name): choice for name, choice in plan.items() if _inside(part, name) is not None}
        if not share:
            continue
        done = compress(part.module, part.calls[0], plan=share, pipeline=pipeline, frontend=part.frontend, progress=progress)
        _set_submodule(result_model, part.name, done.graph_module)
        part_results.append((part, done))
    unknown = sorted(n for n in plan if all(_inside(p, n) is None for p in parts))
    if unknown:
        raise InvalidInputError(f"the plan names layers outside the captured submodules {[p.name for p in parts]}: {unknown}")
    if decisions is None:
        decisions = [dataclasses.replace(d, name=_outside(part, d.name)) for part, done in part_results for d in done.decisions]
    return CompressionResult(
        graph_module=result_model,
        decisions=list(decisions),
        flops_before=total_flops,
        flops_after=model_flops(result_model, example_inputs),
        params_before=count_params(source),
        params_after=count_params(result_model),
        budget={budget.metric: budget.fraction},
        # the uncaptured rest may select by value (detections after NMS): counts may vary
        output_error=output_error(source, result_model, _clone(example_inputs), counts_may_vary=True),
        frontend="partial",
        pipeline=part_results[0][1].pipeline if part_results else str(pipeline or "default"),
        captured=captured,
    )


def combined_graph(parts: list[_Part]) -> tuple[fx.GraphModule, tuple]:
    """One GraphModule running every call of every part, with attribute paths as in the model, and its inputs."""
    root = nn.Module()
    for part in parts:
        _set_submodule(root, part.name, part.gm, create=True)
    graph = fx.Graph()
    inputs, outputs = [], []
    for part in parts:
        placeholders = [n for n in part.gm.graph.nodes if n.op == "placeholder"]
        for index, binding in enumerate(part.bindings):
            value_map = {}
            for node, value in zip(placeholders, binding):
                if isinstance(value, _Constant):
                    value_map[node] = value.value
                else:
                    value_map[node] = graph.placeholder(f"{part.name.replace('.', '_')}_{index}_{node.name}")
                    inputs.append(value)
            seen = set(graph.nodes)
            outputs.append(graph.graph_copy(part.gm.graph, value_map))
            for node in graph.nodes:
                if node not in seen and node.op in ("get_attr", "call_module"):
                    node.target = f"{part.name}.{node.target}"
    graph.output(tuple(outputs))
    return fx.GraphModule(root, graph, "CapturedParts"), tuple(inputs)


def _inside(part: _Part, name: str) -> str | None:
    """A model-level candidate name as the part's own graph names it (None: not in this part)."""
    if name.startswith(part.name + "."):
        return name[len(part.name) + 1 :]
    return "weight" if name == part.name else None  # the part is a layer: its graph reads its own "weight"


def _outside(part: _Part, name: str) -> str:
    return part.name if name == "weight" and isinstance(part.module, (nn.Conv2d, nn.Linear)) else f"{part.name}.{name}"


@dataclass(frozen=True)
class _Constant:
    value: object  # a placeholder's default, inlined rather than passed


def _try_capture(path: str, module: nn.Module, calls: list, frontend: str) -> tuple[_Part | None, str]:
    from ..frontend import capture_with_source

    positional = [_positional(module, args, kwargs) for args, kwargs in calls]
    if any(args is None for args in positional):
        return None, "its forward takes variadic or keyword-only arguments"
    if not all(isinstance(leaf, (torch.Tensor, *_CONSTANTS)) for args in positional for leaf in tree_leaves(args)):
        return None, "receives inputs that are neither tensors nor plain constants"
    keywords = any(kwargs for _, kwargs in calls)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a part that fails is reported in the notes, not by warnings
            gm, used, _ = capture_with_source(module, positional[0], "fx" if keywords and frontend == "auto" else frontend)
        bindings = [_bind(gm, used, args) for args in positional]
        with torch.no_grad():
            for args, kwargs in calls:  # called as its parent calls it (keywords too)
                if not _same(gm(*_clone(args), **_clone(kwargs)), module(*_clone(args), **_clone(kwargs))):
                    return None, "its captured graph does not reproduce every call"
    except (FxDecompError, _Unbindable) as exc:
        return None, _first_line(exc)
    except Exception as exc:  # a captured graph that fails on another call's inputs
        return None, f"captured graph fails on a recorded call: {_first_line(exc)}"
    return _Part(path, module, gm, used, positional, bindings), ""


class _Unbindable(Exception):
    pass


_CONSTANTS = (type(None), bool, int, float, str)


def _positional(module: nn.Module, args: tuple, kwargs: dict) -> tuple | None:
    """The call's arguments, defaults filled in, as one positional tuple (None: variadic or keyword-only forward)."""
    if not kwargs:
        return args
    try:
        signature = inspect.signature(module.forward)
        bound = signature.bind(*args, **kwargs)
    except (TypeError, ValueError):
        return None
    if any(p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in signature.parameters.values()):
        return None
    bound.apply_defaults()
    return tuple(bound.arguments.values())


def _bind(gm: fx.GraphModule, frontend: str, args: tuple) -> list:
    """The value of each placeholder of ``gm`` for a call with positional ``args``."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if frontend == "export":
        leaves = tree_leaves(args)
        if len(leaves) != len(placeholders):
            raise _Unbindable(f"export graph has {len(placeholders)} inputs for {len(leaves)} tensors")
        return [leaf if isinstance(leaf, torch.Tensor) else _Constant(leaf) for leaf in leaves]
    values = []
    for index, node in enumerate(placeholders):
        if str(node.target).startswith("*"):
            raise _Unbindable("variadic forward")
        if index < len(args):
            leaves = tree_leaves(args[index])
            values.append(args[index] if leaves and all(isinstance(x, torch.Tensor) for x in leaves) else _Constant(args[index]))
        elif node.args:
            values.append(_Constant(node.args[0]))
        else:
            raise _Unbindable(f"no value for input {node.target!r}")
    if len(args) > len(placeholders):
        raise _Unbindable("more arguments than inputs")
    return values


def _same(actual, expected) -> bool:
    a, e = tree_leaves(actual), tree_leaves(expected)
    if len(a) != len(e):
        return False
    for x, y in zip(a, e):
        if isinstance(y, torch.Tensor):
            if not isinstance(x, torch.Tensor) or x.shape != y.shape or not torch.allclose(x, y, rtol=1e-4, atol=1e-5, equal_nan=True):
                return False
    return True


def _has_layer_weights(module: nn.Module) -> bool:
    return any(isinstance(m, (nn.Conv2d, nn.Linear)) for m in module.modules()) or any(
        p.dim() in (2, 4) and p.is_floating_point() for p in module.parameters()
    )


def _set_submodule(root: nn.Module, path: str, module: nn.Module, create: bool = False) -> None:
    *parents, name = path.split(".")
    owner = root
    for part in parents:
        if create and not hasattr(owner, part):
            owner.add_module(part, nn.Module())
        owner = getattr(owner, part)
    setattr(owner, name, module)


def _clone(value):
    return tree_map(lambda t: t.detach().clone() if isinstance(t, torch.Tensor) else t, value)


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
