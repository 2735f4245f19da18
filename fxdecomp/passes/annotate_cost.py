"""The annotate_cost pass: the whole model's FLOPs and parameters, and each candidate call's FLOPs."""

from __future__ import annotations

from torch.fx.passes.infra.pass_base import PassResult

from .. import meta
from ..cost import FLOPS_PER_MAC, count_flops, count_params, spec_macs
from .base import Pass, log, register_pass


@register_pass
class CostPass(Pass):
    """FLOPs of the whole model (aten level, `count_flops`) and of each candidate call (the cost model)."""

    name = "annotate_cost"
    requires = ("candidates",)
    provides = ("cost",)

    def run(self, gm):
        ctx = self.context
        ctx.flops_before = count_flops(gm, ctx.example_inputs)
        ctx.params_before = count_params(gm)
        candidate_flops = 0
        for candidate in ctx.candidates.values():
            params = count_params(candidate.layer)
            for site in candidate.sites:
                flops = spec_macs(candidate.spec, site.input_shape) * FLOPS_PER_MAC
                site.node.meta[meta.FLOPS] = meta.NodeCost(flops, params)
                candidate_flops += flops
        if candidate_flops > ctx.flops_before:  # both count 2 per multiply-add of the same aten ops
            log.warning("the candidates' %d FLOPs exceed the model's %d: a counting bug, please report it", candidate_flops, ctx.flops_before)
        return PassResult(gm, False)
