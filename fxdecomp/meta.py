"""The ``node.meta`` keys fxdecomp writes, each defined once, and the frozen records they hold.

Analyses only write these keys; only the rewrite pass changes the graph. Decisions are
not here: they live in the plan record (`fxdecomp.records.Plan`).

Example::

    node.meta[FLOPS]            # NodeCost(flops=..., params=...)
    node.meta[DECOMPOSED_FROM]  # Provenance(original="features.3", method="tucker2", ranks=(16, 32), stage=1, module="features.3")
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import fx

SHAPE = "fxdecomp.shape"  # tuple[int, ...] of the node's (first) tensor output
FLOPS = "fxdecomp.flops"  # NodeCost of the original layer at this call site
CANDIDATE = "fxdecomp.candidate"  # str: the candidate's name (see graph.candidates.Candidate)
RANK = "fxdecomp.rank"  # RankEstimate per method
DECOMPOSED_FROM = "fxdecomp.decomposed_from"  # Provenance on nodes built by the rewrite
# gm.meta: layer name -> the ConvSpec / LinearSpec the rewrite decomposed it as (as the graph calls it: under
# torch.export a conv subclass's own padding is an op before the call, not part of the spec)
DECOMPOSED_SPECS = "fxdecomp.decomposed_specs"


@dataclass(frozen=True)
class NodeCost:
    """FLOPs (2 per multiply-add) and parameters of one call of a layer."""

    flops: int
    params: int


@dataclass(frozen=True)
class RankEstimate:
    """Ranks suggested by the VBMF and energy rules for one method of one layer."""

    method: str
    max_ranks: tuple[int, ...]
    vbmf: tuple[int, ...]
    energy_90: tuple[int, ...]
    energy_99: tuple[int, ...]


@dataclass(frozen=True)
class Provenance:
    original: str
    method: str
    ranks: tuple[int, ...]
    stage: int
    module: str = ""  # where the decomposed module was installed (its stages are ``module.<i>`` for a Sequential)


def node_shape(node) -> tuple[int, ...] | None:
    """The output shape the shape_prop pass recorded for ``node`` (None for a non-node or an unknown shape)."""
    if not isinstance(node, fx.Node):
        return None
    return node.meta.get(SHAPE)
