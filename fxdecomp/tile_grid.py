"""`TileGrid`: a layer cut into tiles of any size, each tile a low-rank product (tiled SVD's general structure).

The input's channels (features) are split into column blocks, each block runs
its own layer (a conv with the original kernel, or a Linear) producing the rank
components of every tile in its column; each row tile gathers its components
from the blocks of its row and maps them to its own output channels with a
1x1 conv (a Linear). Only `torch.split`, `Tensor.narrow`, `torch.cat` and
standard layers: it traces with torch.fx and exports to ONNX (Split, Slice,
Concat, Conv / MatMul).

Example::

    grid = TileGrid(dim=-1, in_sizes=(3, 2), first=[nn.Linear(3, 2), nn.Linear(2, 2)],
                    routes=(((0, 0, 1), (1, 0, 1)), ((0, 1, 1), (1, 1, 1))),
                    last=[nn.Linear(2, 4), nn.Linear(2, 3)], out_size=7, bias=True)
    grid(torch.randn(8, 5)).shape   # (8, 7)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

Route = tuple[tuple[int, int, int], ...]  # per row tile: (column block, first component, count) for each of its tiles


class TileGrid(nn.Module):
    """Split along ``dim`` into ``in_sizes``; ``first[b]`` on block b; row tile a: ``last[a]`` on its routed components.

    ``routes[a]`` lists, for each tile of row a, (column block b, offset, count):
    the slice of ``first[b]``'s output channels that holds that tile's components.
    The row tiles' outputs are concatenated in order (``out_size`` channels) and
    ``bias`` (out_size,) is added once at the end.
    """

    def __init__(
        self,
        dim: int,
        in_sizes: Sequence[int],
        first: Sequence[nn.Module],
        routes: Sequence[Route],
        last: Sequence[nn.Module],
        out_size: int,
        bias: bool,
    ):
        super().__init__()
        if len(first) != len(in_sizes) or len(last) != len(routes):
            raise ValueError("TileGrid needs one first layer per input block and one last layer per route")
        self.dim, self.in_sizes, self.out_size = dim, tuple(int(s) for s in in_sizes), out_size
        self.routes = tuple(tuple(tuple(int(v) for v in step) for step in route) for route in routes)
        self.first, self.last = nn.ModuleList(first), nn.ModuleList(last)
        self.bias = nn.Parameter(torch.zeros(out_size)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        blocks = torch.split(x, self.in_sizes, dim=self.dim)
        components = [layer(block) for layer, block in zip(self.first, blocks)]
        rows = []
        for route, layer in zip(self.routes, self.last):
            parts = [components[b].narrow(self.dim, start, count) for b, start, count in route]
            rows.append(layer(parts[0] if len(parts) == 1 else torch.cat(parts, dim=self.dim)))
        y = rows[0] if len(rows) == 1 else torch.cat(rows, dim=self.dim)
        if self.bias is None:
            return y
        return y + (self.bias if self.dim == -1 else self.bias.reshape(-1, *([1] * (y.dim() - 2))))

    def macs(self, shape: tuple[int, ...], walk: Callable[[nn.Module, tuple[int, ...]], tuple[int, tuple[int, ...]]]):
        """(multiply-adds, output shape) on an input of ``shape``, each layer counted by ``walk`` (fxdecomp.cost)."""
        dim = self.dim % len(shape)
        total, out_shapes = 0, []
        for size, layer in zip(self.in_sizes, self.first):
            macs, out = walk(layer, (*shape[:dim], size, *shape[dim + 1 :]))
            total, out_shapes = total + macs, [*out_shapes, out]
        out = out_shapes[0]
        for route, layer in zip(self.routes, self.last):
            macs, out = walk(layer, (*out[:dim], sum(count for _, _, count in route), *out[dim + 1 :]))
            total += macs
        return total, (*out[:dim], self.out_size, *out[dim + 1 :])

    def extra_repr(self) -> str:
        return f"dim={self.dim}, in_sizes={self.in_sizes}, out_size={self.out_size}, routes={self.routes}"
