"""Truncated SVD of a weight matrix, through the eigendecomposition of its smaller Gram matrix.

On these CPUs ``torch.linalg.eigh`` of the (min side)^2 Gram matrix in float64 is
far faster and steadier than a full SVD of a wide matrix (VGG-16's 4096 x 25088
classifier: ~9 s against ~96 s). The factors are a projection onto the leading
singular subspace, so no division by small singular values is needed and full
rank reproduces the matrix exactly.

Example::

    spectrum = matrix_spectrum(weight)          # weight: (out, in)
    left, right = low_rank_factors(weight, 16, spectrum)
    approx = left @ right                       # best rank-16 approximation
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import torch

from ..errors import ResourceError


@dataclass(frozen=True, eq=False)
class Spectrum:
    """Squared singular values (descending, float64) and, on demand, the orthonormal basis of one side.

    The energies come from eigenvalues alone (far cheaper than eigenvectors for large
    matrices); `basis` runs the eigendecomposition of ``gram`` the first time factors
    are asked for, so layers the planner keeps never pay for it.
    """

    energies: torch.Tensor
    gram: torch.Tensor  # float64 Gram matrix on ``side`` (rows x rows for "left")
    side: str
    shape: tuple[int, int]  # of the matrix
    compute_basis: Callable[[], torch.Tensor] | None = None  # another way to the basis than ``gram``'s eigenvectors

    @cached_property
    def basis(self) -> torch.Tensor:
        """Columns: left singular vectors if side == "left", else right ones; descending."""
        if self.compute_basis is not None:
            return self.compute_basis()
        _, vectors = torch.linalg.eigh(self.gram)
        return vectors.flip(1)

    @classmethod
    def with_basis(cls, energies: torch.Tensor, basis: torch.Tensor, side: str, shape: tuple[int, int]) -> "Spectrum":
        """A spectrum whose basis is already known (computed another way than from a Gram matrix on ``side``)."""
        spectrum = cls(energies, basis.new_zeros(0, 0), side, shape)
        spectrum.__dict__["basis"] = basis  # the cached_property's slot: never recomputed
        return spectrum

    @property
    def singular_values(self) -> torch.Tensor:
        return self.energies.sqrt()

    @property
    def total(self) -> float:
        return float(self.energies.sum())

    def relative_error(self, rank: int) -> float:
        """||M - M_r||_F / ||M||_F for the best rank-``rank`` approximation M_r."""
        total = self.total
        if total <= 0.0:
            return 0.0
        tail = float(self.energies[rank:].sum())
        return max(tail, 0.0) ** 0.5 / total**0.5

    def energy_rank(self, fraction: float) -> int:
        """Smallest rank that keeps ``fraction`` of the spectral energy (at least 1)."""
        total = self.total
        if total <= 0.0:
            return 1
        kept = torch.cumsum(self.energies, 0) / total
        return min(int((kept < fraction - 1e-12).sum()) + 1, len(self.energies))


def matrix_spectrum(matrix: torch.Tensor, side: str | None = None) -> Spectrum:
    """Spectrum of a 2-D matrix via eigh (float64) of its Gram matrix.

    ``side`` picks the basis: "left" (rows x rows Gram), "right", or None for the smaller one.
    Large float32 matrices get their Gram product in float32 (twice as fast; VGG-16's
    4096 x 25088 classifier is 420 G multiply-adds): the eigenvectors stay orthonormal to
    float64 precision, so factors still reproduce the matrix at full rank, and only
    energies below ~1e-7 of the largest lose accuracy.
    """
    rows, cols = matrix.shape
    side = side or ("left" if rows <= cols else "right")
    small = rows if side == "left" else cols
    # A float64 copy, the Gram matrix and eigh's workspace (~3 Gram matrices).
    check_memory(8 * (rows * cols + 4 * small * small), f"the spectrum of a {rows} x {cols} matrix")
    large = matrix.dtype != torch.float64 and rows * cols * min(rows, cols) > 2**28
    work = matrix.detach().to(torch.float32 if large else torch.float64)
    gram = (work @ work.T if side == "left" else work.T @ work).to(torch.float64)
    return spectrum_of_gram(gram, side, (rows, cols))


def available_memory() -> int:
    """Bytes the kernel says are available (MemAvailable), or a large number where unknown."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62


def check_memory(needed: int, what: str) -> None:
    """Refuse, with the estimate, work that would not fit in the available memory."""
    available = available_memory()
    if needed > 0.8 * available:
        raise ResourceError(
            f"{what} needs about {needed / 2**30:.1f} GiB, more than the {available / 2**30:.1f} GiB available; "
            "exclude this layer, or use a method that splits it (tiled_svd, tt)"
        )


def spectrum_of_gram(gram: torch.Tensor, side: str, shape: tuple[int, int]) -> Spectrum:
    """The spectrum of a matrix from its (float64) Gram matrix on ``side``."""
    # Eigenvalues of large Grams in float32 (~2x faster): they only set errors and ranks.
    values = torch.linalg.eigvalsh(gram.float() if len(gram) >= 512 else gram).to(torch.float64)
    return Spectrum(values.flip(0).clamp_min(0.0), gram, side, shape)


def low_rank_factors(
    matrix: torch.Tensor, rank: int, spectrum: Spectrum | None = None, dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(left, right) with left @ right the best rank-``rank`` approximation of ``matrix``.

    Computed in the precision of the spectrum's basis (float64, or float32 for the large
    float32 matrices `fxdecomp.calibration.whitened_spectrum` whitens in float32); both factors
    come back in ``dtype`` (default: the matrix's); left is (rows, r), right is (r, cols).
    """
    spectrum = spectrum or matrix_spectrum(matrix)
    basis = spectrum.basis[:, :rank]
    work = matrix.detach().to(basis.dtype)
    if spectrum.side == "left":
        left, right = basis, basis.T @ work
    else:
        left, right = work @ basis, basis.T
    dtype = dtype or matrix.dtype
    return left.to(dtype), right.to(dtype)
