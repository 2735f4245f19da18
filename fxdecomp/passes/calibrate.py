"""The calibrate pass: stream calibration batches once and keep each candidate's input Gram matrix.

fx graphs are run by an Interpreter that reads each candidate's input as it
passes; torch.export graphs fix the batch size, so their candidates are
observed with forward hooks on the matching modules of a private copy of the
model instead. Memory is bounded (one Gram matrix per layer); progress goes to
stderr when asked.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.fx.passes.infra.pass_base import PassResult

from ..calibration import GramAccumulator
from ..errors import InvalidInputError
from ..progress import Progress
from .base import Pass, log, register_pass


class _GramInterpreter(fx.Interpreter):
    def __init__(self, gm, grams_by_node):
        super().__init__(gm)
        self.grams_by_node = grams_by_node

    def run_node(self, node):
        entry = self.grams_by_node.get(node)
        if entry is not None:
            gram, input_node = entry
            gram.update(self.env[input_node])
        return super().run_node(node)


@register_pass
class CalibratePass(Pass):
    name = "calibrate"

    @dataclass(frozen=True)
    class Options:
        max_batches: int = 0  # 0: all of them

    def run(self, gm):
        ctx = self.context
        if ctx.calibration is None:
            return PassResult(gm, False)
        grams = {name: GramAccumulator(c.spec) for name, c in ctx.candidates.items() if not c.excluded}
        observe = self._hooks(grams) if ctx.frontend == "export" else self._interpreter(gm, grams)
        batches = 0
        progress = Progress("calibration batch", None, ctx.progress)
        with torch.no_grad(), progress:
            for batch in ctx.calibration:
                inputs = batch if isinstance(batch, (tuple, list)) else (batch,)
                if not all(isinstance(x, torch.Tensor) for x in inputs):
                    raise InvalidInputError("calibration must yield input tuples (or single tensors) like example_inputs")
                observe(tuple(inputs))
                batches += 1
                progress.step()
                if self.options.max_batches and batches >= self.options.max_batches:
                    break
        if batches == 0:
            raise InvalidInputError("calibration yielded no batch; pass an iterable of input tuples")
        ctx.grams = {name: g for name, g in grams.items() if g.count}
        log.info("calibrated %d layers on %d batches", len(ctx.grams), batches)
        return PassResult(gm, False)

    def _interpreter(self, gm, grams):
        by_node = {
            site.node: (grams[name], site.input_node)
            for name, candidate in self.context.candidates.items()
            if name in grams
            for site in candidate.sites
        }
        interpreter = _GramInterpreter(gm, by_node)
        return lambda inputs: interpreter.run(*inputs)

    def _hooks(self, grams):
        model = self.context.source_model
        modules = dict(model.named_modules())
        for name, gram in grams.items():
            candidate = self.context.candidates[name]
            module = modules.get(name)
            if not isinstance(module, (nn.Linear, nn.Conv2d)) or module.weight.shape != candidate.layer.weight.shape:
                log.info("%s: no module to observe; its error stays weight-only", name)
                continue
            module.register_forward_pre_hook(lambda _m, args, gram=gram: gram.update(args[0]))
        return lambda inputs: model(*inputs)
