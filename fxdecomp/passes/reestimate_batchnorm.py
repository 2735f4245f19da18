"""The reestimate_batchnorm pass: BatchNorm running statistics re-estimated on the calibration data after the rewrite.

A decomposed layer's outputs no longer have the mean and variance its following
BatchNorm was trained on. For every BatchNorm module whose input is a decomposed
layer's output (``scope = "decomposed"``; ``"all"``: every BatchNorm of the graph),
the running statistics are reset and re-estimated with torch's cumulative average
(``momentum=None``: the mean over calibration batches of each batch's mean and
unbiased variance) in train mode, the rest of the model in eval mode, as
``torch.optim.swa_utils.update_bn`` does; then every module's mode and momentum are
put back. The re-estimated modules are copies installed in the rewritten graph:
the input model and the reference graph keep theirs.

``mode = "shift"`` keeps the trained statistics and moves them by the drift the
rewrite caused, both estimated the same way on the calibration data:
``mean = trained + (rewritten - original)``, ``var = trained * rewritten / original``;
with few calibration samples from another distribution than the training set this
keeps what the training set taught (the role bias correction plays in Nagel et al. 2019).

In torch.export graphs an nn.BatchNorm is a module again (`fxdecomp.export_capture`); BatchNorm
written as ``F.batch_norm`` on tensors of other modules stays an aten op and is not re-estimated;
a warning says so. Switched on in the ``corrected`` recipe, off (``enabled = false``)
in the others: ``load_recipe("default").with_options(reestimate_batchnorm={"enabled": True})``.
Without calibration data it changes nothing.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.fx.passes.infra.pass_base import PassResult

from .. import meta
from ..calibration_batches import calibration_batches
from ..errors import InvalidInputError, RecipeError
from ..records import Corrections
from .base import Pass, log, register_pass
from ..user_warnings import warn

SCOPES = ("decomposed", "all")
MODES = ("replace", "shift")


def estimate_running_stats(model: nn.Module, modules: list[nn.Module], batches) -> int:
    """Reset ``modules``' (BatchNorms of ``model``) running statistics and re-estimate them on ``batches``
    with torch's cumulative average (``momentum=None``), those modules in train mode and the rest of
    ``model`` in eval mode (as ``torch.optim.swa_utils.update_bn``, without dropout); every module's
    mode and momentum are put back. Returns the number of batches.

    Raises:
        InvalidInputError: no batch, or a batch that does not run through ``model``.
    """
    modes = {m: m.training for m in model.modules()}
    momenta = [m.momentum for m in modules]
    count = 0
    try:
        model.eval()
        for module in modules:
            module.reset_running_stats()
            module.momentum = None
            module.train()
        with torch.no_grad():
            for count, inputs in enumerate(batches, start=1):
                try:
                    model(*inputs)
                except (RuntimeError, TypeError, ValueError, IndexError) as exc:
                    raise InvalidInputError(
                        f"calibration batch {count - 1} does not run through the rewritten model "
                        f"({type(exc).__name__}: {exc}); calibration must yield input tuples shaped like example_inputs"
                    ) from exc
    finally:
        for module, momentum in zip(modules, momenta):
            module.momentum = momentum
        for module, training in modes.items():
            module.training = training
    if count == 0:
        raise InvalidInputError("calibration yielded no batch; pass an iterable of input tuples")
    return count


def _batchnorm_or_none(model: nn.Module, path: str) -> nn.Module | None:
    try:
        module = model.get_submodule(path)
    except AttributeError:
        return None
    return module if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_mean is not None else None


def batchnorm_nodes(gm: fx.GraphModule, scope: str) -> list[fx.Node]:
    """BatchNorm call_module nodes with running statistics, after a decomposed layer (or all), in graph order."""
    found = []
    for node in gm.graph.nodes:
        if node.op != "call_module":
            continue
        module = gm.get_submodule(node.target)
        if not isinstance(module, nn.modules.batchnorm._BatchNorm) or not module.track_running_stats or module.running_mean is None:
            continue
        source = node.args[0] if node.args else None
        if scope == "all" or (isinstance(source, fx.Node) and meta.DECOMPOSED_FROM in source.meta):
            found.append(node)
    return found


def _functional_in_scope(gm: fx.GraphModule, scope: str) -> list[str]:
    """BatchNorm written as an aten op (F.batch_norm in an exported graph) that ``scope`` covers: not re-estimated."""
    return [
        n.name for n in gm.graph.nodes
        if n.op == "call_function" and "batch_norm" in str(n.target)
        and (scope == "all" or (n.args and isinstance(n.args[0], fx.Node) and meta.DECOMPOSED_FROM in n.args[0].meta))
    ]  # fmt: skip


@register_pass
class ReestimateBatchNormPass(Pass):
    name = "reestimate_batchnorm"
    requires = ("plan",)
    provides = ("batchnorm_stats",)
    replays_calibration = True

    @dataclass(frozen=True)
    class Options:
        enabled: bool = True
        scope: str = "decomposed"  # or "all"
        mode: str = "replace"  # or "shift": the trained statistics moved by the drift the rewrite caused
        max_batches: int = 0  # 0: all calibration batches

    def run(self, gm):
        ctx, options = self.context, self.options
        if options.scope not in SCOPES or options.mode not in MODES:
            raise RecipeError(
                f"reestimate_batchnorm: scope must be one of {SCOPES} and mode one of {MODES}, got {options.scope!r}, {options.mode!r}"
            )
        if not options.enabled or ctx.calibration is None:
            ctx.provide("batchnorm_stats", Corrections())
            return PassResult(gm, False)
        functional = _functional_in_scope(gm, options.scope)
        if functional:
            warn(
                f"fxdecomp: BatchNorm written as an aten op ({functional[:3]}) is not re-estimated; "
                "capture with frontend='fx' to re-estimate it"
            )
        nodes = batchnorm_nodes(gm, options.scope)
        if not nodes:
            ctx.provide("batchnorm_stats", Corrections())
            return PassResult(gm, False)
        targets = sorted({n.target for n in nodes})
        for target in targets:  # private copies: the reference and the input model keep their statistics
            parent, _, attribute = target.rpartition(".")
            setattr(gm.get_submodule(parent) if parent else gm, attribute, copy.deepcopy(gm.get_submodule(target)))
        modules = [gm.get_submodule(t) for t in targets]
        trained = [(m.running_mean.clone(), m.running_var.clone()) for m in modules]
        estimate_running_stats(gm, modules, calibration_batches(ctx.calibration, options.max_batches))
        if options.mode == "shift" and ctx.reference is not None:
            reference = copy.deepcopy(ctx.reference)
            originals = [_batchnorm_or_none(reference, t) for t in targets]
            estimate_running_stats(reference, [m for m in originals if m is not None], calibration_batches(ctx.calibration, options.max_batches))
            with torch.no_grad():
                for module, original, (mean, var) in zip(modules, originals, trained):
                    if original is None:  # no such BatchNorm in the reference: its statistics replaced
                        continue
                    # The drift the rewrite caused, on the calibration data, applied to the trained statistics.
                    module.running_mean.copy_(mean + module.running_mean - original.running_mean)
                    module.running_var.copy_(var * module.running_var / original.running_var.clamp_min(module.eps))
        record = Corrections(batchnorms=tuple(targets))
        ctx.provide("batchnorm_stats", record)
        gm.meta["fxdecomp.batchnorm_stats"] = record
        log.info("re-estimated %d BatchNorm modules (%s)", len(targets), options.mode)
        return PassResult(gm, False)
