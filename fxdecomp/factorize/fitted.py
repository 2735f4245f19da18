"""Factors fitted to calibration data: the output error ||H^(1/2) (W - W_hat) G^(1/2)|| of structured convs.

A conv's weight, lowered to the T x (C*k) matrix W of the im2col convolution, costs
tr(dW G dW^T H) on the calibration data (G: the Gram matrix of the unfolded input
patches, `fxdecomp.calibration.GramAccumulator`; H: the output-side Gram matrix, or the
identity). `spatial_svd` and `tucker2` both start with a layer that maps the C "channels"
of the patch (input channels for Tucker-2; input channel x first kernel axis for the
spatial split) to r channels, k taps each untouched, and end with a layer that sees
only those r*k numbers:

    W_hat = B (A (x) I_k),    A: r x C,   B: T x (r*k)

For a fixed first layer A, the best B is a weighted least-squares fit with a closed
form (B = W G P (P^T G P)^-1, P = A^T (x) I_k), and the best rank-r_out B (Tucker-2's
output factor and core) is the two-sided whitened SVD of that fit (Eckart-Young in the
metric of P^T G P and H). `projected_fit` computes both for every r at once: with the
nested orthonormal basis Q whose first r columns span A^T for every r, and the Cholesky
factor L of (Q (x) I)^T G (Q (x) I), the error at r is a cumulative sum over the columns of
Y = H^(1/2) W (Q (x) I) L, and the fit is Y[:, :r*k] L_r^-1 (see `ProjectedFit`).

The basis Q itself comes from the Kronecker-factored approximation G ~ G_c (x) G_k
(partial traces of G over the taps and over the channels, as K-FAC factors a Gram
matrix): under it the best input subspace is G_c^(-1/2) times the leading left singular
vectors of G_c^(1/2) W_(C) (H^(1/2) (x) G_k^(1/2)) (the whitened SVD of the mode-C
unfolding), which is exact for 1x1 kernels (k = 1). Sources: the data-driven low-rank
approximations of Zhang, Zou, He and Sun, "Accelerating Very Deep Convolutional Networks
for Classification and Detection" (TPAMI 2015: W_hat fitted to the layer's responses, a
generalised SVD) and of ASVD / SVD-LLM (whitening by the input Gram matrix), applied to
the structures of Jaderberg et al. 2014 / Tai et al. 2016 (spatial split) and Kim et al.
2016 (Tucker-2); `fxdecomp.factorize.fitted_cp` does the same for Lebedev et al.'s CP (ICLR 2015).

At full rank (r = C, r_out = T) the fit is exact: P is invertible and B = W (Q (x) I).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import InvalidInputError
from .svd import Spectrum

# Multiply-adds of one rotation of the Gram matrix above which it runs in float32 (2x faster).
_FLOAT32_WORK = 2**30
# Width (C*k) above which the kept Cholesky factor is stored in float32.
_FLOAT32_CHOL = 2048


def psd_power(matrix: torch.Tensor, *exponents: float) -> torch.Tensor | list[torch.Tensor]:
    """A symmetric positive semi-definite matrix to real powers, from one eigh (eigenvalues below 1e-12 of the largest raised first).

    One exponent gives one matrix, several a list.
    """
    values, vectors = torch.linalg.eigh(matrix.to(torch.float64))
    values = values.clamp_min(max(float(values.max()), 1e-300) * 1e-12)
    powers = [(vectors * values**e) @ vectors.T for e in exponents]
    return powers[0] if len(powers) == 1 else powers


def mode_grams(gram: torch.Tensor, dims: tuple[int, ...]) -> list[torch.Tensor]:
    """Partial traces of a Gram matrix over a patch of ``dims`` (C order): one dims[i] x dims[i] matrix per mode.

    They are the Kronecker factors G ~ G_0 (x) G_1 (x) ... up to scale (each factor the
    sum of G's blocks over the other modes' diagonal), as K-FAC approximates a Gram matrix.
    """
    n = len(dims)
    tensor = gram.to(torch.float64).reshape(*dims, *dims)
    factors = []
    for mode in range(n):
        # Move mode to the front on both sides, then trace over the rest.
        order = [mode] + [i for i in range(n) if i != mode]
        rest = gram.shape[0] // dims[mode]
        t = tensor.permute(*order, *[n + i for i in order]).reshape(dims[mode], rest, dims[mode], rest)
        factors.append(torch.einsum("arbr->ab", t))
    return factors


@dataclass(frozen=True, eq=False)
class ProjectedFit:
    """The output-error-optimal W_hat = B (A (x) I_k) of a T x (C*k) matrix, for every r (see the module doc).

    ``basis`` Q (C x C, orthonormal; A = Q[:, :r]^T), ``chol`` L (lower, C*k square), ``fitted``
    W (Q (x) I) L (T x C*k) and ``whitened`` H^(1/2) times it (the same without H); errors are
    relative to ||H^(1/2) W G^(1/2)||_F.
    """

    basis: torch.Tensor
    chol: torch.Tensor
    fitted: torch.Tensor
    whitened: torch.Tensor
    out_inv_sqrt: torch.Tensor | None
    taps: int
    kept: torch.Tensor  # kept[r - 1]: ||Y[:, :r*k]||^2
    in_spectrum: Spectrum  # the whitened mode-C spectrum that chose the basis (for rank rules)
    _spectra: dict = field(default_factory=dict)

    @property
    def total(self) -> float:
        return float(self.kept[-1]) if len(self.kept) else 0.0

    @property
    def channels(self) -> int:
        return self.basis.shape[0]

    def out_energies(self, r_in: int) -> torch.Tensor:
        """Descending eigenvalues of Y_r Y_r^T (Y_r: the first r_in*k columns of the whitened fit)."""
        if r_in not in self._spectra:
            y = self.whitened[:, : r_in * self.taps]
            small = y.T @ y if y.shape[1] < y.shape[0] else y @ y.T
            self._spectra[r_in] = torch.linalg.eigvalsh(small).flip(0).clamp_min(0.0)
        return self._spectra[r_in]

    def out_spectrum(self) -> Spectrum:
        """The spectrum of the whole whitened weight on the output side (for rank rules)."""
        y = self.whitened
        return Spectrum(self.out_energies(self.channels), y @ y.T, "left", tuple(y.shape))

    def relative_error(self, r_in: int, r_out: int | None = None) -> float:
        """Relative output error at ``r_in`` channels after the first layer and ``r_out`` after the middle one (None: all)."""
        total = self.total
        if total <= 0.0:
            return 0.0
        if r_out is None or r_out >= min(self.whitened.shape[0], r_in * self.taps):
            kept = float(self.kept[r_in - 1])
        else:
            kept = float(self.out_energies(r_in)[:r_out].sum())
        return max(total - kept, 0.0) ** 0.5 / total**0.5

    def factors(self, r_in: int, r_out: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(A (r_in x C), B (T x r_in*k) or the core (r_out x r_in*k), the output factor (T x r_out) or None), float64."""
        m = r_in * self.taps
        chol = self.chol[:m, :m].to(torch.float64)
        first = self.basis[:, :r_in].T.contiguous()
        if r_out is None:
            # B L_m = W (Q (x) I) L[:, :m]  (the weighted least-squares fit, see the module doc)
            return first, torch.linalg.solve_triangular(chol.T, self.fitted[:, :m].T, upper=True).T, None
        # The best rank-r_out B in the metric of H and P^T G P: H^(-1/2) U U^T H^(1/2) B, U the top of Y_m.
        y = self.whitened[:, :m]
        _, vectors = torch.linalg.eigh(y @ y.T)
        top = vectors.flip(1)[:, :r_out]
        whitened_fit = torch.linalg.solve_triangular(chol.T, y.T, upper=True).T  # H^(1/2) B
        core = top.T @ whitened_fit
        last = top if self.out_inv_sqrt is None else self.out_inv_sqrt @ top
        return first, core, last


