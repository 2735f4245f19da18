"""Mode-dependent modules that torch.export flattened into aten ops, made modules again.

torch.export records ``nn.BatchNorm2d`` as ``aten.batch_norm(..., training=False, ...)`` and
``nn.Dropout2d`` as ``aten.feature_dropout(x, p, False)``: the eval-mode flag is baked into the
graph, so ``gm.train()`` (fine-tuning) no longer reaches them, and the passes that work on
BatchNorm modules (folding, re-estimation, the BatchNorm prior) find none. `restore_modules`
turns each back into the torch module that computes it, holding the same tensors, so that an
exported graph behaves like the torch.fx graph of the same model. Only torch's own classes in
eval mode are restored; look-alikes (a frozen BatchNorm of buffers, dropout applied always) stay ops.

Example::

    gm = program.module()
    restore_modules(gm, model)   # model: the module torch.export exported
"""

from __future__ import annotations

import torch
from torch import fx, nn


def restore_modules(gm: fx.GraphModule, model: nn.Module | None = None) -> bool:
    """Dropout ops (and, given the exported ``model``, its BatchNorm1d/2d/3d ops) of ``gm`` as modules; recompiles.

    Returns whether anything changed.
    """
    changed = _dropout_as_modules(gm)
    changed = (model is not None and _batchnorm_as_modules(gm, model)) or changed
    if changed:
        gm.graph.lint()
        gm.recompile()
    return changed


# Export records a mode-dependent module as an aten op with its eval-mode flag baked in, so that
# gm.train() (fine-tuning) would not reach it; they become modules again, which follow the mode as
# under torch.fx. Feature dropout by the input's rank (batched inputs).
_FEATURE_DROPOUT = {3: nn.Dropout1d, 4: nn.Dropout2d, 5: nn.Dropout3d}
# Only torch's own classes: a look-alike (detectron2's FrozenBatchNorm2d: buffers, no train mode) stays an op.
_BATCHNORM_CLASSES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _dropout_module(node: fx.Node) -> nn.Module | None:
    """The nn dropout module that computes ``node`` (an aten dropout op in eval mode), or None."""
    aten = torch.ops.aten
    dropouts = (aten.dropout.default, aten.alpha_dropout.default, aten.feature_alpha_dropout.default, aten.feature_dropout.default)
    train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train")
    if node.target not in dropouts or train is not False:  # dropout the model applies always (MC dropout) stays an op
        return None
    p = float(node.args[1]) if len(node.args) > 1 else float(node.kwargs.get("p", 0.5))
    if node.target is aten.dropout.default:
        return nn.Dropout(p)
    if node.target is aten.alpha_dropout.default:
        return nn.AlphaDropout(p)
    if node.target is aten.feature_alpha_dropout.default:
        return nn.FeatureAlphaDropout(p)
    if node.target is aten.feature_dropout.default:
        value = node.args[0].meta.get("val") if isinstance(node.args[0], fx.Node) else None
        kind = _FEATURE_DROPOUT.get(value.dim()) if isinstance(value, torch.Tensor) else None
        return kind(p) if kind is not None else None
    return None


def _dropout_as_modules(gm: fx.GraphModule) -> bool:
    """Replace each aten dropout op (``dropout``, ``feature_dropout``, ``alpha_dropout``,
    ``feature_alpha_dropout``) by a call of the nn module that computes it, named after its source module."""
    changed = False
    for index, node in enumerate(list(gm.graph.nodes)):
        module = _dropout_module(node) if node.op == "call_function" else None
        if module is None:
            continue
        stack = list((node.meta.get("nn_module_stack") or {}).values())
        path = stack[-1][0] if stack and isinstance(stack[-1], tuple) and stack[-1][0] else f"dropout_{index}"
        try:
            existing = gm.get_submodule(path)
        except AttributeError:
            existing = None
        if type(existing) is not type(module) or existing.p != module.p:
            if existing is not None:  # the path holds another module: a name of its own
                path = f"{path}_dropout_{index}"
            gm.add_submodule(path, module)
        _replace_by_call(gm, node, path, (node.args[0],))
        changed = True
    return changed


