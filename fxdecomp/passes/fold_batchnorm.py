"""The fold_batchnorm pass: fold each BatchNorm that follows a conv (or Linear) into it, before decomposing.

For an inference graph the BatchNorm after a conv is an affine map per output
channel; folding it into the conv's weight and bias (torch's
``torch.nn.utils.fusion.fuse_conv_bn_eval`` / ``fuse_linear_bn_eval``, on the pattern of
``torch.fx.experimental.optimization.fuse``, extended to subclasses such as
EfficientNet's static-'same'-padding conv and checked numerically) removes the
BatchNorm and lets the decomposition see, and keep, the weights the model really
applies. Only a conv whose output feeds nothing but the BatchNorm is folded
(torch's rule). The folded graph also becomes the reference the planner and the
verify pass compare against (equal to the original up to float rounding), and the
budget counts the folded model's FLOPs.

It must run before find_candidates (the candidates are the folded convs), and needs
the model in eval mode: a BatchNorm in training mode normalises with batch statistics
and cannot be folded (`InvalidInputError` naming the module). In torch.export graphs the
layers are aten ops on their modules' parameters: the folded weight and bias are written
into those parameters (`fxdecomp.passes.fold_batchnorm_ops`). A BatchNorm written as an
aten op (``F.batch_norm`` in an exported graph) is not folded; a warning names it.

Off in the shipped recipes (``enabled = false``); ask for it with
``load_recipe("default").with_options(fold_batchnorm={"enabled": True})``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.fx.passes.infra.pass_base import PassResult
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from ..errors import InvalidInputError, RecipeError
from ..graph.effects import fresh_inputs
from .base import Pass, log, register_pass
from .fold_batchnorm_ops import fold_op, foldable_ops, is_layer_op, module_calls, normalises
from ..user_warnings import warn

PATTERNS = ((nn.Conv1d, nn.BatchNorm1d), (nn.Conv2d, nn.BatchNorm2d), (nn.Conv3d, nn.BatchNorm3d), (nn.Linear, nn.BatchNorm1d))
FOLDED = "fxdecomp.folded_batchnorm"  # gm.meta: ((layer path, BatchNorm path), ...) folded
TOLERANCE = 1e-4  # relative L2 error of a folded pair on the example inputs (float32 rounding is ~1e-7)


def foldable(gm: fx.GraphModule) -> list[fx.Node]:
    """BatchNorm nodes (with running statistics, called once) right after a conv/Linear module that is called once
    and whose output only the BatchNorm reads (torch's ``fuse`` rule; subclasses such as a conv with
    static 'same' padding included, checked numerically by `fold_batchnorm`)."""
    modules = dict(gm.named_modules())
    calls = module_calls(gm)
    found = []
    for node in gm.graph.nodes:
        source = node.args[0] if node.op == "call_module" and node.args else None
        if not isinstance(source, fx.Node) or source.op != "call_module" or len(source.users) != 1 or calls[source.target] != 1:
            continue
        layer, norm = modules[source.target], modules[node.target]
        if any(isinstance(layer, a) and type(norm) is b for a, b in PATTERNS) and normalises(norm, layer.weight.shape[0], calls, node.target):
            found.append(node)
    return found


def fold_batchnorm(gm: fx.GraphModule, example_inputs: tuple) -> tuple[fx.GraphModule, int]:
    """A copy of ``gm`` with each foldable BatchNorm folded into the conv/Linear (module or torch.export op) before it, and how many.

    The folding is torch's (``fuse_conv_bn_eval`` / ``fuse_linear_bn_eval``); each folded pair is
    checked against the pair it replaces on its input from ``example_inputs``, and a pair that does
    not reproduce it (a layer subclass whose forward is not its weight's conv) is left unfolded,
    with a warning.

    Raises:
        InvalidInputError: a foldable pair is in training mode.
    """
    nodes, op_nodes = foldable(gm), foldable_ops(gm)
    training = [n.target for n in nodes if gm.get_submodule(n.target).training or gm.get_submodule(n.args[0].target).training]
    training += [n.target for n in op_nodes if gm.get_submodule(n.target).training]
    if training:
        raise InvalidInputError(
            f"fold_batchnorm folds BatchNorm into the conv before it for an inference graph, but {training[:3]} "
            "are in training mode; call model.eval() before compress, or leave fold_batchnorm off"
        )
    if not nodes and not op_nodes:
        return gm, 0
    folded = copy.deepcopy(gm)
    nodes, op_nodes = ([n for n in folded.graph.nodes if n.name in {m.name for m in chosen}] for chosen in (nodes, op_nodes))
    inputs = _layer_inputs(folded, {n.args[0] for n in nodes + op_nodes}, example_inputs)
    pairs, refused = [], []
    for node in nodes:
        source = node.args[0]
        layer, norm = folded.get_submodule(source.target), folded.get_submodule(node.target)
        x = inputs[source]
        if isinstance(layer, nn.Linear) and x.dim() != 2:  # BatchNorm1d then normalises dim 1, not the features
            continue
        fused = fuse_linear_bn_eval(layer, norm) if isinstance(layer, nn.Linear) else fuse_conv_bn_eval(layer, norm)
        with torch.no_grad():
            expected, actual = norm(layer(x)), fused(x)
        if float((actual - expected).norm()) > TOLERANCE * float(expected.norm()) + 1e-30:
            refused.append(source.target)
            continue
        parent, _, attribute = source.target.rpartition(".")
        setattr(folded.get_submodule(parent) if parent else folded, attribute, fused)
        node.replace_all_uses_with(source)
        folded.graph.erase_node(node)
        pairs.append((source.target, node.target))
    for node in op_nodes:
        x = inputs[node.args[0]]
        if node.args[0].target is torch.ops.aten.linear.default and x.dim() != 2:
            continue
        path, ok = fold_op(folded, node, x, TOLERANCE)
        if ok:
            pairs.append((path, node.target))
        else:
            refused.append(path)
    if refused:
        warn(f"fxdecomp: {refused[:3]} do not compute a plain conv of their weight; their BatchNorm is not folded")
    folded.delete_all_unused_submodules()
    folded.graph.lint()
    folded.recompile()
    # Keep-the-model mode (`fxdecomp.keep_model`) swaps these into the user's model copy too.
    folded.meta[FOLDED] = tuple(gm.meta.get(FOLDED, ())) + tuple(pairs)
    return folded, len(pairs)


def _layer_inputs(gm: fx.GraphModule, nodes: set[fx.Node], example_inputs: tuple) -> dict[fx.Node, torch.Tensor]:
    """Each of ``nodes``' first input on the example inputs (copied as it arrives: later in-place ops cannot change it)."""
    found: dict[fx.Node, torch.Tensor] = {}

    class _Tap(fx.Interpreter):
        def run_node(self, node):
            if node in nodes:
                found[node] = self.env[node.args[0]].detach().clone()
            return super().run_node(node)

    with torch.no_grad():
        _Tap(gm).run(*fresh_inputs(example_inputs))
    return found


def _after_aten_layers(gm: fx.GraphModule) -> list[str]:
    """BatchNorm nodes left after folding that follow a conv / Linear op: aten batch_norm ops (BatchNorm written with
    F.batch_norm in an exported graph), and BatchNorm modules right after an aten conv / linear op that could not be
    folded (the op's output or weight read elsewhere, a weight that is not its module's parameter)."""
    found = []
    for node in gm.graph.nodes:
        if node.op == "call_function" and "batch_norm" in str(node.target):
            found.append(node.name)
        elif node.op == "call_module" and isinstance(gm.get_submodule(node.target), nn.modules.batchnorm._BatchNorm):
            source = node.args[0] if node.args else None
            if isinstance(source, fx.Node) and source.op == "call_function" and is_layer_op(source):
                found.append(node.target)
    return found


@register_pass
class FoldBatchNormPass(Pass):
    name = "fold_batchnorm"

    @dataclass(frozen=True)
    class Options:
        enabled: bool = True

    def run(self, gm):
        ctx = self.context
        if not self.options.enabled:
            return PassResult(gm, False)
        if ctx.has("candidates"):
            raise RecipeError("fold_batchnorm must run before find_candidates (the candidates are the folded convs); move it up in the recipe")
        folded, count = fold_batchnorm(gm, ctx.example_inputs)
        unfoldable = _after_aten_layers(folded)
        if unfoldable:
            warn(
                f"fxdecomp: BatchNorm written as an aten op, or after a conv / Linear op that it cannot be folded into "
                f"(a torch.export graph: {unfoldable[:3]}; the op's output or weight is read elsewhere, the weight is tied, "
                "the BatchNorm is called again, or it does not normalise the layer's output channels), is not folded"
            )
        if count and ctx.reference is not None:
            ctx.reference, _ = fold_batchnorm(ctx.reference, ctx.example_inputs)
        log.info("folded %d BatchNorm modules into the layers before them", count)
        return PassResult(folded, count > 0)
