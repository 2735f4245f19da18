"""Activation statistics for data-aware decomposition: the Gram matrix of each layer's inputs.

For a Linear layer the Gram matrix is sum x x^T over its input vectors; for a
Conv2d it is the same over the unfolded input patches (im2col columns, after the
layer's own padding), one matrix per group. With G the Gram matrix, a weight
error dW costs ||dW X||^2 = tr(dW G dW^T) on the layer's outputs, so:

- `whitened_spectrum`: the SVD that minimises the output error (not the weight
  error) is the projection onto the leading eigenvectors of W G W^T; its
  truncation error *is* the relative output error on the calibration data.
- `OutputErrorMeter`: the relative output error of any dense reconstruction,
  from a low-rank sketch of G (exact when the sketch keeps every eigenvalue).

Output-aware calibration adds, per layer, the Gram matrix H of random
projections of the gradient that reaches the layer's outputs from the model's
outputs (`OutputGramAccumulator`, Hutchinson-style probes: E[g g^T] = J^T J).
To first order a weight error dW then changes the model's outputs by
tr(dW G dW^T H) (a Kronecker-factored, K-FAC-like approximation), so errors of
different layers are in the same unit and add up; the two-sided whitened SVD
(the SVD of H^(1/2) W G^(1/2), see `output_whitening` and `fxdecomp.decomposers.svd`)
minimises exactly that.

Memory is one d x d float64 matrix per layer (d = in_features or S*kh*kw/groups),
plus one out x out for the output side, whatever the number of batches; no
activation is stored. Past `fxdecomp.sketch.MAX_DENSE_DIM` (16384) a Gram matrix
is kept as a Nyström sketch of rank 256 instead (d x 256 numbers), whose
`matrix` is a `fxdecomp.sketch.LowRankPSD` that every function here accepts.

Example::

    gram = GramAccumulator.for_spec(spec)
    for x in layer_inputs: gram.update(x)
    spectrum = whitened_spectrum(weight_matrix, gram.matrix(0))
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .factorize.svd import Spectrum, spectrum_of_gram
from .layer_spec import ConvSpec, LinearSpec, pad_input
from .sketch import MAX_DENSE_DIM, LowRankPSD, NystromSketch

# Relative ridge added to a Gram matrix (times its mean diagonal): keeps a
# rank-deficient Gram (fewer samples than dimensions) from fitting the
# calibration batches only, as GPTQ's 1 % dampening does.
DAMPING = 0.01


class GramAccumulator:
    """Running float64 Gram matrices of one layer's inputs (one per group), averaged per input row."""

    def __init__(self, spec: ConvSpec | LinearSpec, max_dense_dim: int | None = None):
        self.spec = spec
        self.groups, dim = self._layout(spec)
        limit = MAX_DENSE_DIM if max_dense_dim is None else max_dense_dim
        # Past the limit: a sketch per group (see fxdecomp.sketch), never a dense dim x dim matrix.
        self.sketches = [NystromSketch(dim, seed=g) for g in range(self.groups)] if dim > limit else None
        self.sum = None if self.sketches else torch.zeros(self.groups, dim, dim, dtype=torch.float64)
        self.count = 0
        # For shrinkage (`ledoit_wolf_shrinkage`): per group, the sum over sampling units (one image,
        # one sequence, one row of a 2-d input) of ||C_u||_F^2, C_u = the unit's own X_u^T X_u.
        self.unit_squares = torch.zeros(self.groups, dtype=torch.float64)
        self.units = 0
        self.shrinkage: float | str = 0.0  # 0: none; "auto": Ledoit-Wolf over the units; a float in [0, 1]: fixed

    def _add(self, group: int, block: torch.Tensor, units: int = 0) -> None:
        """Add rows (n, dim) of one group, ``units`` equal-sized sampling units of n / units rows each (0: none)."""
        if self.sketches is not None:
            self.sketches[group].update(block)
            return
        if units <= 0:
            self.sum[group].addmm_(block.T, block)
            return
        per_unit = block.reshape(units, -1, block.shape[-1])  # (U, P, d)
        if per_unit.shape[1] >= per_unit.shape[2]:  # d x d per unit: the sum comes for free
            grams = torch.bmm(per_unit.transpose(1, 2), per_unit)
            self.sum[group].add_(grams.sum(0))
        else:  # ||X^T X||_F = ||X X^T||_F: the P x P side is the smaller one
            self.sum[group].addmm_(block.T, block)
            grams = torch.bmm(per_unit, per_unit.transpose(1, 2))
        self.unit_squares[group] += grams.pow(2).sum()

    @staticmethod
    def _layout(spec: ConvSpec | LinearSpec) -> tuple[int, int]:
        if isinstance(spec, LinearSpec):
            return 1, spec.in_features
        return spec.groups, spec.in_per_group * spec.kernel_area

    @classmethod
    def for_spec(cls, spec: ConvSpec | LinearSpec) -> "GramAccumulator":
        return cls(spec)

    def to(self, device: torch.device | str) -> "GramAccumulator":
        """The running sums moved to ``device`` (where the layer's inputs are, e.g. a GPU), in place; returns self."""
        if self.sketches is not None:
            self.sketches = [sketch.to(device) for sketch in self.sketches]
        else:
            self.sum = self.sum.to(device)
        self.unit_squares = self.unit_squares.to(device)
        return self

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Add a batch of the layer's inputs (any batch size; an empty one, a detector's head given no detections, adds nothing)."""
        if x.numel() == 0:
            return
        rows = self._rows(x.detach())
        units = _units(x) if self.shrinkage == "auto" else 0  # per-unit statistics cost a product: only when used
        for g in range(self.groups):
            self._add(g, rows[g].to(torch.float64), units)
        self.count += rows.shape[1]
        self._count_units(units)

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        """(groups, samples, dim) input rows."""
        spec = self.spec
        # Sizes spelt out, not -1: an empty batch (a detector head given no detections) is zero rows, not an error.
        if isinstance(spec, LinearSpec):
            return x.reshape(1, x.numel() // spec.in_features, spec.in_features)
        patches = F.unfold(pad_input(x, spec.pads, spec.padding_mode), spec.kernel_size, spec.dilation, 0, spec.stride)
        n, width, positions = patches.shape  # (N, S*kh*kw, L), channel-major: group g is a contiguous slice
        per_group = width // self.groups
        patches = patches.reshape(n, self.groups, per_group, positions).permute(1, 0, 3, 2)
        return patches.reshape(self.groups, n * positions, per_group)

    def _count_units(self, units: int) -> None:
        # One update without units (a 1-d input) leaves the unit statistics incomplete: none then.
        self.units = self.units + units if units > 0 and self.units >= 0 else -1

    def shrinkage_intensity(self, group: int = 0) -> float:
        """The weight a in [0, 1] of the scaled identity in the shrunk Gram matrix (see ``shrinkage``).

        "auto": the Ledoit-Wolf intensity with the sampling units (images, sequences) as
        the samples, `ledoit_wolf_shrinkage`; 0 for a sketched Gram or without unit statistics.
        """
        if isinstance(self.shrinkage, str):
            if self.shrinkage != "auto":
                raise ValueError(f"shrinkage must be 'auto' or a float in [0, 1], got {self.shrinkage!r}")
            if self.sketches is not None or self.units < 2:
                return 0.0
            return ledoit_wolf_shrinkage(self.sum[group], float(self.unit_squares[group]), self.units)
        return float(self.shrinkage)

    def matrix(self, group: int = 0, damping: float = DAMPING) -> torch.Tensor | LowRankPSD:
        """The group's mean Gram matrix, shrunk (``shrinkage``) and damped (see DAMPING); a `LowRankPSD` past the dense limit.

        Shrinkage: (1 - a) G + a tr(G)/d I, toward the weight-only limit (a Gram matrix
        proportional to I makes every whitened error a weight error), trace kept.
        """
        if self.sketches is not None:
            return self.sketches[group].matrix(1.0 / max(self.count, 1), damping)
        gram = self.sum[group] / max(self.count, 1)
        a = self.shrinkage_intensity(group)
        if a > 0 and gram.numel():
            mean = float(gram.diagonal().mean())
            gram.mul_(1 - a).diagonal().add_(a * mean)
        ridge = damping * float(gram.diagonal().mean()) if gram.numel() else 0.0
        gram.diagonal().add_(ridge)  # in place: an 11008-dim Gram is 1 GB, and eye() would add three more
        return gram


class OutputGramAccumulator(GramAccumulator):
    """Running float64 Gram matrices of the gradients reaching one layer's outputs, averaged per probe.

    Each `update` adds one probe's gradient (the layer's output shape) for one call
    of the layer; `end_probe` counts the probes (``count``), so the mean is per
    backward pass (the layer's calls and output positions add up within a probe).
    """

    def __init__(self, spec: ConvSpec | LinearSpec, max_dense_dim: int | None = None):
        super().__init__(spec, max_dense_dim)
        self.updates = 0  # gradients received

    @staticmethod
    def _layout(spec: ConvSpec | LinearSpec) -> tuple[int, int]:
        if isinstance(spec, LinearSpec):
            return 1, spec.out_features
        return spec.groups, spec.out_per_group

    @torch.no_grad()
    def update(self, grad: torch.Tensor) -> None:
        """Add one call's output gradient (without counting a probe: see `end_probe`); an empty one adds nothing."""
        if grad.numel() == 0:
            return
        if isinstance(self.spec, LinearSpec):
            rows = grad.reshape(1, grad.numel() // self.spec.out_features, self.spec.out_features)
        else:  # (N, T, H, W) -> (groups, N*H*W, T/groups)
            out = self.groups * self.spec.out_per_group
            rows = grad.movedim(1, -1).reshape(grad.numel() // out, self.groups, self.spec.out_per_group).transpose(0, 1)
        units = _units(grad) if self.shrinkage == "auto" else 0
        for g in range(self.groups):
            self._add(g, rows[g].to(torch.float64), units)
        self.updates += 1
        self._count_units(units)

    def end_probe(self) -> None:
        self.count += 1


def _units(x: torch.Tensor) -> int:
    """Independent sampling units in a layer's input or output gradient: the batch entries (images,
    sequences) of a batched tensor, the rows of a 2-d one; 0 (no unit statistics) for a 1-d one."""
    if x.dim() < 2 or x.shape[0] == 0:
        return 0
    return x.shape[0]


def ledoit_wolf_shrinkage(total: torch.Tensor, unit_squares: float, units: int) -> float:
    """Ledoit-Wolf shrinkage intensity of a mean of per-unit matrices toward a scaled identity.

    ``total`` is the sum of the units' matrices C_u (d x d), ``unit_squares`` the sum of
    their ||C_u||_F^2, ``units`` their number U. With m = total / U, mu = tr(m) / d:
    a = min(1, b^2 / d^2), b^2 = (sum ||C_u||^2 / U - ||m||^2) / U (the estimated squared
    error of m), d^2 = ||m - mu I||^2 (its distance from the target). This is Ledoit and
    Wolf (2004), "A well-conditioned estimator for large-dimensional covariance matrices",
    Lemma 3.2-3.4 (scikit-learn's `ledoit_wolf_shrinkage` with ``assume_centered=True``), with
    the unit's matrix in place of x x^T: the rows of one image (its patches) or of one
    sequence (its tokens) are not independent, the units roughly are.
    """
    if units < 2:
        return 0.0
    m = total.to(torch.float64) / units
    squared = float(m.pow(2).sum())
    mu = float(m.diagonal().mean())
    distance = squared - m.shape[0] * mu**2
    error = max(unit_squares / units - squared, 0.0) / units
    if distance <= 0.0:
        return 1.0 if error > 0 else 0.0
    return min(1.0, error / distance)


def output_whitening(gram: torch.Tensor | LowRankPSD) -> tuple[torch.Tensor, torch.Tensor]:
    """(H^(1/2), H^(-1/2)) of a damped, symmetric positive definite output Gram matrix H (dense or `LowRankPSD`)."""
    if isinstance(gram, LowRankPSD):
        return gram.power(0.5), gram.power(-0.5)
    values, vectors = torch.linalg.eigh(gram.to(torch.float64))
    values = values.clamp_min(float(values.max()) * 1e-12)
    return (vectors * values.sqrt()) @ vectors.T, (vectors / values.sqrt()) @ vectors.T


def gram_root(gram: torch.Tensor) -> torch.Tensor:
    """A float64 L with L L^T = G: the Cholesky factor of a (damped) Gram matrix, its symmetric root if not definite.

    Cholesky (`torch.linalg.cholesky_ex`) costs d^3 / 3 operations against eigh's ~9 d^3 with
    vectors; any L with L L^T = G serves `whitened_spectrum`.
    """
    gram = gram.to(torch.float64)
    factor, info = torch.linalg.cholesky_ex(gram)
    if int(info) == 0:
        return factor
    values, vectors = torch.linalg.eigh(gram)
    return (vectors * values.clamp_min(0.0).sqrt()) @ vectors.T


def whitened_spectrum(matrix: torch.Tensor, gram: torch.Tensor | LowRankPSD) -> Spectrum:
    """The spectrum of W L (G = L L^T) with its left singular vectors: the whitened SVD's basis.

    Its basis projects W onto the output subspace that matters on the data, so
    `fxdecomp.factorize.svd.low_rank_factors(W, r, spectrum)` gives the whitened
    SVD factors, and ``spectrum.relative_error(r)`` is the relative output error.
    For the two-sided version pass ``H^(1/2) W`` (`output_whitening`) as the matrix
    and multiply the left factor by H^(-1/2).

    A wide or square W (out <= in) is decomposed through the out x out matrix W G W^T.
    A tall one (an LM head, an up-projection) through the in x in matrix L^T W^T W L
    instead, its left vectors recovered as W L V / sigma (then made orthonormal), so the
    cost follows the smaller side (a 32 000-way head: 768^3, not 32 000^3).
    """
    rows, cols = matrix.shape
    # Large float32 matrices (an LLM's projections, its LM head) are multiplied in float32, as
    # `matrix_spectrum` does: twice as fast, half the memory of their rows x cols copies, and
    # float32 rounding only touches energies below ~1e-7 of the largest. Eigendecompositions stay float64.
    work = torch.float32 if matrix.dtype != torch.float64 and rows * cols * min(rows, cols) > 2**28 else torch.float64
    if isinstance(gram, LowRankPSD):
        w = matrix.detach().to(torch.float64)
        return spectrum_of_gram(w @ gram @ w.T, "left", tuple(w.shape))
    if rows <= cols:
        w = matrix.detach().to(work)
        # W G in column chunks: a float32 copy of an 11008-dim Gram would be 0.5 GB more at the peak.
        step = max(1, 2**24 // max(cols, 1))
        product = w.new_empty(rows, cols)
        for i in range(0, cols, step):
            torch.matmul(w, gram[:, i : i + step].to(work), out=product[:, i : i + step])
        return spectrum_of_gram((product @ w.T).to(torch.float64), "left", (rows, cols))
    root = gram_root(gram)  # W G W^T = (W L) (W L)^T for any L L^T = G: same spectrum, same left vectors
    whitened = matrix.detach().to(work) @ root.to(work)
    inner = (whitened.T @ whitened).to(torch.float64)
    del whitened

    def left_basis() -> torch.Tensor:
        """W L V / sigma made orthonormal: computed only when factors are asked for (never by the planner).

        In ``work`` precision: a 32 000 x 4096 LM head's basis is 0.5 GB in float32 (1 GB in float64).
        """
        energies, right = torch.linalg.eigh(inner)
        energies, right = energies.flip(0).clamp_min(0.0), right.flip(1)
        sigma = energies.sqrt().clamp_min(float(energies[0].sqrt()) * 1e-12 if len(energies) else 1e-300)
        basis, triangle = torch.linalg.qr(matrix.detach().to(work) @ (root @ (right / sigma)).to(work))
        signs = torch.sign(torch.diagonal(triangle))  # leading columns: the left singular vectors, signed
        return basis.mul_(signs.where(signs != 0, torch.ones((), dtype=signs.dtype)))

    values = spectrum_of_gram(inner, "right", (rows, cols)).energies
    return Spectrum(values, inner.new_zeros(0, 0), "left", (rows, cols), compute_basis=left_basis)


def output_energy(weight_blocks: list[torch.Tensor], grams: list[torch.Tensor], output_grams: list[torch.Tensor]) -> float:
    """tr(W G W^T H) summed over groups: the layer's output energy as the model's outputs see it."""
    total = 0.0
    for w, gram, out in zip(weight_blocks, grams, output_grams):
        w = w.detach().to(torch.float64)
        total += float(((w @ gram) * (out @ w)).sum())
    return max(total, 0.0)


class OutputErrorMeter:
    """Relative output error tr(dW G dW^T) / tr(W G W^T) of reconstructions of one layer's weight.

    With ``output_sqrt`` (H^(1/2) per group) it is tr(dW G dW^T H) / tr(W G W^T H) instead.

    G is replaced by its top-``sketch`` eigenpairs plus the mean of the rest on
    the remaining directions, so each measurement costs O(out * dim * sketch).
    """

    def __init__(
        self,
        grams: list[torch.Tensor],
        weight_blocks: list[torch.Tensor],
        sketch: int = 128,
        output_sqrt: list[torch.Tensor] | None = None,
    ):
        # With output Gram matrices H, errors are weighted by H^(1/2) on the left: tr(dW G dW^T H).
        # float32 there: it halves the largest product, and energies only need ~6 digits.
        self.output_sqrt = [s.to(torch.float32) for s in output_sqrt] if output_sqrt else None
        self.factors = []
        for gram in grams:
            if isinstance(gram, LowRankPSD):
                top, basis, floor = gram.eigenpairs(sketch)
                self.factors.append((basis * (top.clamp_min(floor) - floor).sqrt(), floor))
                continue
            energies, basis = torch.linalg.eigh(gram)
            keep = min(sketch, len(energies))
            top, rest = energies[-keep:].clamp_min(0.0), energies[:-keep].clamp_min(0.0)
            floor = float(rest.mean()) if len(rest) else 0.0
            self.factors.append((basis[:, -keep:] * (top - floor).sqrt(), floor))
        self.norms = [self._energy(b.to(torch.float64), g) for g, b in enumerate(weight_blocks)]

    def _energy(self, matrix: torch.Tensor, group: int) -> float:
        if self.output_sqrt is not None:
            matrix = (self.output_sqrt[group] @ matrix.to(torch.float32)).to(torch.float64)
        scaled, floor = self.factors[group]
        return float((matrix @ scaled).pow(2).sum() + floor * matrix.pow(2).sum())

    def relative_error(self, weight_blocks: list[torch.Tensor], reconstructed_blocks: list[torch.Tensor]) -> float:
        error = sum(
            self._energy(w.to(torch.float64) - r.to(torch.float64), g)
            for g, (w, r) in enumerate(zip(weight_blocks, reconstructed_blocks))
        )
        total = sum(self.norms)
        return (max(error, 0.0) / total) ** 0.5 if total > 0 else 0.0
