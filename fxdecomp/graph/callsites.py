"""Where a weight reaches a Conv or Linear op: the call forms a captured graph can hold, one table entry each.

A candidate is a weight at its call sites. The weight may reach the op through a
module call (positional or keyword input), ``F.linear`` / ``F.conv2d`` (keywords
too), ``torch.addmm``, ``x @ W.t()`` / ``torch.matmul(x, W.T)``, or the aten ops
of a torch.export graph. `match_call` recognises them; adding a function form
is one entry of `FUNCTION_MATCHERS`; the conv functions of every kind come from
`fxdecomp.conv_calls.CONV_CALLS`.

Each match carries a ``key``: the identity of the weight tensor (its storage,
not its name, so tied weights are one key) and of everything else that fixes
the layer (bias, stride, padding, ...). Sites with one key are one candidate.

Example::

    use = match_call(gm, node)   # WeightUse(form="function", target="attn.wq", layer=Linear(32, 32), ...) or None
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from .. import meta
from ..conv_calls import CONV_CALLS, lifted_conv
from ..layer_spec import LAYER_TYPES
from ..transformers_layers import as_linear, is_conv1d

aten = torch.ops.aten

MODULE_TYPES: tuple[type[nn.Module], ...] = LAYER_TYPES  # Linear, Conv1d/2d/3d, ConvTranspose1d/2d/3d
STANDARD_FORWARDS = {cls.forward for cls in LAYER_TYPES}
CONV_FUNCTIONS = set(CONV_CALLS)  # every conv kind and call form: see fxdecomp.conv_calls
LINEAR_FUNCTIONS = {F.linear, aten.linear.default}
ADDMM_FUNCTIONS = {torch.addmm, aten.addmm.default}
MATMUL_FUNCTIONS = {torch.matmul, operator.matmul, torch.mm, aten.matmul.default, aten.mm.default}


def tensor_key(tensor: torch.Tensor) -> tuple:
    """Identity of a tensor's data: two names for one storage view (tied weights) give one key."""
    return (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tuple(tensor.stride()), tensor.device.type)


@dataclass(frozen=True)
class WeightUse:
    """One call of a layer on a weight: its form, the module path or weight path, the layer it computes."""

    form: str  # "module" or "function"
    target: str  # call_module target, or the weight's parameter path (get_attr target)
    layer: nn.Module  # the module, or an equivalent built around the weight (meta device, no copy)
    input_node: fx.Node
    key: tuple  # same key: same weight, same layer configuration

    @property
    def weight_path(self) -> str:
        return f"{self.target}.weight" if self.form == "module" else self.target


def match_call(gm: fx.GraphModule, node: fx.Node) -> WeightUse | None:
    """The WeightUse if ``node`` applies a Conv or Linear to a parameter, else None."""
    if node.op == "call_module":
        return match_module(gm, node)
    if node.op == "call_function":
        matcher = FUNCTION_MATCHERS.get(node.target) if _hashable(node.target) else None
        return matcher(gm, node) if matcher is not None else None
    return None


def _hashable(target) -> bool:
    try:
        hash(target)
    except TypeError:
        return False
    return True


def layer_key(layer: nn.Module) -> tuple:
    """What makes two calls the same layer: the weight and bias tensors and the op's configuration."""
    bias = getattr(layer, "bias", None)
    config = tuple(
        str(getattr(layer, a)) for a in ("stride", "padding", "dilation", "groups", "padding_mode", "output_padding") if hasattr(layer, a)
    )
    return (type(layer).__name__, tensor_key(layer.weight), tensor_key(bias) if bias is not None else None, config)


def match_module(gm: fx.GraphModule, node: fx.Node) -> WeightUse | None:
    module = gm.get_submodule(node.target)
    if is_conv1d(module):  # transformers' Conv1D: a Linear with its weight stored (in, out)
        value = node.args[0] if node.args else node.kwargs.get("x")
        return WeightUse("module", node.target, as_linear(module), value, ("module", node.target)) if isinstance(value, fx.Node) else None
    if not isinstance(module, MODULE_TYPES):
        return None
    if getattr(module, "transposed", False) and (len(node.args) > 1 or "output_size" in node.kwargs):
        return None  # ConvTranspose called with output_size: its output padding depends on the call
    value = node.args[0] if node.args else node.kwargs.get("input")
    if not isinstance(value, fx.Node):
        return None
    key = layer_key(module) if type(module).forward in STANDARD_FORWARDS else ("module", node.target)
    return WeightUse("module", node.target, module, value, key)


