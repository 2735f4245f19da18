"""Tiles of a weight matrix (tiled SVD) and the least-squares fits that fit factors to calibration data.

`TileLayout` cuts each group's lowered weight (T/g x S/g*area) into row x column
tiles of sizes differing by at most one (``torch.tensor_split`` semantics), so any
channel count can be tiled. `refit_left` and `refit_last_factor` are the closed-form
least-squares steps that make factors minimise the output error
tr(H dW G dW^T) on calibration data (G the input Gram matrix, H the output-side
one or the identity): with the right factors fixed, the best left factors solve
normal equations (each step can only lower that error).

Example::

    layout = TileLayout.of(out_per_group=10, in_per_group=7, groups=1, area=9, tiles=(3, 2))
    layout.row_sizes, layout.col_sizes   # (4, 3, 3), (4, 3)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


def split_sizes(n: int, parts: int) -> tuple[int, ...]:
    """``n`` cut into ``parts`` sizes differing by at most one, larger first (``torch.tensor_split``'s sizes)."""
    return tuple(n // parts + (1 if i < n % parts else 0) for i in range(parts))


def offsets(sizes: Sequence[int]) -> list[int]:
    starts = [0]
    for size in sizes:
        starts.append(starts[-1] + size)
    return starts


@dataclass(frozen=True)
class TileLayout:
    """Row tiles (output channels) and column tiles (input channels) of each group, and the kernel area.

    Tiles are numbered group-major, then row-major: tile ``(g, a, b)`` covers the
    group's output rows ``rows(a)`` and input channels ``cols(b)`` (lowered columns
    ``cols(b) * area``). A count larger than the channels is clamped to them.
    """

    groups: int
    row_sizes: tuple[int, ...]
    col_sizes: tuple[int, ...]
    area: int

    @classmethod
    def of(cls, out_per_group: int, in_per_group: int, groups: int, area: int, tiles: tuple[int, int]) -> "TileLayout":
        rows, cols = min(tiles[0], out_per_group), min(tiles[1], in_per_group)
        return cls(groups, split_sizes(out_per_group, rows), split_sizes(in_per_group, cols), area)

    @property
    def even(self) -> bool:
        return len(set(self.row_sizes)) == 1 and len(set(self.col_sizes)) == 1

    @property
    def per_group(self) -> int:
        return len(self.row_sizes) * len(self.col_sizes)

    @property
    def count(self) -> int:
        return self.groups * self.per_group

    def index(self, tile: int) -> tuple[int, int, int]:
        """(group, row tile, column tile) of tile number ``tile``."""
        g, rest = divmod(tile, self.per_group)
        return (g, *divmod(rest, len(self.col_sizes)))

    def rows(self, a: int) -> slice:
        starts = offsets(self.row_sizes)
        return slice(starts[a], starts[a + 1])

    def cols(self, b: int) -> slice:
        starts = offsets(self.col_sizes)
        return slice(starts[b], starts[b + 1])

    def lowered_cols(self, b: int) -> slice:
        span = self.cols(b)
        return slice(span.start * self.area, span.stop * self.area)

    def max_ranks(self) -> tuple[int, ...]:
        return tuple(min(self.row_sizes[a], self.col_sizes[b] * self.area) for _, a, b in map(self.index, range(self.count)))

    def tile_matrices(self, group_matrices: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Each tile's block of its group's lowered matrix, in tile order."""
        return [group_matrices[g][self.rows(a), self.lowered_cols(b)] for g, a, b in map(self.index, range(self.count))]

    def assemble(self, blocks: Sequence[torch.Tensor], dtype: torch.dtype = torch.float64) -> list[torch.Tensor]:
        """The group matrices (T/g x S/g*area) made of the tiles' ``blocks`` (in tile order)."""
        out_size, in_size = sum(self.row_sizes), sum(self.col_sizes) * self.area
        groups = [torch.zeros(out_size, in_size, dtype=dtype) for _ in range(self.groups)]
        for tile, block in enumerate(blocks):
            g, a, b = self.index(tile)
            groups[g][self.rows(a), self.lowered_cols(b)] = block.to(dtype)
        return groups


def _stacked_right(layout: TileLayout, rights: Sequence[torch.Tensor], width: int) -> torch.Tensor:
    """One row tile's right factors as one (sum r, width) matrix, block b at its lowered columns."""
    stacked = torch.zeros(sum(r.shape[0] for r in rights), width, dtype=torch.float64)
    start = 0
    for b, right in enumerate(rights):
        stacked[start : start + right.shape[0], layout.lowered_cols(b)] = right
        start += right.shape[0]
    return stacked


def refit_left(
    layout: TileLayout,
    weight: torch.Tensor,
    gram: torch.Tensor,
    weight_gram: torch.Tensor,
    output_gram: torch.Tensor | None,
    factors: Sequence[tuple[torch.Tensor, torch.Tensor]],
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One group's tile factors with every row tile's left factors refitted to the calibration data.

    ``weight`` (T/g, n), ``gram`` G (n, n), ``weight_gram`` = weight @ G, ``output_gram`` H (T/g, T/g)
    or None; ``factors`` (left (rows_a, r), right (r, cols_b*area)) per tile of the group, row-major.
    Row tile a's left factors L_a = [L_a1 .. L_aB] are the minimiser of tr(H dW G dW^T) with the right
    factors fixed: W_a G R_a^T (R_a G R_a^T)^+ when H is None (the row tiles do not interact); with H,
    one block-coordinate sweep over the row tiles, each step the exact minimiser given the others.
    """
    cols = len(layout.col_sizes)
    width = weight.shape[1]
    rows = [factors[a * cols : (a + 1) * cols] for a in range(len(layout.row_sizes))]
    stacked = [_stacked_right(layout, [right for _, right in row], width) for row in rows]
    right_gram = [s @ gram for s in stacked]  # R_a G
    lefts = [torch.cat([left.to(torch.float64) for left, _ in row], dim=1) for row in rows]
    for a, (s, rg) in enumerate(zip(stacked, right_gram)):
        span = layout.rows(a)
        inverse = torch.linalg.pinv(rg @ s.T, hermitian=True)
        if output_gram is None:
            lefts[a] = weight_gram[span] @ s.T @ inverse
            continue
        # Residual's E G R_a^T over all rows, then the H-weighted step for row tile a's block.
        residual = weight_gram @ s.T
        for other, (left, rg_other) in enumerate(zip(lefts, right_gram)):
            residual[layout.rows(other)] -= left @ (rg_other @ s.T)
        step = torch.linalg.solve(output_gram[span, span], (output_gram[span] @ residual) @ inverse)
        lefts[a] = lefts[a] + step
    fitted = []
    for row, left in zip(rows, lefts):
        start = 0
        for _, right in row:
            fitted.append((left[:, start : start + right.shape[0]], right.to(torch.float64)))
            start += right.shape[0]
    return fitted


def refit_last_factor(weight_gram: torch.Tensor, gram: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """The left factor L (out, r) minimising tr(H (W - L M) G (W - L M)^T) for a fixed M = ``right`` (r, n), any H > 0.

    L = W G M^T (M G M^T)^+: the normal equations do not involve H, because L is unconstrained.
    """
    right = right.to(torch.float64)
    return weight_gram @ right.T @ torch.linalg.pinv(right @ gram @ right.T, hermitian=True)
