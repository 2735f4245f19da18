"""The two layers fxdecomp adds to torch: factorised Linear layers with no torch equivalent.

Both are written with reshape, permute and matmul only, so torch.fx, torch.export,
torch.compile and the ONNX exporter see ordinary ops. Each reports its own
multiply-adds per token (`macs_per_token`) for the cost model.

Example::

    layer = TiledLinear(in_features=64, out_features=32, tiles=(2, 2), rank=4)
    layer(torch.randn(8, 64)).shape  # (8, 32)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn


class TTLinear(nn.Module):
    """A Linear layer stored as a tensor-train matrix (Novikov et al. 2015).

    ``in_modes``/``out_modes`` factor in_features/out_features (row-major); ``ranks``
    are the bonds in the order the input meets them (input side first). Core k
    (processing order) is stored as the matrix (n_k * r_in_k) x (r_out_k * m_k).
    """

    def __init__(self, in_modes: Sequence[int], out_modes: Sequence[int], ranks: Sequence[int], bias: bool = True):
        super().__init__()
        if len(in_modes) != len(out_modes) or len(ranks) != len(in_modes) - 1:
            raise ValueError("TTLinear needs as many in_modes as out_modes, and one rank per bond")
        self.in_modes, self.out_modes = tuple(in_modes), tuple(out_modes)
        self.in_features, self.out_features = math.prod(in_modes), math.prod(out_modes)
        # Processing order runs from the last (fastest) mode to the first.
        self.bonds = (1, *ranks, 1)
        n, m = self.in_modes[::-1], self.out_modes[::-1]
        self.cores = nn.ParameterList(
            nn.Parameter(torch.empty(n[k] * self.bonds[k], self.bonds[k + 1] * m[k])) for k in range(len(n))
        )
        self.bias = nn.Parameter(torch.zeros(self.out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        n, m = self.in_modes[::-1], self.out_modes[::-1]
        t = x.reshape(-1, self.in_features // n[0], n[0], 1)  # (B, P, n_k * r_k, M)
        done = 1
        for k, core in enumerate(self.cores):
            u = t.transpose(-1, -2) @ core  # (B, P, M, r_{k+1} * m_k)
            next_n = n[k + 1] if k + 1 < len(n) else 1
            u = u.reshape(u.shape[0], -1, next_n, done, self.bonds[k + 1], m[k])
            done *= m[k]
            t = u.permute(0, 1, 2, 4, 5, 3).reshape(u.shape[0], u.shape[1], next_n * self.bonds[k + 1], done)
        y = t.reshape(*lead, self.out_features)
        return y + self.bias if self.bias is not None else y

    def macs_per_token(self) -> int:
        n, m = self.in_modes[::-1], self.out_modes[::-1]
        total, rest, done = 0, self.in_features, 1
        for k in range(len(n)):
            rest //= n[k]
            total += rest * done * n[k] * self.bonds[k] * self.bonds[k + 1] * m[k]
            done *= m[k]
        return total

    def extra_repr(self) -> str:
        return f"in_modes={self.in_modes}, out_modes={self.out_modes}, ranks={self.bonds[1:-1]}, bias={self.bias is not None}"


class TiledLinear(nn.Module):
    """A Linear layer whose weight is cut into row x column tiles, each of rank ``rank``.

    ``right[b]`` maps column block b to all row blocks' rank components; ``left[a]``
    gathers row block a's components from every column block (DeepTwist, section 4.2).
    """

    def __init__(self, in_features: int, out_features: int, tiles: tuple[int, int], rank: int, bias: bool = True):
        super().__init__()
        rows, cols = tiles
        self.in_features, self.out_features, self.tiles, self.rank = in_features, out_features, (rows, cols), rank
        self.right = nn.Parameter(torch.empty(cols, in_features // cols, rows * rank))
        self.left = nn.Parameter(torch.empty(rows, cols * rank, out_features // rows))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        rows, cols = self.tiles
        z = x.reshape(-1, cols, 1, self.in_features // cols) @ self.right  # (B, cols, 1, rows * r)
        z = z.reshape(-1, cols, rows, self.rank).transpose(1, 2).reshape(-1, rows, 1, cols * self.rank)
        y = (z @ self.left).reshape(*lead, self.out_features)
        return y + self.bias if self.bias is not None else y

    def macs_per_token(self) -> int:
        rows, cols = self.tiles
        return self.rank * (self.in_features * rows + self.out_features * cols)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, tiles={self.tiles}, rank={self.rank}"
