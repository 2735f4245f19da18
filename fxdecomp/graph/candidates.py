"""Candidates: a decomposable layer and the call sites where the graph calls it.

Example::

    candidate.name, candidate.kind, [site.node for site in candidate.sites]
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import fx, nn

from ..layer_spec import ConvSpec, LinearSpec


@dataclass
class CallSite:
    node: fx.Node
    input_node: fx.Node
    input_shape: tuple[int, ...]
    # Where the input sits in the call (args index or kwarg name): unlike ``input_node``,
    # it stays valid after the rewrite of an earlier layer replaces the producer.
    input_key: int | str = 0

    @classmethod
    def of(cls, node: fx.Node, input_node: fx.Node, input_shape: tuple[int, ...]) -> "CallSite":
        key = next((i for i, arg in enumerate(node.args) if arg is input_node), None)
        if key is None:
            key = next(k for k, value in node.kwargs.items() if value is input_node)
        return cls(node, input_node, input_shape, key)


@dataclass
class Candidate:
    """One decomposable layer: a Conv2d/Linear module, or a functional call on a parameter.

    ``layer`` is the module holding the weights (the original one, or an equivalent
    built from the functional call); a module called twice is one candidate with two sites.
    """

    name: str
    layer: nn.Module
    spec: ConvSpec | LinearSpec
    sites: list[CallSite]
    form: str  # "module" or "function"
    target: str  # call_module target, or the weight's get_attr target
    excluded: bool = False
    # Parameters of this layer's weight that stay in the model if it is decomposed, because
    # another user reads the same tensor (a tied embedding, the same weight called another way).
    shared_params: int = 0
    note: str = ""  # e.g. a parametrization that was materialized (see graph.parametrized)
    hooks: tuple[str, ...] = ()  # the user's hooks on its module (graph.hooks): kept dense even when a plan names it

    @property
    def kind(self) -> str:
        return self.spec.kind
