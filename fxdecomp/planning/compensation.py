"""Cross-layer error compensation: fit a layer to the inputs the already compressed layers give it.

Once earlier layers are decomposed, a layer no longer sees its original input X
but X_hat (the compressed model's). Its factors should then reproduce the
*original* layer's output on the *original* input, not its own weight: minimise

    || W X - B X_hat ||_F^2 + lam || W - B ||_F^2          over B of the planned structure,

the asymmetric reconstruction of Zhang et al. 2015 ("Accelerating very deep
convolutional networks", section 3.3) as used sequentially by GPTQ and SVD-LLM.
The ridge ``lam`` pulls toward the original weight, so full rank with an exact
earlier model (X_hat = X) gives B = W exactly. With G = X_hat X_hat^T / n,
C = X X_hat^T / n and M = G + lam I, the minimiser without rank limit is

    B* = W (C + lam I) M^-1,

and the objective is, up to a constant, || (B - B*) M^(1/2) ||_F^2: the best
rank-r B is the whitened SVD of B* on the Gram matrix M (closed form, the SVD
`fxdecomp.decomposers.svd` already does); every data-aware decomposer fitted to
B* with the Gram M minimises the same objective, and a weight-only one fits B*
in the Frobenius norm. The statistics are kept in two parts (fitting and
held-out batches), so that `PairedGram.held_error` can score fits made on one
part on the other (the choice of lam, and whether to refit at all).

Memory: per layer and group, four d x d float64 matrices (d = in_features, or
S*kh*kw/groups for a conv), whatever the number of batches.

Example::

    paired = PairedGram(spec)
    for i, (x, x_hat) in enumerate(zip(original_inputs, compressed_inputs)): paired.update(x, x_hat, held_out=i % 2 == 1)
    target, grams = paired.target(weight, damping=0.01, part="fit")   # B* (the layer's layout) and M per group
    paired.held_error(weight, reconstructed)        # lower is better
"""

from __future__ import annotations

import torch

from ..calibration import DAMPING, GramAccumulator
from ..decomposers.base import canonical_kernel, layer_kernel
from ..errors import InvalidInputError
from ..layer_spec import ConvSpec, LinearSpec


