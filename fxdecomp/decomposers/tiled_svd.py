"""Tiled SVD (DeepTwist, section 4.2): every tile of the weight matrix gets its own SVD.

The matrix (Linear: T x S; conv: the lowered T x (S*kh*kw)) is cut into
``tiles=(rows, cols)`` blocks, the columns along input channels. Conv realisation:
grouped conv (groups=cols, S -> cols*rows*r, kh x kw) -> ChannelShuffle(cols)
-> grouped 1x1 (groups=rows, -> T). Linear: `fxdecomp.layers.TiledLinear`.
Ranks: one int per tile (row-major); tiles of lower rank are zero-padded to the
largest, which sets the cost.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import InvalidInputError, UnsupportedLayerError
from ..factorize.svd import low_rank_factors, matrix_spectrum
from ..layers import TiledLinear
from ..layer_spec import ConvSpec
from .base import (
    CONV_KINDS,
    Blocks,
    Decomposer,
    canonical_kernel,
    combined_error,
    layer_kernel,
    leading_pad,
    new_kernel,
    pointwise,
    refuse_groups,
    register,
    set_kernel,
    spatial_conv,
)


class _Tiled(Decomposer):
    options = ("tiles",)

    def __init__(self, tiles: tuple[int, int] = (2, 2)):
        if not (isinstance(tiles, (tuple, list)) and len(tiles) == 2 and all(isinstance(t, int) and t >= 1 for t in tiles)):
            raise InvalidInputError(f"tiled_svd: tiles must be (row_tiles, col_tiles) of positive ints, got {tiles!r}")
        self.tiles = tuple(tiles)

    def _sizes(self, spec) -> tuple[int, int]:
        """(rows per tile, input channels or features per tile)."""
        out_size, in_size = (spec.out_channels, spec.in_channels) if isinstance(spec, ConvSpec) else (spec.out_features, spec.in_features)
        rows, cols = self.tiles
        if out_size % rows or in_size % cols:
            raise UnsupportedLayerError(
                f"tiled_svd: tiles={self.tiles} do not divide the layer's {out_size} outputs x {in_size} inputs; "
                "pick tiles that divide both"
            )
        return out_size // rows, in_size // cols

    def _tile_matrices(self, spec, weight) -> list[torch.Tensor]:
        """Row-major list of tile matrices."""
        tile_rows, tile_cols = self._sizes(spec)
        rows, cols = self.tiles
        w = canonical_kernel(spec, weight.detach()) if isinstance(spec, ConvSpec) else weight.detach()
        return Blocks(
            w[a * tile_rows : (a + 1) * tile_rows, b * tile_cols : (b + 1) * tile_cols].reshape(tile_rows, -1)
            for a in range(rows)
            for b in range(cols)
        )

    def check(self, spec):
        if isinstance(spec, ConvSpec):
            refuse_groups(spec, "tiled_svd")
        self._sizes(spec)

    def max_ranks(self, spec):
        tile_rows, tile_cols = self._sizes(spec)
        area = spec.kernel_area if isinstance(spec, ConvSpec) else 1
        return (min(tile_rows, tile_cols * area),) * (self.tiles[0] * self.tiles[1])

    def factorize(self, spec, weight):
        tiles = self._tile_matrices(spec, weight)
        return tiles, [matrix_spectrum(t) for t in tiles]

    def error(self, spec, state, ranks):
        tiles, spectra = state
        return combined_error([s.relative_error(r) for s, r in zip(spectra, ranks)], tiles.norms)

    def rank_spectra(self, spec, state):
        return [[s] for s in state[1]]

    def reconstruct(self, spec, state, ranks):
        rows, cols = self.tiles
        tiles = [left.double() @ right.double() for left, right in self._padded_factors(state, ranks)]
        matrix = torch.cat([torch.cat(tiles[a * cols : (a + 1) * cols], dim=1) for a in range(rows)], dim=0)
        if spec.kind == "linear":
            return matrix
        # Conv tiles hold (S/cols, *k) column blocks: undo the per-block flattening.
        k = spec.kernel_size
        blocks = matrix.reshape(spec.out_channels, cols, spec.in_channels // cols, *k)
        return layer_kernel(spec, blocks.reshape(spec.out_channels, spec.in_channels, *k))

    def _padded_factors(self, state, ranks):
        """Per tile (a, b): left (tile_rows, R), right (R, tile_cols) with R = max(ranks), zero-padded."""
        width = max(ranks)
        for (tile, spectrum), r in zip(zip(*state), ranks):
            left, right = low_rank_factors(tile, r, spectrum)
            yield (
                torch.nn.functional.pad(left, (0, width - r)),
                torch.nn.functional.pad(right, (0, 0, 0, width - r)),
            )


@register
class ConvTiledSVD(_Tiled):
    kind, method = "conv2d", "tiled_svd"
    kinds = CONV_KINDS

    def structure(self, spec, ranks):
        width, (rows, cols) = max(ranks), self.tiles
        pads, padding = leading_pad(spec)
        return nn.Sequential(
            *pads,
            spatial_conv(spec, spec.in_channels, cols * rows * width, padding, groups=cols),
            nn.ChannelShuffle(cols),
            pointwise(spec, rows * cols * width, spec.out_channels, groups=rows, bias=spec.has_bias),
        )

    def load(self, module, spec, state, ranks):
        width, (rows, cols) = max(ranks), self.tiles
        first, last = module[-3], module[-1]
        first_kernel, last_kernel = new_kernel(first), new_kernel(last)
        tile_rows = spec.out_channels // rows
        # first: channel (b, a, k); after ChannelShuffle(cols): (a, k, b); last group a reads (k, b).
        for index, (left, right) in enumerate(self._padded_factors(state, ranks)):
            a, b = divmod(index, cols)
            start = (b * rows + a) * width
            first_kernel[start : start + width] = right.reshape(width, -1, *spec.kernel_size)
            last_kernel.flatten(1)[a * tile_rows : (a + 1) * tile_rows, b::cols] = left
        set_kernel(first, first_kernel)
        set_kernel(last, last_kernel)


@register
class LinearTiledSVD(_Tiled):
    kind, method = "linear", "tiled_svd"

    def structure(self, spec, ranks):
        return TiledLinear(spec.in_features, spec.out_features, self.tiles, max(ranks), bias=spec.has_bias)

    def load(self, module, spec, state, ranks):
        width, (_, cols) = max(ranks), self.tiles
        for index, (left, right) in enumerate(self._padded_factors(state, ranks)):
            a, b = divmod(index, cols)
            with torch.no_grad():
                module.right[b, :, a * width : (a + 1) * width].copy_(right.T)
                module.left[a, b * width : (b + 1) * width, :].copy_(left.T)