def _bind(node: fx.Node, names: list[str]) -> dict:
    return dict(zip(names, node.args)) | dict(node.kwargs)


def _attr(gm: fx.GraphModule, node) -> tuple[str, torch.Tensor] | None:
    """(path, tensor) if ``node`` reads a parameter or buffer of ``gm``."""
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    value = operator.attrgetter(node.target)(gm)
    return (node.target, value) if isinstance(value, torch.Tensor) else None


def _optional_attr(gm, node) -> tuple[bool, torch.Tensor | None]:
    """(ok, bias): no bias is fine; a bias that is not a stored tensor is not a layer we can lift."""
    if node is None:
        return True, None
    found = _attr(gm, node)
    return (found is not None and found[1].dim() == 1), (found[1] if found else None)


_TRANSPOSE_METHODS = {"t", "transpose", "permute"}


def transposed_attr(gm: fx.GraphModule, node) -> tuple[str, torch.Tensor] | None:
    """The Linear weight (out, in) behind a matmul's right operand: ``W.t()``, ``W.T``, ``W.transpose(0, 1)``, or a stored (in, out) matrix."""
    if isinstance(node, fx.Node) and node.op in ("call_method", "call_function") and node.args:
        name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
        rest = tuple(node.args[1:])
        if node.target is getattr and rest in (("T",), ("mT",)):
            found = _attr(gm, node.args[0])
        elif node.target in (aten.numpy_T.default, aten.mT.default):  # W.T and W.mT as torch.export records them
            found = _attr(gm, node.args[0])
        elif name in _TRANSPOSE_METHODS or node.target in (aten.t.default, aten.permute.default, aten.transpose.int):
            flat = tuple(rest[0]) if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else rest
            found = _attr(gm, node.args[0]) if flat in ((), (1, 0), (0, 1), (-1, -2), (-2, -1)) else None
        else:
            found = None
        if found is not None:
            return found if found[1].dim() == 2 else None
    found = _attr(gm, node)
    if found is None or found[1].dim() != 2:
        return None
    return found[0], found[1].T


