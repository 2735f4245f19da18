"""Tiled SVD (DeepTwist, section 4.2): every tile of the weight matrix gets its own SVD.

The matrix (Linear: T x S; conv: the lowered T x (S*kh*kw), per group) is cut into
``tiles=(rows, cols)`` blocks per group, the columns along input channels, of sizes
differing by at most one (`fxdecomp.factorize.tiles.TileLayout`), so every channel
count can be tiled (a count above the channels is clamped to them). Grouped convs
are tiled group by group. Ranks: one int per tile (group-major, then row-major).

Realisation: with equal tiles and no groups, the compact form: conv: grouped conv
(groups=cols, S -> cols*rows*r, kh x kw) -> ChannelShuffle(cols) -> grouped 1x1
(groups=rows, -> T); Linear: `fxdecomp.layers.TiledLinear`; tiles of lower rank are
zero-padded to the largest, which sets the cost. Otherwise a `fxdecomp.tile_grid.TileGrid`:
one conv (Linear) per column block, one 1x1 conv (Linear) per row tile, each tile
at its own rank.

With calibration data (`factorize_whitened`) each tile's SVD is whitened with its
block of the input Gram matrix G (and of the output one H), and then every row
tile's left factors are refitted by least squares on the whole G (and H), which
couples the tiles of a row: the factors minimise tr(H dW G dW^T) given the right
factors, the output error the planner scores (`fxdecomp.calibration`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..calibration import OutputErrorMeter, output_whitening, whitened_spectrum
from ..errors import InvalidInputError
from ..factorize.svd import Spectrum, matrix_spectrum
from ..factorize.tiles import TileLayout, offsets, refit_left, relative_output_error
from ..layers import TiledLinear
from ..layer_spec import ConvSpec
from ..sketch import LowRankPSD
from ..tile_grid import TileGrid
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
    register,
    set_kernel,
    spatial_conv,
)
from .svd import factors


@dataclass(frozen=True, eq=False)
class TiledState:
    """A layer's tiles and their spectra; with calibration data, what the least-squares refit needs."""

    layout: TileLayout
    groups: list[torch.Tensor]  # the layer's lowered weight per group (T/g, S/g*area)
    tiles: Blocks  # each tile of the weight, tile order
    matrices: list[torch.Tensor]  # what each tile's SVD factorises (H_aa^(1/2) W_ab with an output Gram)
    spectra: list[Spectrum]
    unweights: list[torch.Tensor | None]  # H_aa^(-1/2) per tile, or None
    fit: list[tuple] | None = None  # per group: (W, G, W G, H or None) for `refit_left`
    meter: OutputErrorMeter | None = None  # output errors on a sketched Gram matrix (no fit)


