"""BatchNorm folding into conv / Linear *ops*: the layers of a torch.export graph.

torch.export records an ``nn.Conv2d`` as ``aten.conv2d(x, conv.weight, conv.bias, ...)`` on
the module's own parameters (``get_attr`` nodes), and fxdecomp turns the BatchNorm after it
back into a module (`fxdecomp.capture.export_modules`). Folding such a pair writes the
folded weight and bias (torch's ``fuse_conv_bn_weights`` / ``fuse_linear_bn_weights``)
into the parameters the op reads, adding a ``bias`` parameter to the layer's module when
it had none, and drops the BatchNorm. The rule is `fold_batchnorm`'s: the op is the only
reader of its output and of its weight and bias, and the pair is checked numerically.
Keep-the-model mode copies the folded parameters into the user's own layer module.
"""

from __future__ import annotations

import torch
from torch import fx, nn
from torch.nn.utils.fusion import fuse_conv_bn_weights, fuse_linear_bn_weights

from ..graph.callsites import WeightUse, match_call, tensor_key, weight_aliases, weight_users

aten = torch.ops.aten
# Conv and Linear ops torch.export emits for the layers `fold_batchnorm.PATTERNS` folds, with the BatchNorm each takes.
OP_PATTERNS = {
    aten.conv1d.default: nn.BatchNorm1d, aten.conv1d.padding: nn.BatchNorm1d,
    aten.conv2d.default: nn.BatchNorm2d, aten.conv2d.padding: nn.BatchNorm2d,
    aten.conv3d.default: nn.BatchNorm3d, aten.conv3d.padding: nn.BatchNorm3d,
    aten.linear.default: nn.BatchNorm1d,
}
BIAS_ARG = 2  # the bias's position in every op above: (input, weight, bias, ...)


def module_calls(gm: fx.GraphModule) -> dict[str, int]:
    """How many ``call_module`` nodes call each module path."""
    calls: dict[str, int] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    return calls


def normalises(norm: nn.Module, channels: int, calls: dict[str, int], path: str) -> bool:
    """Whether BatchNorm ``norm`` (at ``path``) can be folded into a layer of ``channels`` output channels:
    running statistics, one per channel, and no other call of the same module (it stays for that one)."""
    return norm.track_running_stats and norm.running_mean is not None and norm.num_features == channels and calls.get(path) == 1


def is_layer_op(node: fx.Node) -> bool:
    """Whether ``node`` calls one of the conv / Linear ops of `OP_PATTERNS`."""
    return node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload) and node.target in OP_PATTERNS


def op_layer(gm: fx.GraphModule, node: fx.Node) -> tuple[str, WeightUse] | None:
    """(the layer module's path, its use) if ``node`` is a conv / Linear op on ``<path>.weight`` (and ``<path>.bias``)."""
    if not is_layer_op(node):
        return None
    use = match_call(gm, node)
    if use is None or use.form != "function":
        return None
    path, _, attribute = use.target.rpartition(".")
    if not path or attribute != "weight":
        return None
    bias = node.kwargs.get("bias", node.args[BIAS_ARG] if len(node.args) > BIAS_ARG else None)
    if bias is not None and not (isinstance(bias, fx.Node) and bias.op == "get_attr" and bias.target == f"{path}.bias"):
        return None
    owner = gm.get_submodule(path)
    if "weight" not in owner._parameters or (bias is not None and "bias" not in owner._parameters):
        return None  # buffers or constants: the folded tensors are written as parameters
    if bias is None and (owner._parameters.get("bias") is not None or (hasattr(owner, "bias") and "bias" not in owner._parameters)):
        return None  # no room for the folded bias under ``<path>.bias``
    return path, use


def foldable_ops(gm: fx.GraphModule) -> list[fx.Node]:
    """BatchNorm module nodes (running statistics, one per output channel, called once) right after a conv / Linear
    op that only they read, whose weight and bias nothing else reads and no other path names (a tied weight)."""
    users, aliases, calls = weight_users(gm), weight_aliases(gm), module_calls(gm)
    found = []
    for node in gm.graph.nodes:
        source = node.args[0] if node.op == "call_module" and node.args else None
        if not isinstance(source, fx.Node) or len(source.users) != 1 or not is_layer_op(source):
            continue
        layer = op_layer(gm, source)
        norm = gm.get_submodule(node.target)
        if layer is None or OP_PATTERNS[source.target] is not type(norm):
            continue
        path, use = layer
        if not normalises(norm, use.layer.weight.shape[0], calls, node.target):
            continue
        tensors = [use.layer.weight] + ([use.layer.bias] if use.layer.bias is not None else [])
        if len(aliases.get(f"{path}.weight", ())) == 1 and all(users.get(tensor_key(t), set()) <= {source} for t in tensors):
            found.append(node)
    return found


def fold_op(gm: fx.GraphModule, node: fx.Node, x: torch.Tensor, tolerance: float) -> tuple[str, bool]:
    """Fold BatchNorm ``node`` into the op before it (input ``x``), in place: (the layer's path, whether it was
    folded; not when the folded op does not reproduce the pair on ``x``)."""
    source = node.args[0]
    path, use = op_layer(gm, source)
    layer, norm = use.layer, gm.get_submodule(node.target)
    weight_scale = norm.weight if norm.weight is not None else torch.ones_like(norm.running_var)
    shift = norm.bias if norm.bias is not None else torch.zeros_like(norm.running_mean)
    fuse = fuse_linear_bn_weights if isinstance(layer, nn.Linear) else fuse_conv_bn_weights
    args, kwargs = list(source.args), {k: v for k, v in source.kwargs.items() if k != "bias"}
    with torch.no_grad():
        weight, bias = fuse(layer.weight, layer.bias, norm.running_mean, norm.running_var, norm.eps, weight_scale, shift)
        expected = norm(source.target(x, layer.weight, layer.bias, *args[BIAS_ARG + 1 :], **kwargs))
        actual = source.target(x, weight, bias, *args[BIAS_ARG + 1 :], **kwargs)
    if float((actual - expected).norm()) > tolerance * float(expected.norm()) + 1e-30:
        return path, False
    owner = gm.get_submodule(path)
    requires_grad = owner.weight.requires_grad
    owner.register_parameter("weight", nn.Parameter(weight.detach(), requires_grad))
    owner.register_parameter("bias", nn.Parameter(bias.detach(), requires_grad))
    if layer.bias is None:  # the op read no bias: it reads the new one
        with gm.graph.inserting_before(source):
            bias_node = gm.graph.get_attr(f"{path}.bias")
        if "bias" in source.kwargs:
            source.kwargs = {**source.kwargs, "bias": bias_node}
        else:
            source.args = tuple(args[:BIAS_ARG] + [bias_node] + args[BIAS_ARG + 1 :])
    node.replace_all_uses_with(source)
    gm.graph.erase_node(node)
    return path, True