def lifted_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An nn.Linear on the meta device whose weight and bias ARE the given tensors (no copy), trainable as they are
    (the factors inherit it: ``decomposers.base.inherit_trainable``)."""
    layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    layer.weight = nn.Parameter(weight.detach(), requires_grad=trainable(weight))
    if bias is not None:
        layer.bias = nn.Parameter(bias.detach(), requires_grad=trainable(bias))
    return layer


def trainable(tensor: torch.Tensor) -> bool:
    """Whether ``tensor``, or the parameter it is a view of (``W.T`` read under no_grad), requires grad."""
    return bool(tensor.requires_grad or (tensor._base is not None and tensor._base.requires_grad))


def _function_use(target: str, layer: nn.Module, value) -> WeightUse | None:
    if not isinstance(value, fx.Node):
        return None
    return WeightUse("function", target, layer, value, layer_key(layer))


def match_conv(gm: fx.GraphModule, node: fx.Node) -> WeightUse | None:
    """A conv call of any kind (``F.conv1d`` .. ``aten.conv_transpose3d.input``, ``aten.convolution``; kwargs too)."""
    call = CONV_CALLS[node.target]
    values = _bind(node, list(call.arg_names))
    weight = _attr(gm, values.get("weight"))
    ok, bias = _optional_attr(gm, values.get("bias"))
    if weight is None or not ok:
        return None
    layer = lifted_conv(call, weight[1], bias, values)
    return None if layer is None else _function_use(weight[0], layer, values.get("input"))


def match_linear(gm: fx.GraphModule, node: fx.Node) -> WeightUse | None:
    """``F.linear(input, weight, bias)`` and ``aten.linear`` (kwargs too)."""
    values = _bind(node, ["input", "weight", "bias"])
    weight = _attr(gm, values.get("weight"))
    ok, bias = _optional_attr(gm, values.get("bias"))
    if weight is None or not ok or weight[1].dim() != 2:
        return None
    return _function_use(weight[0], lifted_linear(weight[1], bias), values.get("input"))


def match_addmm(gm: fx.GraphModule, node: fx.Node) -> WeightUse | None:
    """``torch.addmm(bias, x, W.t())`` with beta = alpha = 1: a Linear with bias."""
    values = _bind(node, ["input", "mat1", "mat2"])
    if values.get("beta", 1) != 1 or values.get("alpha", 1) != 1:
        return None
    bias, weight = _attr(gm, values.get("input")), transposed_attr(gm, values.get("mat2"))
    if bias is None or weight is None or bias[1].dim() != 1:
        return None
    return _function_use(weight[0], lifted_linear(weight[1], bias[1]), values.get("mat1"))


def match_matmul(gm: fx.GraphModule, node: fx.Node) -> WeightUse | None:
    """``x @ W.t()``, ``torch.matmul(x, W.T)``, ``torch.mm(x, W_in_out)``: a Linear without bias."""
    values = _bind(node, ["input", "other"])
    if "mat2" in values:  # torch.mm(input, mat2)
        values["other"] = values["mat2"]
    weight = transposed_attr(gm, values.get("other"))
    shape = values["input"].meta.get(meta.SHAPE) if isinstance(values.get("input"), fx.Node) else None
    if weight is None or shape is None or len(shape) < 2:
        return None
    return _function_use(weight[0], lifted_linear(weight[1], None), values.get("input"))


FUNCTION_MATCHERS: dict[Callable, Callable[[fx.GraphModule, fx.Node], WeightUse | None]] = {
    **{f: match_conv for f in CONV_FUNCTIONS},
    **{f: match_linear for f in LINEAR_FUNCTIONS},
    **{f: match_addmm for f in ADDMM_FUNCTIONS},
    **{f: match_matmul for f in MATMUL_FUNCTIONS},
}


def weight_users(gm: fx.GraphModule) -> dict[tuple, set[fx.Node]]:
    """For each stored tensor (by `tensor_key`, so tied weights are one entry): the nodes that read it.

    A ``get_attr`` counts through its users (the ops it feeds); a ``call_module``
    counts for every parameter and buffer of the called module (an nn.Embedding
    whose weight is also an output head's).
    """
    users: dict[tuple, set[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            found = _attr(gm, node)
            if found is not None:
                users.setdefault(tensor_key(found[1]), set()).update(node.users)
        elif node.op == "call_module":
            module = gm.get_submodule(node.target)
            for tensor in [*module.parameters(), *module.buffers()]:
                users.setdefault(tensor_key(tensor), set()).add(node)
    return users


def weight_aliases(model: nn.Module | None) -> dict[str, tuple[str, ...]]:
    """Every parameter or buffer path of ``model`` -> all the paths of that tensor, in registration order.

    A tied weight has several paths (``emb.weight`` and ``head.weight``); which one a captured
    graph reads depends on the frontend (the attribute the code read under torch.fx, one
    torch.export picks), so names built from a path go through this map. None gives {}.
    """
    if model is None:
        return {}
    groups: dict[int, list[str]] = {}
    named = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    for path, tensor in named:
        groups.setdefault(id(tensor), []).append(path)
    return {path: tuple(paths) for paths in groups.values() for path in paths}


def module_aliases(model: nn.Module | None) -> dict[str, str]:
    """Every submodule path of ``model`` -> the first path of that module (one module registered under two names
    is one layer: torch.fx names it by the first, torch.export by the one the code called)."""
    if model is None:
        return {}
    first: dict[int, str] = {}
    paths = {}
    for path, module in model.named_modules(remove_duplicate=False):
        paths[path] = first.setdefault(id(module), path)
    return paths
