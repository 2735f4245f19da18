"""fxdecomp next to torch.compile: compress, then compile; and a dynamo backend named ``"fxdecomp"``.

Example::

    import fxdecomp, torch
    fast = fxdecomp.compile(model, (x,), budget=0.5)          # torch.compile(compressed), inductor
    fast(x); fast.compression.report()                        # the CompressionResult
    fast, result = compile_with_result(model, (x,), budget=0.5, mode="max-autotune")

    # or as a backend (inference only, static shapes, weights frozen at compile time):
    with torch.no_grad():
        torch.compile(model, backend="fxdecomp", dynamic=False, options={"budget": 0.5})(x)
"""

from __future__ import annotations

import inspect
import re
import weakref
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import fx, nn

from .budget import Budget
from .compress import compress
from .errors import InvalidInputError
from .result import CompressionResult

__all__ = ["BACKEND_OPTIONS", "compile", "compile_with_result", "fxdecomp_backend"]


def compile_with_result(
    model: nn.Module,
    example_inputs: tuple | torch.Tensor,
    budget: float | Budget = 0.5,
    **kwargs: Any,
) -> tuple[Callable, CompressionResult]:
    """(``torch.compile(result.graph_module, **rest)``, result) of ``compress(model, example_inputs, budget, ...)``.

    Every keyword that `compress` takes (methods, calibration, exclude, pipeline, plan,
    sensitivity, dynamic_shapes, partial, ...) goes to it, read off its signature so the two
    cannot drift apart; the rest (backend, mode, fullgraph, dynamic, options) go to torch.compile.
    """
    accepted = inspect.signature(compress).parameters
    compress_kwargs = {name: kwargs.pop(name) for name in list(kwargs) if name in accepted}
    result = compress(model, example_inputs, budget, **compress_kwargs)
    return torch.compile(result.graph_module, **kwargs), result


def compile(  # noqa: A001  (fxdecomp.compile, after torch.compile)
    model: nn.Module,
    example_inputs: tuple | torch.Tensor,
    budget: float | Budget = 0.5,
    **kwargs: Any,
) -> Callable:
    """Compress ``model`` under ``budget``, then ``torch.compile`` the result.

    Keyword arguments of `compress` go to it; the others (backend, mode, fullgraph,
    dynamic, options) go to torch.compile (see `compile_with_result`). The
    CompressionResult is the returned callable's ``compression`` attribute. The default
    recipe's plan follows onnxruntime latency on this CPU; for inductor on another
    device, ``pipeline="flops"`` plans on FLOPs alone.
    """
    compiled, result = compile_with_result(model, example_inputs, budget, **kwargs)
    # OptimizedModule forwards attribute writes to the wrapped module; keep this one on the wrapper.
    if isinstance(compiled, nn.Module):
        nn.Module.__setattr__(compiled, "compression", result)
    else:
        compiled.compression = result
    return compiled


# ---- the dynamo backend ---------------------------------------------------------------------

BACKEND_OPTIONS = ("budget", "methods", "exclude", "pipeline", "backend")
# One plan per set of weights and graph: a recompile (a new input shape) decomposes the same way.
_PLANS: dict[tuple, tuple[list[weakref.ref], list]] = {}  # (weight ids, graph code) -> (weakrefs, decisions)


def fxdecomp_backend(gm: fx.GraphModule, example_inputs: list, options: Mapping[str, Any] | None = None, mode: str | None = None):
    """Dynamo backend: decompose the captured graph under a budget, then hand it to another backend.

    ``options``: ``budget`` (default 0.5, of this graph's FLOPs), ``methods``, ``exclude``,
    ``pipeline``, and ``backend`` (the one that compiles the result, default "inductor").

    It is sound only under conditions it checks, raising InvalidInputError otherwise:
    inference (no gradient needed for a parameter), static shapes (``dynamic=False``), and
    weights that do not change after compiling (each call checks that the parameters are
    the same tensors, not written to since). With graph breaks, each graph is compressed on
    its own; pass ``fullgraph=True`` for one budget over the whole model.
    """
    options = dict(options or {})
    unknown = sorted(set(options) - set(BACKEND_OPTIONS))
    if unknown or mode is not None:
        raise InvalidInputError(
            f"the fxdecomp backend takes options {list(BACKEND_OPTIONS)}"
            + (f", not {unknown}" if unknown else "")
            + (f"; mode={mode!r} is not supported (use fxdecomp.compile(model, ..., mode=...))" if mode is not None else "")
        )
    params = [i for i, x in enumerate(example_inputs) if isinstance(x, nn.Parameter)]
    frozen, attr_params = _freeze(gm, example_inputs, params)
    weights = [example_inputs[i] for i in params] + attr_params
    if torch.is_grad_enabled() and any(w.requires_grad for w in weights):
        raise InvalidInputError(
            "the fxdecomp backend is for inference: its factors are computed once from the weights, so "
            "gradients would not reach them; run the model under torch.no_grad() or torch.inference_mode()"
        )
    if any(not isinstance(x, torch.Tensor) or isinstance(x, torch._subclasses.FakeTensor) for x in example_inputs):
        raise InvalidInputError(
            "the fxdecomp backend needs static shapes and real example tensors; call torch.compile(..., dynamic=False)"
        )
    user_inputs = [x for i, x in enumerate(example_inputs) if i not in set(params)]
    result = compress(
        frozen,
        tuple(user_inputs),
        options.get("budget", 0.5),
        methods=options.get("methods"),
        exclude=options.get("exclude", ()),
        pipeline=options.get("pipeline"),
        plan=_saved_plan(weights, frozen.code),
    )
    _save_plan(weights, frozen.code, result.decisions)
    backend = torch._dynamo.lookup_backend(options.get("backend", "inductor"))
    compiled = backend(result.graph_module, user_inputs)
    placeholders = [(i, example_inputs[i]) for i in params]
    versions = [(w, w._version) for w in weights]
    keep = [i for i in range(len(example_inputs)) if i not in set(params)]

    def run(*args):
        if any(args[i] is not w for i, w in placeholders) or any(w._version != v for w, v in versions):
            raise InvalidInputError(
                "the fxdecomp backend froze the weights when it compiled, and a parameter has changed since "
                "(replaced or written to); call torch._dynamo.reset() and compile again"
            )
        return compiled(*(args[i] for i in keep))

    run.compression = result
    return run


