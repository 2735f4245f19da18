"""The decomposed layers of a rewritten graph, and the rows their last factor maps.

The rewrite (`fxdecomp.graph.rewrite`) installs each decomposed layer as an
``nn.Sequential`` of factors and tags every factor's node with
``fxdecomp.decomposed_from``. `decomposed_layers` finds them again; `factor_rows`
turns a last factor's input into the rows ``z`` and its output into the rows
``y`` of the linear map ``y = W z + b`` the factor computes (a Linear's last
dimension; a Conv2d's unfolded patches, ``torch.nn.functional.unfold``, with its
padding mode applied first), so that a least-squares refit
(`fxdecomp.factorize.least_squares`) can update it.

Example::

    for layer in decomposed_layers(gm):
        layer.name, layer.path, layer.last_nodes      # "features.3", "features.3", [node of features.3.2]
        z, y = factor_rows(layer.last_factor(gm), factor_input, layer_output)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from .. import meta


@dataclass(frozen=True)
class DecomposedLayer:
    """One decomposed candidate in a rewritten graph: its name, where its Sequential of factors is
    installed, and the last factor's call nodes (one per call site, in graph order)."""

    name: str
    path: str
    stages: int
    last_nodes: tuple[fx.Node, ...]

    def factors(self, gm: fx.GraphModule) -> nn.Sequential:
        return gm.get_submodule(self.path)

    def last_factor(self, gm: fx.GraphModule) -> nn.Module:
        return self.factors(gm)[self.stages - 1]


def decomposed_layers(gm: fx.GraphModule) -> list[DecomposedLayer]:
    """Every layer the rewrite turned into a chain of at least two factors, in graph order.

    A layer built as one module (a `TTLinear`, a `TiledLinear`) has no separate last factor and is left out.
    """
    found: dict[str, tuple[str, int, list[fx.Node]]] = {}
    for node in gm.graph.nodes:
        provenance = node.meta.get(meta.DECOMPOSED_FROM)
        if provenance is None or node.op != "call_module":
            continue
        path, _, index = node.target.rpartition(".")
        if not path or not index.isdigit() or int(index) != provenance.stage:
            continue
        module = gm.get_submodule(path)
        if not isinstance(module, nn.Sequential) or len(module) < 2 or provenance.stage != len(module) - 1:
            continue
        entry = found.setdefault(provenance.original, (path, len(module), []))
        entry[2].append(node)
    return [DecomposedLayer(name, path, stages, tuple(nodes)) for name, (path, stages, nodes) in found.items()]


def refittable(factor: nn.Module) -> bool:
    """Whether `factor_rows` can express this last factor as a linear map of rows (Linear, Conv2d)."""
    return type(factor) in (nn.Linear, nn.Conv2d)


def factor_rows(factor: nn.Module, z: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows (n, d) of the factor's input map, rows (n, T) of ``y``, and each row's sample index (n,).

    ``z`` is the factor's input, ``y`` a tensor shaped like its output (N, ..., T) for a Linear,
    (N, T, H', W') for a Conv2d; the sample index is the position along dimension 0 (for folds).
    For a Conv2d the columns of ``z`` follow ``weight.reshape(T, -1)``, group after group.
    """
    if isinstance(factor, nn.Linear):
        if z.dim() == 1:
            return z.reshape(1, -1), y.reshape(1, -1), torch.zeros(1, dtype=torch.long)
        samples = torch.arange(z.shape[0]).view(-1, *([1] * (z.dim() - 2))).expand(z.shape[:-1]).reshape(-1)
        return z.reshape(-1, z.shape[-1]), y.reshape(-1, y.shape[-1]), samples
    if not isinstance(factor, nn.Conv2d):
        raise TypeError(f"factor_rows takes a Linear or Conv2d factor, got {type(factor).__name__}")
    if z.dim() == 3:  # an unbatched conv input (C, H, W)
        z, y = z.unsqueeze(0), y.unsqueeze(0)
    z = F.pad(z, _pad(factor), mode="constant" if factor.padding_mode == "zeros" else factor.padding_mode)
    patches = F.unfold(z, factor.kernel_size, dilation=factor.dilation, stride=factor.stride)  # (N, d, L)
    n, d, positions = patches.shape  # sizes spelt out below, not -1: an empty batch gives zero rows
    rows = patches.transpose(1, 2).reshape(n * positions, d)
    targets = y.reshape(n, y.shape[1], positions).transpose(1, 2).reshape(n * positions, y.shape[1])
    samples = torch.arange(n).repeat_interleave(positions)
    return rows, targets, samples


def _pad(conv: nn.Conv2d) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) padding of ``conv``, 'same' and 'valid' resolved as torch does."""
    if conv.padding == "valid":
        return (0, 0, 0, 0)
    if conv.padding == "same":
        total = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
        (top, bottom), (left, right) = [(t // 2, t - t // 2) for t in total]
        return (left, right, top, bottom)
    ph, pw = conv.padding
    return (pw, pw, ph, ph)
