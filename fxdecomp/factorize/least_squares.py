"""Closed-form least-squares refit of a linear map (and its bias) from streamed statistics.

The last factor of a decomposed layer is a linear map ``y_hat = W z + b`` of the
penultimate factor's outputs ``z`` (a Linear, or a conv on the unfolded patches of
``z``). Given calibration rows ``z_i`` and the ORIGINAL layer's outputs ``y_i``,
the ridge-regularised normal equations

    (Z^T Z + lambda D) [W^T; b^T] = Z^T Y,      Z = [z_i^T, 1]

(``D`` the identity on the weight rows, zero on the bias row) give the map that
best reproduces the original outputs: the remaining factor absorbs what the
truncated one lost (Zhang et al. 2015, "Accelerating very deep convolutional
networks", section 3; with ``update="bias"`` only the bias moves, the empirical
bias correction of Nagel et al. 2019, "Data-free quantization", section 4.2).

Statistics stream in float64, in two folds (even and odd samples) so that the ridge
``lambda`` is chosen on held-out rows and a correction is kept only if it lowers the
held-out error. Memory: ``(d + 1)^2 + (d + 1) * T`` numbers per fold, independent
of the number of samples. A grouped last factor (``groups > 1``) is solved per group.

Example::

    acc = LeastSquaresAccumulator(d=8, t=32)
    acc.update(z_rows, y_rows, fold=0)            # (n, 8), (n, 32)
    fit = refit(acc, weight, bias, groups=1)      # weight (32, 8), bias (32,) or None
    fit.accepted, fit.weight, fit.bias, fit.error_before, fit.error_after
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

RIDGE_GRID = (1e-8, 1e-6, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)  # lambda / mean diagonal of the weight rows' Gram


class LeastSquaresAccumulator:
    """Streaming sums of ``[z, 1]^T [z, 1]``, ``[z, 1]^T y`` and ``||y||^2``, per fold (0 and 1), in float64."""

    def __init__(self, d: int, t: int):
        self.d, self.t = d, t
        self.gram = torch.zeros(2, d + 1, d + 1, dtype=torch.float64)
        self.cross = torch.zeros(2, d + 1, t, dtype=torch.float64)
        self.energy = torch.zeros(2, dtype=torch.float64)
        self.rows = [0, 0]

    def update(self, z: torch.Tensor, y: torch.Tensor, fold: int) -> None:
        """Add rows ``z`` (n, d) and targets ``y`` (n, t) to ``fold`` (0 or 1)."""
        z = torch.cat([z.detach().to(torch.float64), torch.ones(z.shape[0], 1, dtype=torch.float64)], dim=1)
        y = y.detach().to(torch.float64)
        self.gram[fold] += z.T @ z
        self.cross[fold] += z.T @ y
        self.energy[fold] += y.square().sum()
        self.rows[fold] += z.shape[0]

    def stats(self, fold: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(Gram, cross-covariance, energy) of one fold, or of both summed (``fold=None``)."""
        if fold is None:
            return self.gram.sum(0), self.cross.sum(0), self.energy.sum()
        return self.gram[fold], self.cross[fold], self.energy[fold]


@dataclass(frozen=True)
class Refit:
    """The refitted last factor, and the squared output errors (summed over the calibration rows) before and after.

    ``accepted`` is false when the refit did not lower the error (on held-out rows and on all
    rows) by more than the requested gain: then ``weight`` and ``bias`` are the inputs unchanged.
    ``ridge`` is the chosen lambda relative to the mean Gram diagonal (None when not fitted).
    """

    weight: torch.Tensor  # (T, d_per_group) as the layer stores it (columns: the unfolded patch)
    bias: torch.Tensor | None  # (T,)
    accepted: bool
    error_before: float
    error_after: float
    energy: float  # sum of ||y||^2: error / energy is the relative squared error
    ridge: float | None


def quadratic_error(gram: torch.Tensor, cross: torch.Tensor, energy: torch.Tensor, w: torch.Tensor) -> float:
    """``sum_i ||y_i - w^T [z_i, 1]||^2`` from the statistics, for an augmented map ``w`` (d + 1, T)."""
    return float(energy - 2 * (w * cross).sum() + (w * (gram @ w)).sum())


def _augmented(weight: torch.Tensor, bias: torch.Tensor | None, groups: int) -> torch.Tensor:
    """The block-diagonal augmented map (d + 1, T) of a grouped layer's weight (T, d / groups) and bias."""
    t, per_group = weight.shape
    w = torch.zeros(per_group * groups + 1, t, dtype=torch.float64)
    out = t // groups
    for g in range(groups):
        w[g * per_group : (g + 1) * per_group, g * out : (g + 1) * out] = weight[g * out : (g + 1) * out].T.double()
    if bias is not None:
        w[-1] = bias.double()
    return w