def _saved_plan(weights: list[torch.Tensor], code: str) -> list | None:
    entry = _PLANS.get((tuple(map(id, weights)), code))
    if entry is not None and all(ref() is w for ref, w in zip(entry[0], weights)):
        return entry[1]
    return None


def _save_plan(weights: list[torch.Tensor], code: str, decisions: list) -> None:
    for key in [k for k, (refs, _) in _PLANS.items() if any(ref() is None for ref in refs)]:
        del _PLANS[key]  # weights that are gone: ids may be reused
    _PLANS[(tuple(map(id, weights)), code)] = ([weakref.ref(w) for w in weights], decisions)


def _freeze(gm: fx.GraphModule, example_inputs: list, params: list[int]) -> tuple[fx.GraphModule, list[torch.Tensor]]:
    """A copy of ``gm`` whose parameter placeholders are attributes (get_attr) holding their values.

    Also returns the parameters that ``gm`` already held as attributes (when dynamo does
    not lift them to inputs), which are frozen just the same.
    """
    root = nn.Module()
    for name, module in gm.named_children():
        root.add_module(name, module)
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    param_nodes = {placeholders[i]: example_inputs[i] for i in params}
    taken: set[str] = set()
    attr_params: list[torch.Tensor] = []
    for node in gm.graph.nodes:
        if node in param_nodes:
            target = _unique(_source_path(node), taken, root)
            _set_tensor(root, target, param_nodes[node])
            env[node] = graph.get_attr(target)
            continue
        if node.op == "get_attr":
            value = _get(gm, node.target)
            if isinstance(value, torch.Tensor) and not _has(root, node.target):
                _set_tensor(root, node.target, value)
                if isinstance(value, nn.Parameter):
                    attr_params.append(value)
            taken.add(node.target)
        env[node] = graph.node_copy(node, lambda n: env[n])
    return fx.GraphModule(root, graph, "FrozenGraph"), attr_params


def _source_path(node: fx.Node) -> str:
    """The parameter's qualified name in the user's model (``features.0.weight``), or the placeholder's name."""
    source = getattr(node.meta.get("grapharg"), "source", None)
    name = getattr(source, "name", "")
    name = name() if callable(name) else str(name)  # a method in older torch, a property in newer
    keys = re.findall(r"\['([^'\]]+)'\]", name)
    if len(keys) >= 2 and keys[0] == "self":
        path = ".".join(keys[1:])
        if all(part.isidentifier() or part.isdigit() for part in path.split(".")):
            return path
    return node.name


def _unique(target: str, taken: set[str], root: nn.Module) -> str:
    name, k = target, 0
    while name in taken or _has(root, name):
        k += 1
        name = f"{target}_{k}"
    taken.add(name)
    return name


def _get(module: nn.Module, target: str):
    for part in target.split("."):
        module = getattr(module, part)
    return module


def _has(module: nn.Module, target: str) -> bool:
    try:
        _get(module, target)
    except AttributeError:
        return False
    return True


def _set_tensor(root: nn.Module, target: str, value: torch.Tensor) -> None:
    *path, leaf = target.split(".")
    module = root
    for part in path:
        if not hasattr(module, part):
            module.add_module(part, nn.Module())
        module = getattr(module, part)
    module.register_buffer(leaf, value.detach())


try:
    torch._dynamo.register_backend(fxdecomp_backend, name="fxdecomp")
except AssertionError:  # already registered (the module was reloaded)
    pass