def _batchnorm_as_modules(gm: fx.GraphModule, model: nn.Module) -> bool:
    """Replace each eval-mode ``aten.batch_norm`` of an ``nn.BatchNorm1d/2d/3d`` of ``model`` (its running
    statistics and affine parameters read from that module's path) by a call of a module of the same class
    and options at that path, holding the same tensors: the state dict is unchanged, and the graph's
    BatchNorms follow ``train()`` and are found by the passes that work on BatchNorm modules (folding,
    re-estimation, the weight prior) as under torch.fx. Anything else (``F.batch_norm`` on tensors of
    several modules, a subclass or look-alike of BatchNorm) stays an aten op."""
    changed, made = False, {}
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not torch.ops.aten.batch_norm.default:
            continue
        path = _batchnorm_path(gm, node)
        if path is None:
            continue
        if path not in made:
            module = _batchnorm_module(gm, model, path)
            if module is None:
                continue
            parent, _, attribute = path.rpartition(".")
            setattr(gm.get_submodule(parent) if parent else gm, attribute, module)
            made[path] = module
        reads = [a for a in node.args[1:5] if isinstance(a, fx.Node)]
        _replace_by_call(gm, node, path, (node.args[0],))
        for read in reads:  # the module holds them now
            if not read.users:
                gm.graph.erase_node(read)
        changed = True
    return changed


_BATCHNORM_TENSORS = ("weight", "bias", "running_mean", "running_var")


def _batchnorm_path(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """The module path whose weight / bias / running_mean / running_var the op reads, when it is one
    module holding nothing else (an nn.BatchNorm as export flattened it), in eval mode; else None."""
    args = list(node.args) + [None] * (9 - len(node.args))
    if args[5] is not False:  # batch statistics: BatchNorm without running statistics, or in training mode
        return None
    targets = {}
    for name, arg in zip(_BATCHNORM_TENSORS, args[1:5]):
        if arg is None:
            continue
        if not isinstance(arg, fx.Node) or arg.op != "get_attr":
            return None
        parent, _, attribute = str(arg.target).rpartition(".")
        if attribute != name:
            return None
        targets[name] = parent
    paths = set(targets.values())
    if len(paths) != 1 or "running_mean" not in targets or "running_var" not in targets:
        return None
    path = paths.pop()
    try:
        holder = gm.get_submodule(path) if path else None
    except AttributeError:
        return None
    if isinstance(holder, nn.modules.batchnorm._BatchNorm):  # converted at an earlier call site
        return path
    if holder is None or list(holder.children()):
        return None
    names = {n for n, _ in holder.named_parameters(recurse=False)} | {n for n, _ in holder.named_buffers(recurse=False)}
    return path if names <= {*_BATCHNORM_TENSORS, "num_batches_tracked"} else None


def _batchnorm_module(gm: fx.GraphModule, model: nn.Module, path: str) -> nn.Module | None:
    """A module of the class and options of ``model``'s BatchNorm at ``path``, holding the graph's tensors at
    ``path`` (the same objects), or None when ``model`` has no torch BatchNorm with running statistics there."""
    holder = gm.get_submodule(path)
    try:
        original = model.get_submodule(path)
    except AttributeError:
        return None
    if type(original) not in _BATCHNORM_CLASSES or not original.track_running_stats:
        return None
    weight = getattr(holder, "weight", None)
    if original.affine != isinstance(weight, nn.Parameter) or (original.affine and not isinstance(getattr(holder, "bias", None), nn.Parameter)):
        return None
    with torch.device("meta"):  # no tensors allocated: the holder's own are set below
        module = type(original)(
            original.num_features, eps=original.eps, momentum=original.momentum, affine=original.affine
        )
    for name in (*_BATCHNORM_TENSORS, "num_batches_tracked"):
        tensor = getattr(holder, name, None)
        if name in ("weight", "bias"):
            setattr(module, name, tensor)
        elif tensor is not None:
            module.register_buffer(name, tensor)
        else:
            setattr(module, name, None)
    return module


def _replace_by_call(gm: fx.GraphModule, node: fx.Node, path: str, args: tuple) -> None:
    with gm.graph.inserting_before(node):
        call = gm.graph.call_module(path, args)
    call.meta.update({k: v for k, v in node.meta.items() if k != "val"})
    node.replace_all_uses_with(call)
    gm.graph.erase_node(node)