def _solve(gram: torch.Tensor, cross: torch.Tensor, w0: torch.Tensor, groups: int, ridge: float, update: str, fit_bias: bool) -> torch.Tensor:
    """The ridge solution per group; ``update="bias"`` moves only the bias row (weights kept as in ``w0``);
    ``fit_bias`` false keeps the bias row at zero (a layer without bias stays without)."""
    d = gram.shape[0] - 1
    t = cross.shape[1]
    if update == "bias":
        # b = mean(y) - W mean(z): the bias row's normal equation with the weights fixed.
        w = w0.clone()
        w[-1] = (cross[-1] - gram[-1, :-1] @ w0[:-1]) / gram[-1, -1].clamp_min(1.0)
        return w
    per_group, out = d // groups, t // groups
    w = torch.zeros_like(w0)
    for g in range(groups):
        weights = torch.arange(g * per_group, (g + 1) * per_group)
        rows = torch.cat([weights, torch.tensor([d])]) if fit_bias else weights
        cols = slice(g * out, (g + 1) * out)
        block = gram[rows][:, rows].clone()
        diagonal = block.diagonal()[: len(weights)]
        diagonal += ridge * diagonal.mean().clamp_min(1e-30)
        solution = torch.linalg.lstsq(block, cross[rows, cols]).solution
        w[rows, cols] = solution
    return w


def refit(
    acc: LeastSquaresAccumulator,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    groups: int = 1,
    update: str = "weight_and_bias",
    fit_bias: bool = True,
    ridge: float | None = None,
    min_gain: float = 1e-3,
    exact_below: float = 1e-10,
) -> Refit:
    """Refit ``weight`` (T, d / groups) and ``bias`` (T,) to the accumulated statistics.

    ``ridge`` None chooses lambda from `RIDGE_GRID` by two-fold cross-validation (fit on one
    fold, score on the other) when both folds hold rows, else uses 1e-6. The refit is accepted
    only if it lowers the error by more than ``min_gain`` (relative) on all rows and, when
    cross-validated, on the held-out folds; a layer whose relative squared error is already
    below ``exact_below`` (float rounding: a full-rank decomposition) is left as it is.
    ``update``: "weight_and_bias" (Zhang et al. 2015) or "bias" (Nagel et al. 2019); ``fit_bias`` false
    (only for a layer without bias) keeps it without one. Returns the new weight, and the bias (None
    when the layer had none and none was fitted).
    """
    if update not in ("weight_and_bias", "bias"):
        raise ValueError(f"update must be 'weight_and_bias' or 'bias', got {update!r}")
    gram, cross, energy = acc.stats()
    w0 = _augmented(weight, bias, groups)
    before = quadratic_error(gram, cross, energy, w0)
    unchanged = Refit(weight, bias, False, before, before, float(energy), None)
    if float(energy) <= 0 or before <= exact_below * float(energy):
        return unchanged
    folds = all(acc.rows)
    if ridge is None:
        if folds and update != "bias":
            ridge = min(RIDGE_GRID, key=lambda lam: _held_out(acc, w0, groups, lam, update, fit_bias))
        else:
            ridge = 1e-6
    if folds:
        held_out_before = sum(quadratic_error(*acc.stats(f), w0) for f in (0, 1))
        if _held_out(acc, w0, groups, ridge, update, fit_bias) >= held_out_before * (1 - min_gain):
            return unchanged
    w = _solve(gram, cross, w0, groups, ridge, update, fit_bias)
    after = quadratic_error(gram, cross, energy, w)
    if after >= before * (1 - min_gain):
        return unchanged
    per_group, out = weight.shape[1], weight.shape[0] // groups
    new_weight = torch.cat([w[g * per_group : (g + 1) * per_group, g * out : (g + 1) * out].T for g in range(groups)])
    new_bias = w[-1].to(weight.dtype) if bias is not None or fit_bias or update == "bias" else None
    return Refit(new_weight.to(weight.dtype), new_bias, True, before, after, float(energy), ridge)


def _held_out(acc: LeastSquaresAccumulator, w0: torch.Tensor, groups: int, ridge: float, update: str, fit_bias: bool) -> float:
    """Error on each fold of the map fitted on the other fold, summed."""
    total = 0.0
    for fit_fold, score_fold in ((0, 1), (1, 0)):
        gram, cross, _ = acc.stats(fit_fold)
        w = _solve(gram, cross, w0, groups, ridge, update, fit_bias)
        total += quadratic_error(*acc.stats(score_fold), w)
    return total
