"""The shape_prop pass: every node's output shape (torch.fx ShapeProp, or torch.export's own metadata).

It runs the graph on a private copy of the example inputs and puts the graph's buffers back
afterwards; it writes ``node.meta[fxdecomp.shape]`` and the `NodeShapes` record.
"""

from __future__ import annotations

from torch.fx.passes.infra.pass_base import PassResult
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from .. import meta
from ..graph.effects import fresh_inputs, preserved_buffers
from ..records import NodeShapes
from .base import Pass, register_pass


@register_pass
class ShapePass(Pass):
    """Record every node's output shape (ShapeProp, or torch.export's own metadata)."""

    name = "shape_prop"
    provides = ("shapes",)

    def run(self, gm):
        if not all("val" in n.meta for n in gm.graph.nodes if n.op not in ("output", "placeholder")):
            with preserved_buffers(gm):
                ShapeProp(gm).propagate(*fresh_inputs(self.context.example_inputs))
        for node in gm.graph.nodes:
            value = node.meta.get("val", node.meta.get("tensor_meta"))
            if isinstance(value, (list, tuple)) and value and not isinstance(value, TensorMetadata):
                value = value[0]  # first output of a multi-output node
            shape = getattr(value, "shape", None)
            if shape is not None:
                node.meta[meta.SHAPE] = tuple(int(d) for d in shape)
        self.context.provide("shapes", NodeShapes({n.name: n.meta[meta.SHAPE] for n in gm.graph.nodes if meta.SHAPE in n.meta}))
        return PassResult(gm, False)