class _Tiled(Decomposer):
    options = ("tiles",)
    data_aware = True

    def __init__(self, tiles: tuple[int, int] = (2, 2)):
        if not (isinstance(tiles, (tuple, list)) and len(tiles) == 2 and all(isinstance(t, int) and t >= 1 for t in tiles)):
            raise InvalidInputError(f"tiled_svd: tiles must be (row_tiles, col_tiles) of positive ints, got {tiles!r}")
        self.tiles = tuple(tiles)

    def layout(self, spec) -> TileLayout:
        if isinstance(spec, ConvSpec):
            return TileLayout.of(spec.out_per_group, spec.in_per_group, spec.groups, spec.kernel_area, self.tiles)
        return TileLayout.of(spec.out_features, spec.in_features, 1, 1, self.tiles)

    def compact(self, spec) -> bool:
        """Whether the compact (grouped conv / TiledLinear) form applies: equal tiles, no groups."""
        layout = self.layout(spec)
        return layout.even and layout.groups == 1

    @staticmethod
    def group_matrices(spec, weight: torch.Tensor) -> list[torch.Tensor]:
        if not isinstance(spec, ConvSpec):
            return [weight.detach()]
        kernel = canonical_kernel(spec, weight.detach())
        return [block.reshape(block.shape[0], -1) for block in kernel.split(spec.out_per_group, dim=0)]

    def max_ranks(self, spec):
        return self.layout(spec).max_ranks()

    def factorize(self, spec, weight):
        layout, groups = self.layout(spec), self.group_matrices(spec, weight)
        tiles = Blocks(layout.tile_matrices(groups))
        return TiledState(layout, groups, tiles, list(tiles), [matrix_spectrum(t) for t in tiles], [None] * len(tiles))

    def factorize_whitened(self, spec, weight, grams, output_weights=None):
        layout, groups = self.layout(spec), self.group_matrices(spec, weight)
        outputs = [sqrt @ sqrt for sqrt, _ in output_weights] if output_weights else [None] * layout.groups
        if any(isinstance(g, LowRankPSD) for g in grams):
            # A sketched Gram (over fxdecomp.sketch.MAX_DENSE_DIM inputs) has no blocks: weight-only
            # factors, errors still measured on the calibration data.
            meter = OutputErrorMeter(list(grams), groups, output_sqrt=[w[0] for w in output_weights] if output_weights else None)
            return TiledState(**{**self.factorize(spec, weight).__dict__, "meter": meter})
        tiles = Blocks(layout.tile_matrices(groups))
        matrices, spectra, unweights, fit = [], [], [], []
        for g, (w, gram, out) in enumerate(zip(groups, grams, outputs)):
            w = w.to(torch.float64)
            row_weights = [output_whitening(out[layout.rows(a), layout.rows(a)]) if out is not None else None for a in range(len(layout.row_sizes))]
            for tile in range(g * layout.per_group, (g + 1) * layout.per_group):
                _, a, b = layout.index(tile)
                span = layout.lowered_cols(b)
                matrix = tiles[tile].to(torch.float64)
                if row_weights[a] is not None:
                    matrix = row_weights[a][0] @ matrix
                matrices.append(matrix)
                spectra.append(whitened_spectrum(matrix, gram[span, span]))
                unweights.append(row_weights[a][1] if row_weights[a] is not None else None)
            fit.append((w, gram, w @ gram, out))
        return TiledState(layout, groups, tiles, matrices, spectra, unweights, fit)

    def tile_factors(self, state: TiledState, ranks) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(left (rows_a, r), right (r, cols_b*area)) per tile, float64, fitted to the data when there is some."""
        return self._fitted(state, ranks)[0]

    def _fitted(self, state: TiledState, ranks):
        """(tile factors, per group W_hat G or None without a dense Gram matrix)."""
        base = [factors(m, r, s, u, torch.float64) for m, r, s, u in zip(state.matrices, ranks, state.spectra, state.unweights)]
        if state.fit is None:
            return base, None
        per = state.layout.per_group
        fitted, approximation_grams = [], []
        for g, (w, gram, weight_gram, out) in enumerate(state.fit):
            tiles, approximation_gram = refit_left(state.layout, w, gram, weight_gram, out, base[g * per : (g + 1) * per])
            fitted += tiles
            approximation_grams.append(approximation_gram)
        return fitted, approximation_grams

    def _dense_groups(self, state: TiledState, ranks) -> list[torch.Tensor]:
        return state.layout.assemble([left @ right for left, right in self.tile_factors(state, ranks)])

    def error(self, spec, state, ranks):
        """Weight-only: the tiles' exact truncation error; with data: the exact output error tr(H dW G dW^T), relative."""
        if state.fit is not None:
            tiles, approximation_grams = self._fitted(state, ranks)
            approximations = state.layout.assemble([left @ right for left, right in tiles])
            weights, _, weight_grams, outputs = zip(*state.fit)
            return relative_output_error(weights, weight_grams, approximations, approximation_grams, outputs)
        if state.meter is not None:
            return state.meter.relative_error(state.groups, self._dense_groups(state, ranks))
        return combined_error([s.relative_error(r) for s, r in zip(state.spectra, ranks)], state.tiles.norms)

    def rank_spectra(self, spec, state):
        return [[s] for s in state.spectra]

    def reconstruct(self, spec, state, ranks):
        groups = self._dense_groups(state, ranks)
        if not isinstance(spec, ConvSpec):
            return groups[0]
        kernel = torch.cat(groups).reshape(spec.out_channels, spec.in_per_group, *spec.kernel_size)
        return layer_kernel(spec, kernel)

    def _padded_factors(self, state, ranks):
        """Per tile: left (tile_rows, R), right (R, tile_cols) with R = max(ranks), zero-padded (compact form)."""
        width = max(ranks)
        for (left, right), r in zip(self.tile_factors(state, ranks), ranks):
            yield nn.functional.pad(left, (0, width - r)), nn.functional.pad(right, (0, 0, 0, width - r))

    def _grid(self, spec, ranks, block_layer, row_layer, dim: int) -> TileGrid:
        """The TileGrid at ``ranks``: ``block_layer(in, out)`` per column block, ``row_layer(in, out)`` per row tile."""
        layout = self.layout(spec)
        rows, cols = len(layout.row_sizes), len(layout.col_sizes)
        first, last, routes = [], [], []
        for g in range(layout.groups):
            rank = lambda a, b: ranks[g * layout.per_group + a * cols + b]  # noqa: E731
            for b in range(cols):
                first.append(block_layer(layout.col_sizes[b], sum(rank(a, b) for a in range(rows))))
            for a in range(rows):
                routes.append(tuple((g * cols + b, sum(rank(p, b) for p in range(a)), rank(a, b)) for b in range(cols)))
                last.append(row_layer(sum(rank(a, b) for b in range(cols)), layout.row_sizes[a]))
        out_size = layout.groups * sum(layout.row_sizes)
        return TileGrid(dim, layout.col_sizes * layout.groups, first, routes, last, out_size, spec.has_bias)

    def _load_grid(self, grid: TileGrid, spec, state, ranks, kernel_shape: tuple[int, ...]) -> None:
        """Copy each tile's factors into its column block's rows and its row tile's columns."""
        layout = state.layout
        rows, cols = len(layout.row_sizes), len(layout.col_sizes)
        firsts = [new_kernel(layer) if isinstance(spec, ConvSpec) else torch.zeros_like(layer.weight) for layer in grid.first]
        lasts = [torch.zeros(layer.weight.shape[0], layer.weight.shape[1], dtype=layer.weight.dtype) for layer in grid.last]
        for tile, (left, right) in enumerate(self.tile_factors(state, ranks)):
            g, a, b = layout.index(tile)
            block, row = g * cols + b, g * rows + a
            _, start, count = grid.routes[row][b]
            firsts[block][start : start + count] = right.reshape(count, layout.col_sizes[b], *kernel_shape)
            column = offsets([c for _, _, c in grid.routes[row]])[b]
            lasts[row][:, column : column + count] = left
        for layer, kernel in zip(grid.first, firsts):
            if isinstance(spec, ConvSpec):
                set_kernel(layer, kernel)
            else:
                with torch.no_grad():
                    layer.weight.copy_(kernel)
        for layer, matrix in zip(grid.last, lasts):
            with torch.no_grad():
                layer.weight.copy_(matrix.reshape(layer.weight.shape))