def _cholesky(matrix: torch.Tensor) -> torch.Tensor:
    """Cholesky factor of a symmetric positive semi-definite matrix, with a growing ridge if it is singular."""
    scale = float(matrix.diagonal().mean()) if matrix.numel() else 1.0
    chol, info = torch.linalg.cholesky_ex(matrix)
    ridge = 1e-12 * max(scale, 1e-300)
    for _ in range(8):
        if int(info) == 0:
            return chol
        chol, info = torch.linalg.cholesky_ex(matrix + ridge * torch.eye(len(matrix), dtype=matrix.dtype))
        ridge *= 100.0
    if int(info) == 0:
        return chol
    raise InvalidInputError(
        "the calibration Gram matrix is not positive definite even with a ridge (non-finite activations?); "
        "check the calibration batches, or exclude this layer"
    )


def projected_fit(
    weight: torch.Tensor, gram: torch.Tensor, output_weight: tuple[torch.Tensor, torch.Tensor] | None, channels: int
) -> ProjectedFit:
    """`ProjectedFit` of a T x (C*k) matrix ``weight`` (columns channel-major) on inputs with Gram matrix ``gram``.

    ``output_weight`` is (H^(1/2), H^(-1/2)) of an output Gram matrix H, or None. Cost: a few
    (C*k)^2 x C products and one Cholesky of (C*k)^2 (the whitened SVD of `svd` costs T (C*k)^2).
    """
    w = weight.detach().to(torch.float64)
    t_dim, width = w.shape
    c, k = channels, width // channels
    g = gram.to(torch.float64)
    g = (g + g.T) / 2
    sqrt, inv_sqrt = output_weight if output_weight is not None else (None, None)
    hw = w if sqrt is None else (sqrt @ w).to(torch.float64)

    # The basis: the whitened mode-C SVD under G ~ G_c (x) G_k.
    g_c, g_k = mode_grams(g, (c, k))
    g_c_sqrt, g_c_inv_sqrt = psd_power(g_c, 0.5, -0.5)
    hw3 = hw.reshape(t_dim, c, k)
    unfolded = torch.einsum("tck,kl,tdl->cd", hw3, g_k, hw3)  # W_(C) (H (x) G_k) W_(C)^T
    whitened_mode = g_c_sqrt @ unfolded @ g_c_sqrt
    energies, vectors = torch.linalg.eigh((whitened_mode + whitened_mode.T) / 2)
    energies, vectors = energies.flip(0).clamp_min(0.0), vectors.flip(1)
    basis, _ = torch.linalg.qr(g_c_inv_sqrt @ vectors)  # nested: column j spans the first j+1 directions

    # Rotate the inputs: W' = W (Q (x) I), G' = (Q (x) I)^T G (Q (x) I). G' only sets which fit is
    # chosen (B = W' L L_r^-1 is exact at full rank whatever L is), so a large one is rotated in float32.
    w_rot = torch.einsum("tck,ca->tak", w.reshape(t_dim, c, k), basis).reshape(t_dim, width)
    work = torch.float32 if width * width * c > _FLOAT32_WORK else torch.float64
    q = basis.to(work)
    g_rot = (q.T @ g.to(work).reshape(c, k * c * k)).reshape(c, k, c, k)
    # One flat product (a batched one over the c*k leading indices is ~25x slower for large c).
    g_rot = (g_rot.permute(0, 1, 3, 2).reshape(-1, c) @ q).reshape(c, k, k, c).permute(0, 1, 3, 2)
    g_rot = g_rot.reshape(width, width).to(torch.float64)
    chol = _cholesky((g_rot + g_rot.T) / 2)
    if width > _FLOAT32_CHOL:
        # Kept (width^2 numbers) until the rewrite asks for factors: float32 halves it. The fit below is
        # made with this rounded factor itself, so full rank stays exact and errors stay consistent.
        chol = chol.to(torch.float32)
    fitted = w_rot @ chol.to(torch.float64)
    whitened = fitted if sqrt is None else (sqrt @ fitted).to(torch.float64)
    kept = whitened.pow(2).reshape(t_dim, c, k).sum(dim=(0, 2)).cumsum(0)
    in_spectrum = Spectrum.with_basis(energies, vectors, "left", (c, t_dim * k))
    return ProjectedFit(basis, chol, fitted, whitened, inv_sqrt, k, kept, in_spectrum)


