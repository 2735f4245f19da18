"""The rewrite pass: applies the plan's decompositions to the graph (`fxdecomp.graph.rewrite.rewrite_graph`)."""

from __future__ import annotations

from torch.fx.passes.infra.pass_base import PassResult

from ..graph.rewrite import rewrite_graph
from .base import Pass, register_pass

__all__ = ["RewritePass", "rewrite_graph"]


@register_pass
class RewritePass(Pass):
    name = "rewrite"
    requires = ("candidates", "plan")

    def run(self, gm):
        return PassResult(gm, rewrite_graph(gm, self.context, self.context.plan.decisions))
