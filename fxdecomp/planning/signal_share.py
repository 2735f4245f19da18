"""Each candidate's share of the signal where its output joins a residual sum: how much of the model its error reaches.

A weight-only damage (`fxdecomp.planning.damage.retained_energy_damage`) treats every
layer as if the whole signal passed through it. In a residual network a layer inside
a branch ``x + f(x)`` only changes the part ``f(x)`` of the sum: an error e in f
changes the sum by about e * ||f(x)|| / ||x + f(x)||, so its damage is scaled by
the share s = ||f(x)||^2 / ||x + f(x)||^2 (squared norms on the example inputs). A
layer whose output reaches no such sum (the stem, a transition conv, the classifier)
has share 1: its error is the model's. On EfficientNet-Lite0 (issue 16) weight-only
plans that ignored this emptied the stem or the classifier and lost every top-1 agreement.

The shares are measured by one forward pass of the captured graph on the example
inputs (`torch.fx.Interpreter`); no calibration data is needed.

Example::

    shares = signal_shares(gm, candidates, (x,))   # {"blocks.0.expand": 0.12, "stem": 1.0, ...}
"""

from __future__ import annotations

import logging
import math
import operator
from collections.abc import Mapping

import torch
from torch import fx

from ..graph.candidates import Candidate
from ..graph.effects import fresh_inputs

log = logging.getLogger("fxdecomp")

# torch.fx traces Python's + (operator.add); torch.export records the aten overloads.
_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add, torch.ops.aten.add.Tensor, torch.ops.aten.add_.Tensor}
_ADD_METHODS = {"add", "add_"}
# An operand holding values this negative is an additive mask (-inf, finfo.min, -1e9, BERT's -1e4), not a signal.
MASK_VALUE = -1e4


class _EnergyInterpreter(fx.Interpreter):
    """Runs the graph and keeps, for the ``watched`` nodes (the sums and their operands), each floating-point
    output's squared norm (float64), its shape, and whether it is a mask."""

    def __init__(self, gm: fx.GraphModule, watched: set[fx.Node]):
        super().__init__(gm)
        self.watched = watched
        self.energy: dict[fx.Node, float] = {}
        self.shape: dict[fx.Node, tuple[int, ...]] = {}
        self.mask: set[fx.Node] = set()

    def run_node(self, node: fx.Node):
        out = super().run_node(node)
        if node in self.watched and isinstance(out, torch.Tensor) and out.is_floating_point():
            self.energy[node] = float(out.detach().double().pow(2).sum())
            self.shape[node] = tuple(out.shape)
            if out.numel() and float(out.detach().min()) <= MASK_VALUE:
                self.mask.add(node)
        return out


def _is_add(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in _ADD_FUNCTIONS) or (
        node.op == "call_method" and node.target in _ADD_METHODS
    )


def _downstream(node: fx.Node) -> set[fx.Node]:
    reached, stack = {node}, [node]
    while stack:
        for user in stack.pop().users:
            if user not in reached:
                reached.add(user)
                stack.append(user)
    return reached


def _site_share(node: fx.Node, order: Mapping[fx.Node, int], seen: _EnergyInterpreter) -> float:
    """The share in [0, 1] of ``node``'s branch at the first sum that adds it to a signal it does not reach, else 1.

    A residual sum adds two operands of one shape, neither of them a mask (operands holding values
    <= MASK_VALUE): attention scores plus an additive mask (finfo.min at padded positions),
    broadcast or not, is not one. A sum of no finite energy tells nothing: share 1.
    """
    reached = _downstream(node)
    for add in sorted((n for n in reached if _is_add(n)), key=order.__getitem__):
        operands = [a for a in add.args if isinstance(a, fx.Node)]
        branch = [a for a in operands if a in reached]
        if len(operands) != 2 or len(branch) != 1 or any(a in seen.mask for a in operands):
            continue
        if not (seen.shape.get(operands[0]) == seen.shape.get(operands[1]) == seen.shape.get(add) is not None):
            continue
        total, part = seen.energy.get(add, 0.0), seen.energy.get(branch[0], 0.0)
        if not (math.isfinite(total) and math.isfinite(part)) or total <= 0.0:
            return 1.0
        return min(1.0, part / total)
    return 1.0


def signal_shares(gm: fx.GraphModule, candidates: Mapping[str, Candidate], example_inputs: tuple) -> dict[str, float]:
    """Candidate name -> its share of the signal in [0, 1] (the largest over its call sites).

    ``gm`` is the graph the candidates' call sites belong to; ``example_inputs`` run it once
    (no gradients). A graph that does not run on them gives every candidate share 1.
    """
    sums = [n for n in gm.graph.nodes if _is_add(n)]
    watched = {*sums, *(a for add in sums for a in add.args if isinstance(a, fx.Node))}
    interpreter = _EnergyInterpreter(gm, watched)  # norms of the sums and their operands only, not of every node
    try:
        with torch.no_grad():
            interpreter.run(*fresh_inputs(example_inputs))  # a model may write into its inputs
    except Exception as exc:  # noqa: BLE001 - a heuristic of the default plan: it must never stop compress
        log.info("signal shares: the graph did not run on the example inputs (%s: %s); every share is 1", type(exc).__name__, exc)
        return {name: 1.0 for name in candidates}
    order = {node: i for i, node in enumerate(gm.graph.nodes)}
    return {
        name: max(
            (_site_share(site.node, order, interpreter) for site in candidate.sites),
            default=1.0,
        )
        for name, candidate in candidates.items()
    }