@dataclass(frozen=True, eq=False)
class GroupFits:
    """A fitted factorisation of a conv, one `ProjectedFit` per group; ``blocks`` the canonical kernel per group."""

    blocks: list[torch.Tensor]
    fits: list[ProjectedFit]

    @property
    def norms(self) -> list[float]:
        """Per group, ||H^(1/2) W G^(1/2)||: its share of the layer's output error."""
        return [f.total**0.5 for f in self.fits]

    def relative_error(self, r_in: int, r_out: int | None = None) -> float:
        """The layer's relative output error, all groups together."""
        total = sum(f.total for f in self.fits)
        if total <= 0.0:
            return 0.0
        lost = sum((f.relative_error(r_in, r_out) ** 2) * f.total for f in self.fits)
        return (max(lost, 0.0) / total) ** 0.5

    def factors(self, r_in: int, r_out: int | None = None) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        return [f.factors(r_in, r_out) for f in self.fits]

    def reconstruct(self, r_in: int, r_out: int | None = None) -> torch.Tensor:
        """The canonical kernel (T, S/groups, *k), float64, that the factors amount to."""
        out = []
        for block, (first, middle, last) in zip(self.blocks, self.factors(r_in, r_out)):
            fit = middle if last is None else last @ middle
            t, width = fit.shape[0], block[0].numel()
            lowered = torch.einsum("tak,ac->tck", fit.reshape(t, r_in, -1), first).reshape(t, width)
            out.append(lowered.reshape(block.shape))
        return torch.cat(out)
