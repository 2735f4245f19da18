"""Gram matrices of bounded size: a streaming Nyström sketch, and the low-rank-plus-floor matrix it gives.

A dense d x d float64 Gram matrix is 8 d^2 bytes: 8 GB for a 32 000-way LM head.
Past `MAX_DENSE_DIM` (16384) a `GramAccumulator` keeps instead the sketch Y = A Omega of
its Gram matrix A = sum x x^T against a fixed random orthonormal d x k test
matrix Omega (k = `SKETCH_RANK`), plus A's trace: d x k numbers, updated linearly
(so sums over batches and processes stay exact). The approximation is the
Nyström one (Tropp, Yurtsever, Udell and Cevher, "Fixed-rank approximation of a
positive-semidefinite matrix from streaming data", NeurIPS 2017, Algorithm 3):
A ~ U diag(lambda) U^T with k orthonormal columns U, exact when A has rank <= k,
plus a floor: the trace that the k directions miss, spread evenly over the rest
of the space, so that the approximation keeps A's trace. It is held as a
`LowRankPSD`, which multiplies (``@`` on either side), takes square roots and
inverse square roots, and lists its eigenpairs without ever forming the d x d
matrix.

Example::

    sketch = NystromSketch(32000, rank=256)
    sketch.update(rows)                # rows: (n, 32000) float64
    h = sketch.matrix(damping=0.01)    # LowRankPSD
    hw = h @ w                         # (32000, in) without a 32000 x 32000 matrix
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MAX_DENSE_DIM = 16384  # largest dense Gram matrix kept: 16384^2 float64 = 2 GiB
SKETCH_RANK = 256


@dataclass(frozen=True)
class LowRankPSD:
    """U diag(values) U^T + floor * (I - U U^T): a symmetric positive semi-definite d x d matrix.

    ``basis`` is d x k with orthonormal columns, ``values`` (k,) descending, ``floor`` >= 0.
    """

    basis: torch.Tensor
    values: torch.Tensor
    floor: float

    @property
    def shape(self) -> tuple[int, int]:
        return (self.basis.shape[0], self.basis.shape[0])

    @property
    def dtype(self) -> torch.dtype:
        return self.basis.dtype

    def power(self, exponent: float) -> "LowRankPSD":
        """The matrix to a real power; eigenvalues below 1e-12 of the largest are raised to that first."""
        largest = max(float(self.values.max()) if self.values.numel() else 0.0, self.floor, 1e-300)
        tiny = largest * 1e-12
        return LowRankPSD(self.basis, self.values.clamp_min(tiny) ** exponent, max(self.floor, tiny) ** exponent)

    def to(self, dtype: torch.dtype) -> "LowRankPSD":
        return LowRankPSD(self.basis.to(dtype), self.values.to(dtype), self.floor)

    def __matmul__(self, other: torch.Tensor) -> torch.Tensor:
        basis = self.basis.to(other.dtype)
        return basis @ ((self.values.to(other.dtype) - self.floor)[:, None] * (basis.T @ other)) + self.floor * other

    def __rmatmul__(self, other: torch.Tensor) -> torch.Tensor:
        return (self @ other.T).T

    def dense(self) -> torch.Tensor:
        """The d x d matrix (only for tests and small d)."""
        return self @ torch.eye(self.shape[0], dtype=self.basis.dtype)

    def eigenpairs(self, count: int) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(top ``count`` eigenvalues descending, their d x count eigenvectors, the eigenvalue of every other direction)."""
        count = min(count, len(self.values))
        return self.values[:count], self.basis[:, :count], self.floor if count == len(self.values) else float(self.values[count:].mean())


class NystromSketch:
    """Streaming sketch of A = sum_i x_i x_i^T (d x d) in d x k numbers plus its trace (see the module doc)."""

    def __init__(self, dim: int, rank: int = SKETCH_RANK, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.rank = min(rank, dim)
        self.test_matrix, _ = torch.linalg.qr(torch.randn(dim, self.rank, generator=generator, dtype=torch.float64))
        self.sketch = torch.zeros(dim, self.rank, dtype=torch.float64)
        self.trace = torch.zeros((), dtype=torch.float64)

    def to(self, device: torch.device | str) -> "NystromSketch":
        """The sketch's tensors moved to ``device`` (before the first update), in place; returns self."""
        self.test_matrix, self.sketch, self.trace = (t.to(device) for t in (self.test_matrix, self.sketch, self.trace))
        return self

    def update(self, rows: torch.Tensor) -> None:
        """Add rows x_i (n x d): Y += X^T (X Omega), trace += ||X||_F^2."""
        rows = rows.to(torch.float64)
        self.sketch.addmm_(rows.T, rows @ self.test_matrix)
        self.trace += rows.pow(2).sum()

    def matrix(self, scale: float = 1.0, damping: float = 0.0) -> LowRankPSD:
        """The Nyström approximation of ``scale`` * A, with ``damping`` x (mean eigenvalue) added to every eigenvalue."""
        y, omega = self.sketch * scale, self.test_matrix
        dim = y.shape[0]
        shift = torch.finfo(torch.float64).eps * max(float(torch.linalg.matrix_norm(y)), 1e-300)
        y_shifted = y + shift * omega
        core = omega.T @ y_shifted
        lower = torch.linalg.cholesky((core + core.T) / 2)
        spread = torch.linalg.solve_triangular(lower, y_shifted.T, upper=False).T  # Y_nu L^-T
        basis, singular, _ = torch.linalg.svd(spread, full_matrices=False)
        values = (singular**2 - shift).clamp_min(0.0)
        trace = float(self.trace) * scale
        rest = dim - len(values)
        floor = max(trace - float(values.sum()), 0.0) / rest if rest > 0 else 0.0
        ridge = damping * trace / dim
        return LowRankPSD(basis, values + ridge, floor + ridge)
