"""Candidates in data-flow order: waves of layers whose inputs no other layer of the wave feeds.

A layer's input depends on the layers upstream of it. `candidate_waves` groups
the candidates so that every layer upstream of one in wave k is in an earlier
wave: the layers of a wave (the q, k and v projections of one attention block,
the branches of an inception module) can be calibrated together on one pass of
data once the earlier waves are compressed.

Example::

    candidate_waves(gm.graph, {"fc1": ["fc1"], "fc2": ["fc2"]})   # [["fc1"], ["fc2"]]
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import fx


def candidate_waves(graph: fx.Graph, sites: Mapping[str, Sequence[str]]) -> list[list[str]]:
    """Group candidates (name -> names of its call-site nodes) into waves in data-flow order.

    Within a wave, names keep the order of ``sites``. A layer fed by its own earlier call
    (the same module applied twice in a chain) does not wait for itself; if layers feed
    each other through different calls (A's first call feeds B, B feeds A's second call),
    the one called first in the graph goes first.
    """
    index = {name: i for i, name in enumerate(sites)}
    owner = {node: name for name, nodes in sites.items() for node in nodes}
    first_call = {name: len(index) for name in sites}
    upstream: dict[fx.Node, int] = {}  # bitset of the candidates whose output reaches the node
    needs = dict.fromkeys(sites, 0)
    for position, node in enumerate(graph.nodes):
        bits = 0
        for arg in node.all_input_nodes:
            bits |= upstream.get(arg, 0)
        name = owner.get(node.name)
        if name is not None:
            needs[name] |= bits & ~(1 << index[name])
            bits |= 1 << index[name]
            first_call[name] = min(first_call[name], position)
        upstream[node] = bits
    waves: list[list[str]] = []
    done, remaining = 0, list(sites)
    while remaining:
        ready = [name for name in remaining if not needs[name] & ~done]
        if not ready:  # layers that feed each other: take the one called first
            ready = [min(remaining, key=lambda name: first_call[name])]
        waves.append(ready)
        for name in ready:
            done |= 1 << index[name]
        remaining = [name for name in remaining if name not in ready]
    return waves
