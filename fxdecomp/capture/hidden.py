"""Weights hidden inside opaque calls: parameters a captured graph hands to calls fx does not trace into.

torch.fx keeps functions marked with ``torch.fx.wrap`` (torchvision's Swin
``shifted_window_attention``, user helpers) and scripted submodules
(``torch.jit.ScriptModule``, called through their ``_c`` object) as single
opaque nodes: a Linear weight passed into one is not a candidate, and its FLOPs
cannot be reduced. `opaque_weights` lists such parameters so that capture can
fall back to torch.export (which traces into ``fx.wrap``'d functions and
records ``aten.linear``) or name them in a warning.

Only Linear- and Conv2d-shaped parameters (2-D and 4-D floating tensors) count;
calls into torch itself (aten ops, ``torch.*``, ``F.*``, tensor methods) are
seen by the candidate matcher and are not opaque. Higher-order operators are.

Example::

    gm = fx_trace(model)
    for w in opaque_weights(gm):
        print(w.parameter, w.consumer)   # "w1", "function attn_like (torch.fx.wrap)"
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx, nn

from ..graph.effects import opaque_function

OPAQUE_WEIGHTS = "fxdecomp.opaque_weights"  # GraphModule.meta key: tuple[OpaqueWeight, ...] found at capture


@dataclass(frozen=True)
class OpaqueWeight:
    """A Linear/Conv-shaped parameter that reaches an opaque call (its FLOPs stay as they are)."""

    parameter: str  # qualified name in the captured module
    shape: tuple[int, ...]
    consumer: str  # what hides it, e.g. "function attn_like (torch.fx.wrap)" or "scripted submodule 'inner'"


def opaque_weights(gm: fx.GraphModule) -> tuple[OpaqueWeight, ...]:
    """The 2-D / 4-D floating parameters of ``gm`` that reach an opaque call, in graph order.

    Opaque: a ``call_function`` whose target is not part of torch (an ``fx.wrap``'d
    function) or is a higher-order operator, and a scripted submodule called through
    its ``_c`` object. Returns an empty tuple when every weight is visible.
    """
    found: dict[str, OpaqueWeight] = {}
    for node in gm.graph.nodes:
        if node.op != "get_attr":
            continue
        value = _attribute(gm, node.target)
        if isinstance(value, torch._C.ScriptModule):
            owner = node.target[: -len("._c")] if node.target.endswith("._c") else node.target
            module = torch.jit._recursive.wrap_cpp_module(value)  # fx keeps only the C++ object
            if isinstance(module, nn.Module):
                for name, param in module.named_parameters():
                    if _layer_shaped(param):
                        qualified = f"{owner}.{name}"
                        found.setdefault(qualified, OpaqueWeight(qualified, tuple(param.shape), f"scripted submodule {owner!r}"))
            continue
        if not isinstance(value, torch.Tensor) or not _layer_shaped(value):
            continue
        for user in node.users:
            if user.op == "call_function" and opaque_function(user.target):
                found.setdefault(node.target, OpaqueWeight(node.target, tuple(value.shape), _describe(user.target)))
    return tuple(found.values())


# What a Linear / conv / matmul is at aten dispatch (F.linear and torch.matmul are decomposed before it): an operand
# of one of these is multiplied with as a layer.
_LAYER_OPS = ("mm", "addmm", "bmm", "baddbmm", "mv", "addmv", "convolution", "_convolution")
# Ops at dispatch whose output is the weight in another layout or dtype (reshape, contiguous, .to() reach it as these).
_CARRIES = ("_to_copy", "clone", "t", "transpose", "permute", "view", "_unsafe_view", "expand", "detach", "alias",
            "unsqueeze", "squeeze", "slice", "select", "unbind", "split", "copy_")


def used_as_layers(gm: fx.GraphModule, example_inputs: tuple, hidden: tuple[OpaqueWeight, ...]) -> tuple[OpaqueWeight, ...]:
    """Those of ``hidden`` that running ``gm`` on ``example_inputs`` multiplies with as a layer (an operand of a matrix
    product or convolution, seen at aten dispatch, so inside opaque Python functions too). A table the opaque call only
    adds or indexes (torchvision MViT's relative positions) hides no FLOPs. Weights of scripted submodules, which run
    below dispatch, and everything when the run fails, are kept."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from ..graph.effects import fresh_inputs, preserved_buffers

    storages = {}
    for weight in hidden:
        value = _attribute(gm, weight.parameter)
        if isinstance(value, torch.Tensor) and not weight.consumer.startswith("scripted"):
            if value.numel():
                storages[value.untyped_storage().data_ptr()] = weight.parameter
    if not storages:
        return hidden
    seen: set[str] = set()
    alive: list[torch.Tensor] = []

    def watched(tensor) -> str | None:
        return storages.get(tensor.untyped_storage().data_ptr()) if isinstance(tensor, torch.Tensor) and tensor.numel() else None

    class _Operands(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            sources = [w for w in map(watched, args) if w is not None]
            if sources and name in _LAYER_OPS:
                seen.update(sources)
            out = func(*args, **(kwargs or {}))
            if sources and name in _CARRIES:  # a copy, cast or view of a weight is the weight (autocast, .contiguous())
                for tensor in (out if isinstance(out, (tuple, list)) else (out,)):
                    if isinstance(tensor, torch.Tensor) and tensor.numel():
                        storages.setdefault(tensor.untyped_storage().data_ptr(), sources[0])
                        alive.append(tensor)  # held for the run: a freed copy's address may come back as another tensor
            return out

    try:
        with torch.no_grad(), preserved_buffers(gm), _Operands():
            gm(*fresh_inputs(example_inputs))
    except Exception:  # judged by shape alone, as before
        return hidden
    names = set(storages.values())
    return tuple(w for w in hidden if w.parameter not in names or w.parameter in seen)


def _layer_shaped(tensor: torch.Tensor) -> bool:
    return tensor.dim() in (2, 4) and tensor.is_floating_point()


def _attribute(gm: nn.Module, target: str):
    value = gm
    for part in target.split("."):
        value = getattr(value, part, None)
        if value is None:
            return None
    return value


def _describe(target) -> str:
    if isinstance(target, torch._ops.HigherOrderOperator):
        return f"higher-order operator {target.name()}"
    name = getattr(target, "__qualname__", None) or getattr(target, "__name__", repr(target))
    module = getattr(target, "__module__", "")
    return f"function {module + '.' if module else ''}{name} (torch.fx.wrap)"