@register
class ConvTiledSVD(_Tiled):
    kind, method = "conv2d", "tiled_svd"
    kinds = CONV_KINDS

    def structure(self, spec, ranks):
        pads, padding = leading_pad(spec)
        if not self.compact(spec):
            grid = self._grid(
                spec, ranks, lambda i, o: spatial_conv(spec, i, o, padding), lambda i, o: pointwise(spec, i, o), dim=1
            )
            return nn.Sequential(*pads, grid)
        layout = self.layout(spec)
        width, rows, cols = max(ranks), len(layout.row_sizes), len(layout.col_sizes)
        return nn.Sequential(
            *pads,
            spatial_conv(spec, spec.in_channels, cols * rows * width, padding, groups=cols),
            nn.ChannelShuffle(cols),
            pointwise(spec, rows * cols * width, spec.out_channels, groups=rows, bias=spec.has_bias),
        )

    def load(self, module, spec, state, ranks):
        if not self.compact(spec):
            self._load_grid(module[-1], spec, state, ranks, spec.kernel_size)
            return
        width, rows, cols = max(ranks), len(state.layout.row_sizes), len(state.layout.col_sizes)
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
        if not self.compact(spec):
            linear = lambda i, o: nn.Linear(i, o, bias=False)  # noqa: E731
            return self._grid(spec, ranks, linear, linear, dim=-1)
        layout = self.layout(spec)
        return TiledLinear(spec.in_features, spec.out_features, (len(layout.row_sizes), len(layout.col_sizes)), max(ranks), bias=spec.has_bias)

    def load(self, module, spec, state, ranks):
        if not self.compact(spec):
            self._load_grid(module, spec, state, ranks, ())
            return
        width, cols = max(ranks), len(state.layout.col_sizes)
        for index, (left, right) in enumerate(self._padded_factors(state, ranks)):
            a, b = divmod(index, cols)
            with torch.no_grad():
                module.right[b, :, a * width : (a + 1) * width].copy_(right.T)
                module.left[a, b * width : (b + 1) * width, :].copy_(left.T)
