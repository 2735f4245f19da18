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

from ..graph.callsites import WeightUse, match_call, tensor_key, weight_users

aten = torch.ops.aten
# Conv and Linear ops torch.export emits for the layers `fold_batchnorm.PATTERNS` folds, with the BatchNorm each takes.
OP_PATTERNS = {
    aten.conv1d.default: nn.BatchNorm1d, aten.conv1d.padding: nn.BatchNorm1d,
    aten.conv2d.default: nn.BatchNorm2d, aten.conv2d.padding: nn.BatchNorm2d,
    aten.conv3d.default: nn.BatchNorm3d, aten.conv3d.padding: nn.BatchNorm3d,
    aten.linear.default: nn.BatchNorm1d,
}
BIAS_ARG = 2  # the bias's position in every op above: (input, weight, bias, ...)


def op_layer(gm: fx.GraphModule, node: fx.Node) -> tuple[str, WeightUse] | None:
    """(the layer module's path, its use) if ``node`` is a conv / Linear op on ``<path>.weight`` (and ``<path>.bias``)."""
    if node.op != "call_function" or node.target not in OP_PATTERNS:
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
    """BatchNorm module nodes (running statistics, the matching dimensionality) right after a conv / Linear op
    that only they read, whose weight and bias nothing else reads."""
    users = weight_users(gm)
    found = []
    for node in gm.graph.nodes:
        source = node.args[0] if node.op == "call_module" and node.args else None
        if not isinstance(source, fx.Node) or len(source.users) != 1:
            continue
        norm = gm.get_submodule(node.target)
        if OP_PATTERNS.get(source.target) is not type(norm) or not norm.track_running_stats or norm.running_mean is None:
            continue
        layer = op_layer(gm, source)
        if layer is None:
            continue
        tensors = [layer[1].layer.weight] + ([layer[1].layer.bias] if layer[1].layer.bias is not None else [])
        if all(users.get(tensor_key(t), set()) <= {source} for t in tensors):
            found.append(node)
    return found


def fold_op(gm: fx.GraphModule, node: fx.Node, x: torch.Tensor, tolerance: float) -> str | None:
    """Fold BatchNorm ``node`` into the op before it (input ``x``), in place; the layer's path, or None if the
    folded op does not reproduce the pair on ``x``."""
    source = node.args[0]
    path, use = op_layer(gm, source)
    layer, norm = use.layer, gm.get_submodule(node.target)
    weight_scale = norm.weight if norm.weight is not None else torch.ones_like(norm.running_var)
    shift = norm.bias if norm.bias is not None else torch.zeros_like(norm.running_mean)
    with torch.no_grad():
        if isinstance(layer, nn.Linear):
            weight, bias = fuse_linear_bn_weights(layer.weight, layer.bias, norm.running_mean, norm.running_var, norm.eps, weight_scale, shift)
        else:
            weight, bias = fuse_conv_bn_weights(layer.weight, layer.bias, norm.running_mean, norm.running_var, norm.eps, weight_scale, shift)
        args, kwargs = list(source.args), {k: v for k, v in source.kwargs.items() if k != "bias"}
        expected = norm(source.target(x, layer.weight, layer.bias, *args[BIAS_ARG + 1 :], **kwargs))
        actual = source.target(x, weight, bias, *args[BIAS_ARG + 1 :], **kwargs)
    if float((actual - expected).norm()) > tolerance * float(expected.norm()) + 1e-30:
        return None
    owner = gm.get_submodule(path)
    requires_grad = owner.weight.requires_grad
    owner.register_parameter("weight", nn.Parameter(weight.detach(), requires_grad))
    owner.register_parameter("bias", nn.Parameter(bias.detach(), requires_grad))
    if "bias" in source.kwargs:
        return _replace(gm, node, source, path)
    if len(args) <= BIAS_ARG or args[BIAS_ARG] is None:
        with gm.graph.inserting_before(source):
            bias_node = gm.graph.get_attr(f"{path}.bias")
        args = args[:BIAS_ARG] + [bias_node] + args[BIAS_ARG + 1 :]
        source.args = tuple(args)
    return _replace(gm, node, source, path)


def _replace(gm: fx.GraphModule, node: fx.Node, source: fx.Node, path: str) -> str:
    node.replace_all_uses_with(source)
    gm.graph.erase_node(node)
    return path
