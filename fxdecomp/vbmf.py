"""Rank estimation by empirical variational Bayes matrix factorisation (EVBMF).

EVBMF models a matrix as ``Y = B A^T + E`` with Gaussian priors on the factors
(prior variances learned from the data, i.e. *empirical* Bayes) and Gaussian
noise ``E`` of variance ``sigma2``. Its global solution is analytic: it keeps
exactly the singular values of ``Y`` above a threshold that depends only on
``sigma2`` and the shape, so the number kept is a rank estimate with no knob to
tune. When ``sigma2`` is not given it is estimated by minimising the free
energy, a one-dimensional problem. Kim et al. (2016) use this to pick the
Tucker-2 ranks of convolution kernels from their mode-0 and mode-1 unfoldings.

Usage::

    >>> import torch
    >>> from fxdecomp.vbmf import evbmf, vbmf_rank
    >>> g = torch.Generator().manual_seed(0)
    >>> signal = torch.randn(256, 8, generator=g) @ torch.randn(8, 512, generator=g)
    >>> weight = signal + 0.1 * torch.randn(256, 512, generator=g)
    >>> vbmf_rank(weight)
    8
    >>> result = evbmf(weight)
    >>> round(result.sigma2, 2)
    0.01

This module is hand-written from the papers below because no maintained
library ships EVBMF; the widely copied single-file port (``VBMF.py``) has an
absolute optimiser tolerance that breaks scale invariance and an index that
goes negative for small matrices. Here the matrix is normalised before the
search, the search runs over ``log sigma2``, and the threshold constant
``tau_bar`` is solved for exactly rather than approximated by ``2.5129 sqrt(alpha)``.

References:
    [1] S. Nakajima, M. Sugiyama, S. D. Babacan and R. Tomioka, "Global analytic
        solution of fully-observed variational Bayesian matrix factorization",
        JMLR 14:1-37, 2013.
    [2] S. Nakajima, R. Tomioka, M. Sugiyama and S. D. Babacan, "Condition for
        perfect dimensionality recovery by variational Bayesian PCA", JMLR
        16, 2015 (the free energy as a function of ``sigma2`` and its bounds).
    [3] Y.-D. Kim, E. Park, S. Yoo, T. Choi, L. Yang and D. Shin, "Compression of
        deep convolutional neural networks for fast and low power mobile
        applications", ICLR 2016.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from scipy.optimize import brentq, minimize_scalar

from fxdecomp.errors import InvalidInputError

__all__ = ["VBMFResult", "evbmf", "evbmf_singular_values", "vbmf_rank"]

# Points of the coarse grid over log(sigma2) that brackets the global minimum
# of the free energy before the bounded Brent refinement.
_GRID_POINTS = 192
# Absolute tolerance on log(sigma2), i.e. a relative tolerance on sigma2.
_LOG_SIGMA2_XATOL = 1e-10
# The threshold is never searched below this fraction of the largest singular
# value: singular values from the float64 Gram matrix are only accurate to
# about 1e-8 of the largest, so smaller ones are numerical zeros.
_MIN_RELATIVE_THRESHOLD = 1e-6


@dataclass(frozen=True)
class VBMFResult:
    """What :func:`evbmf` found.

    Attributes:
        rank: estimated rank, clamped to ``[1, min(L, M)]``.
        sigma2: noise variance per entry, estimated or as given, in the units of the input.
        threshold: singular values strictly above it are kept (input units).
        singular_values: of the input matrix, descending.
    """

    rank: int
    sigma2: float
    threshold: float
    singular_values: tuple[float, ...]


def vbmf_rank(matrix: torch.Tensor | np.ndarray) -> int:
    """The EVBMF rank estimate of ``matrix``: ``evbmf(matrix).rank``."""
    return evbmf(matrix).rank


def evbmf(matrix: torch.Tensor | np.ndarray, sigma2: float | None = None) -> VBMFResult:
    """Estimate the rank of a 2-D matrix by EVBMF.

    Args:
        matrix: a finite 2-D tensor or array, in either orientation.
        sigma2: the noise variance per entry if known; estimated when ``None``.

    Raises:
        InvalidInputError: the matrix is not 2-D, is empty, is complex or has
            non-finite entries, or ``sigma2`` is not a finite positive number.
    """
    y = _as_float64_matrix(matrix)
    if y.shape[0] > y.shape[1]:
        y = y.T
    # Same memory layout for Y and Y^T, so both give bit-identical results.
    y = y.contiguous()
    if sigma2 is not None:
        sigma2 = _check_sigma2(sigma2)
    # Work on Y / 2^k with 2^k ~ max|Y|: exact, and keeps the Gram matrix away
    # from overflow and underflow whatever the scale of the input.
    unit = _power_of_two_unit(float(y.abs().max()))
    s = _singular_values(y / unit)
    return _evbmf_from_spectrum(s, unit, y.shape[0], y.shape[1], sigma2)


def evbmf_singular_values(
    singular_values: torch.Tensor | np.ndarray | Sequence[float],
    shape: tuple[int, int],
    sigma2: float | None = None,
) -> VBMFResult:
    """:func:`evbmf` of a ``shape`` matrix from its singular values, already computed.

    ``singular_values`` may come in any order and may hold up to ``max(shape)``
    values (e.g. from the Gram matrix of the larger side); the ``min(shape)``
    largest are used, so at least that many must be given.
    """
    n_rows, n_cols = _check_shape(shape)
    if sigma2 is not None:
        sigma2 = _check_sigma2(sigma2)
    if isinstance(singular_values, torch.Tensor):
        s = singular_values.detach().to(device="cpu", dtype=torch.float64).numpy()
    else:
        try:
            s = np.asarray(singular_values, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise InvalidInputError(f"evbmf: cannot read the singular values ({exc}); pass a 1-D tensor or array") from exc
    if s.ndim != 1 or not min(n_rows, n_cols) <= s.size <= max(n_rows, n_cols):
        raise InvalidInputError(
            f"evbmf: a {n_rows} x {n_cols} matrix needs a 1-D array of {min(n_rows, n_cols)} to {max(n_rows, n_cols)} "
            f"singular values, got shape {tuple(s.shape)}; pass the full spectrum"
        )
    if not np.all(np.isfinite(s)) or np.any(s < 0.0):
        raise InvalidInputError("evbmf: singular values must be finite and non-negative; clamp the eigenvalues at 0 before the square root")
    s = np.sort(s)[::-1][: min(n_rows, n_cols)]
    unit = _power_of_two_unit(float(s[0]))
    return _evbmf_from_spectrum(s / unit, unit, min(n_rows, n_cols), max(n_rows, n_cols), sigma2)


def _evbmf_from_spectrum(s: np.ndarray, unit: float, n_rows: int, n_cols: int, sigma2: float | None) -> VBMFResult:
    """EVBMF of an L x M matrix (L <= M) whose singular values, descending, are ``s * unit``."""
    alpha = n_rows / n_cols
    tau_bar = _tau_bar(alpha)
    # EVB threshold of [1] (Theorem on the EVB solution), written as in [2]:
    # gamma_EVB^2 = sigma^2 M x_bar with x_bar = (1 + tau_bar)(1 + alpha/tau_bar).
    x_bar = (1.0 + tau_bar) * (1.0 + alpha / tau_bar)

    if sigma2 is None:
        sigma2_unit = _estimate_sigma2(s, n_rows, n_cols, alpha, x_bar)
    else:
        sigma2_unit = sigma2 / unit / unit
    threshold_unit = math.sqrt(n_cols * x_bar * sigma2_unit)
    rank = int(np.count_nonzero(s > threshold_unit))
    rank = min(max(rank, 1), n_rows)

    return VBMFResult(
        rank=rank,
        sigma2=float(sigma2) if sigma2 is not None else sigma2_unit * unit * unit,
        threshold=threshold_unit * unit,
        singular_values=tuple(float(v) * unit for v in s),
    )


def _power_of_two_unit(peak: float) -> float:
    """A power of two near ``peak`` (1 for 0): dividing by it is exact."""
    return math.ldexp(1.0, math.frexp(peak)[1]) if peak > 0.0 else 1.0


def _check_shape(shape: tuple[int, int]) -> tuple[int, int]:
    """``shape`` as two positive ints, or InvalidInputError."""
    if (
        not isinstance(shape, (tuple, list, torch.Size))
        or len(shape) != 2
        or any(isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1 for n in shape)
    ):
        raise InvalidInputError(f"evbmf: shape must be two positive ints, got {shape!r}; pass the matrix's (rows, cols)")
    return int(shape[0]), int(shape[1])


def _as_float64_matrix(matrix: torch.Tensor | np.ndarray) -> torch.Tensor:
    """``matrix`` as a float64 CPU tensor, after checking it is 2-D, non-empty, real and finite."""
    if isinstance(matrix, torch.Tensor):
        if matrix.is_complex():
            raise InvalidInputError(f"evbmf: complex matrices are not supported (dtype {matrix.dtype}); pass a real matrix")
        y = matrix.detach().to(device="cpu", dtype=torch.float64)
    else:
        try:
            array = np.asarray(matrix)
        except Exception as exc:  # ragged lists and the like
            raise InvalidInputError(f"evbmf: cannot read the matrix as an array ({exc}); pass a 2-D tensor or array") from exc
        if array.dtype.kind not in "biuf":
            raise InvalidInputError(f"evbmf: the matrix must be real-valued, got dtype {array.dtype}; pass a real 2-D tensor or array")
        y = torch.from_numpy(np.array(array, dtype=np.float64, copy=True))
    if y.ndim != 2:
        raise InvalidInputError(f"evbmf: expected a 2-D matrix, got shape {tuple(y.shape)}; reshape or unfold the tensor first")
    if y.numel() == 0:
        raise InvalidInputError(f"evbmf: the matrix is empty (shape {tuple(y.shape)}); pass a matrix with at least one entry")
    bad = int((~torch.isfinite(y)).sum())
    if bad:
        raise InvalidInputError(f"evbmf: the matrix has {bad} non-finite entries (NaN or inf); replace them before estimating a rank")
    return y


def _check_sigma2(sigma2: float) -> float:
    """``sigma2`` as a float, or InvalidInputError unless it is finite and positive."""
    try:
        value = float(sigma2)
    except (TypeError, ValueError) as exc:
        raise InvalidInputError(f"evbmf: sigma2 must be a number, got {sigma2!r}; pass a positive float or None to estimate it") from exc
    if isinstance(sigma2, bool) or not math.isfinite(value) or value <= 0.0:
        raise InvalidInputError(f"evbmf: sigma2 must be finite and positive, got {sigma2!r}; pass a positive float or None to estimate it")
    return value


def _singular_values(y: torch.Tensor) -> np.ndarray:
    """Descending singular values of an L x M float64 matrix with L <= M.

    From the eigenvalues of the L x L Gram matrix: several times faster than
    ``svdvals`` for wide matrices, and accurate to ~1e-8 of the largest.
    """
    eigenvalues = torch.linalg.eigvalsh(y @ y.T)
    return eigenvalues.clamp_min(0.0).sqrt().flip(0).numpy()


@lru_cache(maxsize=256)
def _tau_bar(alpha: float) -> float:
    """The unique zero of Xi(tau; alpha) = Phi(tau) + Phi(tau / alpha), Phi(z) = log(1 + z)/z - 1/2.

    This is the constant of the EVB threshold in [1] and [2]; it equals
    2.5129 sqrt(alpha) only at alpha = 1. It makes psi_1(x_bar) = 0, so the
    free energy below is continuous at the threshold.
    """

    def xi(tau: float) -> float:
        return math.log1p(tau) / tau + math.log1p(tau / alpha) * alpha / tau - 1.0

    # Xi decreases in tau, is positive at sqrt(alpha) and negative at 3.
    return float(brentq(xi, 0.5 * math.sqrt(alpha), 3.0, xtol=1e-15, rtol=1e-15))


def _free_energy(log_sigma2: np.ndarray, g2: np.ndarray, n_rows: int, n_cols: int, alpha: float, x_bar: float) -> np.ndarray:
    """The EVB free energy as a function of log(sigma2), up to constants, for each entry of ``log_sigma2``.

    This is sum_h psi(gamma_h^2 / (M sigma^2)) of [2], with
    psi(x) = x - log x + [x > x_bar] psi_1(x),
    psi_1(x) = log(tau + 1) + alpha log(tau/alpha + 1) - tau,
    tau = tau(x; alpha) = (x - 1 - alpha + sqrt((x - 1 - alpha)^2 - 4 alpha)) / 2.
    The -log(gamma_h^2 / M) part of -log x is constant in sigma^2 and dropped,
    which also keeps zero singular values finite.
    """
    log_sigma2 = np.atleast_1d(log_sigma2)[:, None]
    x = g2[None, :] / (n_cols * np.exp(log_sigma2))
    above = x > x_bar
    xa = np.where(above, x, x_bar)  # tau(x; alpha) is real only for x >= (1 + sqrt(alpha))^2
    b = xa - 1.0 - alpha
    tau = 0.5 * (b + np.sqrt(np.maximum(b * b - 4.0 * alpha, 0.0)))
    psi1 = np.log1p(tau) + alpha * np.log1p(tau / alpha) - tau
    return x.sum(axis=1) + n_rows * log_sigma2[:, 0] + np.where(above, psi1, 0.0).sum(axis=1)


def _estimate_sigma2(s: np.ndarray, n_rows: int, n_cols: int, alpha: float, x_bar: float) -> float:
    """The noise variance minimising the EVB free energy, in the units of ``s``."""
    total = float(np.sum(s * s))
    if total == 0.0:
        return 0.0
    # Normalise so that the upper bound sigma_bar^2 = sum_h gamma_h^2 / (L M) of [2] is 1.
    scale = total / (n_rows * n_cols)
    g2 = s * s / scale

    # Lower bound of [2]: the estimated rank is at most H_bar = ceil(L / (1 + alpha)) - 1
    # = ceil(L M / (L + M)) - 1, so sigma^2 >= max(gamma_{H_bar+1}^2 / (M x_bar),
    # sum_{h > H_bar} gamma_h^2 / (M (L - H_bar))). 0 <= H_bar <= L - 1 always.
    h_bar = -(-n_rows * n_cols // (n_rows + n_cols)) - 1
    lower = max(g2[h_bar] / (n_cols * x_bar), float(np.mean(g2[h_bar:])) / n_cols)
    floor = _MIN_RELATIVE_THRESHOLD**2 * g2[0] / (n_cols * x_bar)
    log_lo, log_hi = math.log(max(lower, floor)), 0.0
    if h_bar == 0 or log_lo >= log_hi:  # e.g. 1 x M, 2 x 2: the bounds coincide
        return scale

    def objective(t: np.ndarray) -> np.ndarray:
        return _free_energy(t, g2, n_rows, n_cols, alpha, x_bar)

    # The free energy can have several local minima: grid first, then refine
    # the best grid cell with bounded Brent.
    grid = np.linspace(log_lo, log_hi, _GRID_POINTS)
    values = objective(grid)
    best = int(np.argmin(values))
    best_t, best_value = float(grid[best]), float(values[best])
    lo, hi = grid[max(best - 1, 0)], grid[min(best + 1, _GRID_POINTS - 1)]
    refined = minimize_scalar(
        lambda t: float(objective(np.array([t]))[0]),
        bounds=(lo, hi),
        method="bounded",
        options={"xatol": _LOG_SIGMA2_XATOL},
    )
    if refined.fun <= best_value:
        best_t = float(refined.x)
    return math.exp(best_t) * scale
