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


def psd_solve(rhs: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    """rhs @ matrix^+ for a symmetric positive semi-definite ``matrix``: Cholesky, or eigh past a singular one."""
    factor, info = torch.linalg.cholesky_ex(matrix)
    if int(info) == 0:
        return torch.cholesky_solve(rhs.T, factor).T
    values, vectors = torch.linalg.eigh(matrix)
    keep = values > float(values.max().clamp_min(0.0)) * matrix.shape[0] * torch.finfo(matrix.dtype).eps
    vectors = vectors[:, keep]
    return ((rhs @ vectors) / values[keep]) @ vectors.T


def refit_left(
    layout: TileLayout,
    weight: torch.Tensor,
    gram: torch.Tensor,
    weight_gram: torch.Tensor,
    output_gram: torch.Tensor | None,
    factors: Sequence[tuple[torch.Tensor, torch.Tensor]],
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    """One group's tile factors with every row tile's left factors refitted to the calibration data, and W_hat G.

    ``weight`` (T/g, n), ``gram`` G (n, n), ``weight_gram`` = weight @ G, ``output_gram`` H (T/g, T/g)
    or None; ``factors`` (left (rows_a, r), right (r, cols_b*area)) per tile of the group, row-major.
    Row tile a's left factors L_a = [L_a1 .. L_aB] are the minimiser of tr(H dW G dW^T) with the right
    factors R_a (block-diagonal) fixed: W_a G R_a^T (R_a G R_a^T)^+ when H is None (the row tiles do not
    interact); with H, one block-coordinate sweep over the row tiles, each step the exact minimiser
    given the others. Also returns W_hat G (T/g, n) of the refitted factors, for `relative_output_error`.
    """
    cols = len(layout.col_sizes)
    rows = [factors[a * cols : (a + 1) * cols] for a in range(len(layout.row_sizes))]
    # R_a G, block by block (R_a is block-diagonal over the column tiles), and R_a^T's column blocks.
    right_gram = [torch.cat([right.to(torch.float64) @ gram[layout.lowered_cols(b)] for b, (_, right) in enumerate(row)]) for row in rows]
    lefts = [torch.cat([left.to(torch.float64) for left, _ in row], dim=1) for row in rows]

    def times_right_t(matrix: torch.Tensor, a: int) -> torch.Tensor:
        """matrix (.., n) @ R_a^T (n, sum r), block by block."""
        return torch.cat([matrix[:, layout.lowered_cols(b)] @ right.to(torch.float64).T for b, (_, right) in enumerate(rows[a])], dim=1)

    for a, rg in enumerate(right_gram):
        span = layout.rows(a)
        normal = times_right_t(rg, a)  # R_a G R_a^T
        if output_gram is None:
            lefts[a] = psd_solve(times_right_t(weight_gram[span], a), normal)
            continue
        residual = times_right_t(weight_gram, a)  # E G R_a^T over all rows, then the H-weighted step
        for other, (left, rg_other) in enumerate(zip(lefts, right_gram)):
            residual[layout.rows(other)] -= left @ times_right_t(rg_other, a)
        step = torch.linalg.solve(output_gram[span, span], psd_solve(output_gram[span] @ residual, normal))
        lefts[a] = lefts[a] + step
    fitted = []
    for row, left in zip(rows, lefts):
        start = 0
        for _, right in row:
            fitted.append((left[:, start : start + right.shape[0]], right.to(torch.float64)))
            start += right.shape[0]
    return fitted, torch.cat([left @ rg for left, rg in zip(lefts, right_gram)])


def refit_last_factor(weight_gram: torch.Tensor, gram: torch.Tensor, right: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, L M G): the left factor L (out, r) minimising tr(H (W - L M) G (W - L M)^T) for a fixed M = ``right`` (r, n), any H > 0.

    L = W G M^T (M G M^T)^+: the normal equations do not involve H, because L is unconstrained.
    """
    right = right.to(torch.float64)
    right_gram = right @ gram
    left = psd_solve(weight_gram @ right.T, right_gram @ right.T)
    return left, left @ right_gram


def relative_output_error(
    weights: Sequence[torch.Tensor],
    weight_grams: Sequence[torch.Tensor],
    approximations: Sequence[torch.Tensor],
    approximation_grams: Sequence[torch.Tensor],
    output_grams: Sequence[torch.Tensor | None],
) -> float:
    """sqrt(sum_g tr(H dW G dW^T) / sum_g tr(H W G W^T)) over groups, from W G and W_hat G (H = I where None)."""
    error = total = 0.0
    for w, wg, approx, approx_gram, h in zip(weights, weight_grams, approximations, approximation_grams, output_grams):
        delta = w.to(torch.float64) - approx
        error += float(((delta if h is None else h @ delta) * (wg - approx_gram)).sum())
        total += float(((w if h is None else h @ w.to(torch.float64)) * wg).sum())
    return (max(error, 0.0) / total) ** 0.5 if total > 0 else 0.0