class PairedGram(GramAccumulator):
    """Running float64 Gram matrix of X_hat and cross-Gram matrix X X_hat^T of one layer, per group, in two parts.

    ``sum`` (from `GramAccumulator`) holds sum x_hat x_hat^T and ``cross`` sum x x_hat^T over the
    paired input rows (a Linear's input vectors, a conv's im2col patches) of the fitting batches;
    ``held_sum`` and ``held_cross`` the same over held-out batches, on which `held_error` scores
    fits (to choose the ridge, `fxdecomp.passes.compensate`). `target` fits on both parts unless told.
    """

    def __init__(self, spec: ConvSpec | LinearSpec, damping: float = DAMPING):
        super().__init__(spec, max_dense_dim=1 << 62)  # dense always: callers check `dimension` first
        self.cross = torch.zeros_like(self.sum)
        self.held_sum, self.held_cross = torch.zeros_like(self.sum), torch.zeros_like(self.sum)
        self.held_count = 0
        self.damping = damping

    @staticmethod
    def dimension(spec: ConvSpec | LinearSpec) -> int:
        """d: the length of one input row of a group (in_features, or S*kh*kw/groups)."""
        return GramAccumulator._layout(spec)[1]

    @staticmethod
    def dense_size(spec: ConvSpec | LinearSpec) -> int:
        """Bytes of the four float64 matrices this accumulator keeps."""
        groups, dim = GramAccumulator._layout(spec)
        return 4 * 8 * groups * dim * dim

    @torch.no_grad()
    def update(self, x: torch.Tensor, x_hat: torch.Tensor, held_out: bool = False) -> None:  # type: ignore[override]
        """Add one call's inputs in the original model (x) and in the compressed one (x_hat), same shape."""
        if x.shape != x_hat.shape:
            raise InvalidInputError(
                f"the layer's input has shape {tuple(x.shape)} in the original model and {tuple(x_hat.shape)} in the "
                "compressed one; compensation needs the same calibration batch in both"
            )
        rows, rows_hat = self._rows(x.detach()), self._rows(x_hat.detach())
        gram, cross = (self.held_sum, self.held_cross) if held_out else (self.sum, self.cross)
        # One batch's products in the inputs' precision (float32: twice as fast), summed in float64.
        work = torch.float64 if x.dtype == torch.float64 else torch.float32
        for g in range(self.groups):
            r, r_hat = rows[g].to(work), rows_hat[g].to(work)
            gram[g] += (r_hat.T @ r_hat).to(torch.float64)
            cross[g] += (r.T @ r_hat).to(torch.float64)
        if held_out:
            self.held_count += rows.shape[1]
        else:
            self.count += rows.shape[1]

    def matrices(self, group: int, part: str = "all") -> tuple[torch.Tensor, torch.Tensor]:
        """(G, C) of a group: mean Gram of X_hat and mean cross-Gram, over part "fit", "held" or "all" of the rows."""
        if part == "fit":
            return self.sum[group] / max(self.count, 1), self.cross[group] / max(self.count, 1)
        if part == "held":
            return self.held_sum[group] / max(self.held_count, 1), self.held_cross[group] / max(self.held_count, 1)
        n = max(self.count + self.held_count, 1)
        return (self.sum[group] + self.held_sum[group]) / n, (self.cross[group] + self.held_cross[group]) / n

    def blocks(self, weight: torch.Tensor) -> list[torch.Tensor]:
        """The weight as one (out/groups, d) float64 matrix per group, in the row order of the inputs."""
        if isinstance(self.spec, LinearSpec):
            return [weight.detach().to(torch.float64)]
        kernel = canonical_kernel(self.spec, weight.detach()).to(torch.float64)
        return [b.reshape(b.shape[0], -1) for b in kernel.split(self.spec.out_per_group, dim=0)]

    def target(self, weight: torch.Tensor, damping: float | None = None, part: str = "all") -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(B*, [M per group]): the compensated weight in ``weight``'s layout and dtype, and the Gram matrices to whiten with.

        ``damping`` (default: the accumulator's) sets the ridge lam = damping x mean diagonal of G;
        ``part`` the rows fitted ("fit", "held" or "all"). Raises `InvalidInputError` if no input was observed.
        """
        if self.count + self.held_count == 0:
            raise InvalidInputError("no calibration input reached this layer: nothing to compensate")
        damping = self.damping if damping is None else damping
        targets, grams = [], []
        for g, block in enumerate(self.blocks(weight)):
            gram, cross = self.matrices(g, part)
            ridge = max(damping * float(gram.diagonal().mean()), 1e-12)
            eye = torch.eye(gram.shape[0], dtype=torch.float64)
            shifted = gram + ridge * eye
            # B* = W (C + lam I) M^-1, as M^-1 (C^T + lam I) W^T (M symmetric positive definite: Cholesky).
            factor = torch.linalg.cholesky(shifted)
            targets.append(torch.cholesky_solve((cross.T + ridge * eye) @ block.T, factor).T)
            grams.append(shifted)
        return self._as_layer(weight, targets), grams

    def _as_layer(self, weight: torch.Tensor, blocks: list[torch.Tensor]) -> torch.Tensor:
        if isinstance(self.spec, LinearSpec):
            return blocks[0].to(weight.dtype)
        spec = self.spec
        canonical = torch.cat(blocks).reshape(spec.out_channels, spec.in_per_group, *spec.kernel_size)
        return layer_kernel(spec, canonical).to(weight.dtype)

    def error(self, target: torch.Tensor, candidate: torch.Tensor, grams: list[torch.Tensor], output_grams=None) -> float:
        """sum over groups of tr((B - B*) M (B - B*)^T [H]): the objective, up to its constant, of weight ``candidate``.

        ``output_grams`` (H per group, or None) weights the outputs as the model's outputs see them.
        """
        total = 0.0
        for g, (b, b_star) in enumerate(zip(self.blocks(candidate), self.blocks(target))):
            diff = b - b_star
            weighted = diff if output_grams is None else output_grams[g].to(torch.float64) @ diff
            total += float(((weighted @ grams[g]) * diff).sum())
        return total

    def held_error(self, weight: torch.Tensor, candidate: torch.Tensor, output_grams=None) -> float:
        """(1/n) ||W X - B X_hat||^2 [H-weighted] on the held-out rows, less its constant (1/n) ||W X||^2.

        Comparable between candidates B of one layer (lower is better); ``weight`` is W.
        """
        total = 0.0
        for g, (w, b) in enumerate(zip(self.blocks(weight), self.blocks(candidate))):
            gram, cross = self.matrices(g, "held")
            h = None if output_grams is None else output_grams[g].to(torch.float64)
            weighted_b = b if h is None else h @ b
            weighted_w = w if h is None else h @ w
            total += float(((weighted_b @ gram) * b).sum() - 2 * ((weighted_w @ cross) * b).sum())
        return total
