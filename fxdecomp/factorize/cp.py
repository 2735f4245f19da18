"""CP (CANDECOMP/PARAFAC) decomposition of 4-D convolution kernels.

A kernel ``K`` of shape ``(T, S, kh, kw)`` is approximated by ``R`` rank-one terms,
``K[t, s, i, j] ~= sum_r out[t, r] * inp[s, r] * vertical[i, r] * horizontal[j, r]``,
which turns one convolution into four cheap ones: a 1x1 conv S->R, a depthwise (kh, 1)
conv, a depthwise (1, kw) conv and a 1x1 conv R->T (Lebedev et al., "Speeding-up
Convolutional Neural Networks Using Fine-tuned CP-Decomposition", ICLR 2015).

Example::

    import torch
    from fxdecomp.factorize.cp import cp_conv_kernel

    kernel = torch.randn(64, 32, 3, 3)
    cp = cp_conv_kernel(kernel, rank=16)
    approx = cp.reconstruct()        # (64, 32, 3, 3), equals einsum('tr,sr,ir,jr->tsij', ...)
    print(cp.relative_error)         # ||K - approx||_F / ||K||_F

Why this is hand-written rather than a call to ``tensorly.decomposition.parafac``: parafac
runs plain ALS on the full tensor, building a Khatri-Rao product and an unfolding for
every mode in every sweep; on two CPU cores it needs 15-30 s for a 256x256x3x3 kernel at
rank 128 and runs out of memory on large layers. This module exploits the shape of conv
kernels (two large channel modes, two tiny spatial ones):

* the channel modes are compressed by a Tucker/HOSVD projection taken from the
  eigenvectors of the mode Gram matrices (float64 ``eigh``: much cheaper and steadier than
  an SVD of the unfolding); the projected core also gives the initialisation (a rank-one
  fit of each leading slice);
* ALS runs on the core in the kernel's precision (float32 for float32 and narrower
  kernels) with two large matrix products per sweep (the MTTKRPs of the input and spatial
  modes all derive from one partial contraction), float64 Gram solves with a small ridge,
  the error from Gram matrices instead of a reconstruction, Bro's line-search
  extrapolation and a stop on the relative change of the error;
* when the compression dropped part of the kernel, a few ALS sweeps on the full kernel
  polish the expanded factors.

Memory stays within a few copies of the kernel plus Khatri-Rao products of
``S * kh * kw * R`` entries; nothing of size ``T * S * kh * kw * R`` (or ``T * S * R``) is
formed.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Sequence

import torch

from fxdecomp.errors import InvalidInputError


__all__ = ["CPFactors", "cp_conv_kernel", "max_cp_rank"]

# Lossy compression only pays once a sweep on the full kernel is expensive: above this many
# multiply-adds per MTTKRP (T * S * kh * kw * R; ~5 ms on two cores) the channel modes are
# compressed to this multiple of the rank. A multiple below 2 still compresses square
# layers at rank min(T, S) / 2; the polishing sweeps on the full kernel recover most of
# what the compression drops.
_LOSSY_WORK = 2**29
_COMPRESSION_MULTIPLE = 1.5
# Maximum number of polishing sweeps on the full kernel after a lossy compression.
_REFINE_SWEEPS = 20
# Ridge added to the Gram systems, relative to their mean diagonal.
_RIDGE = 1e-7
# Plain sweeps before the line-search extrapolation starts.
_EXTRAPOLATION_WARMUP = 3


@dataclass(frozen=True, eq=False)
class CPFactors:
    """A rank-R CP decomposition of a (T, S, kh, kw) kernel, weights folded into the factors.

    ``out`` is (T, R), ``inp`` (S, R), ``vertical`` (kh, R), ``horizontal`` (kw, R); the
    column norms of each rank-one term are equal across the four factors.
    ``relative_error`` is ``||K - reconstruct()||_F / ||K||_F``.
    """

    out: torch.Tensor
    inp: torch.Tensor
    vertical: torch.Tensor
    horizontal: torch.Tensor
    relative_error: float

    @property
    def rank(self) -> int:
        """The number of rank-one terms (columns of every factor)."""
        return int(self.out.shape[1])

    def reconstruct(self) -> torch.Tensor:
        """``einsum('tr,sr,ir,jr->tsij', out, inp, vertical, horizontal)``, shape (T, S, kh, kw)."""
        return _reconstruct((self.out, self.inp, self.vertical, self.horizontal))


def max_cp_rank(shape: Sequence[int]) -> int:
    """A rank at which every tensor of ``shape`` has an exact CP decomposition.

    It is ``prod(shape) // max(shape)``: keep the largest mode dense and put Kronecker
    deltas on the others.
    """
    dims = [int(d) for d in shape]
    if not dims or min(dims) < 1:
        raise InvalidInputError(f"cp: shape {tuple(dims)} needs at least one mode and no empty mode")
    return math.prod(dims) // max(dims)


def cp_conv_kernel(
    kernel: torch.Tensor, rank: int, *, max_iter: int = 200, tol: float = 1e-6, seed: int = 0
) -> CPFactors:
    """CP-decompose a (T, S, kh, kw) conv kernel into ``rank`` rank-one terms.

    At ``rank >= max_cp_rank(kernel.shape)`` the exact decomposition with
    ``max_cp_rank(kernel.shape)`` terms is returned. Otherwise ALS runs for at most
    ``max_iter`` sweeps and stops once the error changes by less than ``tol`` (relative)
    between sweeps. ``seed`` drives the random part of the initialisation through a private
    ``torch.Generator``; the same input and seed give bitwise the same factors on the same
    machine and thread count.

    Factors are float64 for a float64 kernel and float32 otherwise, on the kernel's device.
    Raises InvalidInputError for a kernel that is not a 4-D floating tensor with finite
    values, a rank below 1, a negative ``max_iter`` or ``tol``.
    """
    rank = _check_inputs(kernel, rank, max_iter, tol)
    dtype = torch.float64 if kernel.dtype == torch.float64 else torch.float32
    x = kernel.detach().to(dtype).contiguous()
    if rank >= max_cp_rank(x.shape):
        return _finish(_exact_factors(x), x)

    norm_x2 = float(x.pow(2).sum(dtype=torch.float64))
    if norm_x2 == 0.0:
        return CPFactors(*(x.new_zeros(d, rank) for d in x.shape), relative_error=0.0)

    t_dim, s_dim, kh, kw = x.shape
    # Keeping min(T, S*kh*kw) output directions (and likewise for the input) loses nothing.
    t_keep, s_keep = min(t_dim, s_dim * kh * kw), min(s_dim, t_dim * kh * kw)
    if t_dim * s_dim * kh * kw * rank > _LOSSY_WORK:
        t_keep = min(t_keep, math.ceil(_COMPRESSION_MULTIPLE * rank))
        s_keep = min(s_keep, math.ceil(_COMPRESSION_MULTIPLE * rank))
    u_t = _leading_eigvecs(x.reshape(t_dim, -1), t_keep)
    u_s = _leading_eigvecs(x.transpose(0, 1).reshape(s_dim, -1), s_keep)
    # core = x ×_1 u_t^T ×_2 u_s^T. Even without any loss (keep == dim) the rotation is worth
    # it: in the eigenbasis the leading singular vectors are the first unit vectors.
    core = (u_t.T @ x.reshape(t_dim, -1)).reshape(t_keep, s_dim, kh * kw)
    core = torch.matmul(u_s.T, core).reshape(t_keep, s_keep, kh, kw)
    core_norm2 = float(core.pow(2).sum(dtype=torch.float64))

    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    factors = _slice_init(core, rank, generator)
    factors = _als(core, factors, core_norm2, max_iter, tol)
    factors = [u_t @ factors[0], u_s @ factors[1], factors[2], factors[3]]

    # The compression dropped ||x||^2 - ||core||^2: polish on the full kernel.
    if core_norm2 < norm_x2 * (1.0 - 1e-6) and max_iter > 0:
        factors = _als(x, factors, norm_x2, min(_REFINE_SWEEPS, max_iter), tol)
    return _finish(factors, x)


def _check_inputs(kernel: torch.Tensor, rank: int, max_iter: int, tol: float) -> int:
    if not isinstance(kernel, torch.Tensor):
        raise InvalidInputError(f"cp: kernel must be a torch.Tensor, got {type(kernel).__name__}")
    if kernel.dim() != 4:
        raise InvalidInputError(
            f"cp: kernel must be 4-D (out, in, kh, kw), got shape {tuple(kernel.shape)}"
        )
    if not kernel.is_floating_point():
        raise InvalidInputError(f"cp: kernel must have a floating dtype, got {kernel.dtype}")
    if kernel.numel() == 0:
        raise InvalidInputError(f"cp: kernel has an empty mode, shape {tuple(kernel.shape)}")
    try:
        if isinstance(rank, bool):
            raise TypeError
        rank = operator.index(rank)
    except TypeError:
        raise InvalidInputError(f"cp: rank must be an integer, got {rank!r}") from None
    if rank < 1:
        raise InvalidInputError(f"cp: rank must be >= 1, got {rank}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, int) or max_iter < 0:
        raise InvalidInputError(f"cp: max_iter must be an integer >= 0, got {max_iter!r}")
    if not (isinstance(tol, (int, float)) and tol >= 0.0):
        raise InvalidInputError(f"cp: tol must be a number >= 0, got {tol!r}")
    if not bool(torch.isfinite(kernel).all()):
        raise InvalidInputError("cp: kernel has non-finite values (NaN or inf); fix the weights first")
    return rank


def _leading_eigvecs(unfolded: torch.Tensor, keep: int) -> torch.Tensor:
    """The ``keep`` leading left singular vectors of ``unfolded``, from eigh of its Gram matrix."""
    m = unfolded.double()
    _, vecs = torch.linalg.eigh(m @ m.T)  # ascending eigenvalues
    return vecs[:, -keep:].flip(1).to(unfolded.dtype).contiguous()


def _exact_factors(x: torch.Tensor) -> list[torch.Tensor]:
    """The exact decomposition with prod(shape) // max(shape) terms: largest mode dense, deltas elsewhere."""
    dims = list(x.shape)
    dense_mode = max(range(4), key=lambda m: dims[m])
    others = [m for m in range(4) if m != dense_mode]
    rank = math.prod(dims[m] for m in others)
    factors: list[torch.Tensor] = [x.new_zeros(0)] * 4
    # Column r of the dense factor is the fibre at multi-index r (C order) of the other modes.
    factors[dense_mode] = x.permute(dense_mode, *others).reshape(dims[dense_mode], rank)
    column = torch.arange(rank, device=x.device).reshape([dims[m] for m in others])
    for pos, m in enumerate(others):
        cols = column.movedim(pos, 0).reshape(dims[m], -1)  # cols[k]: the columns whose index is k
        rows = torch.arange(dims[m], device=x.device)[:, None].expand_as(cols)
        delta = x.new_zeros(dims[m], rank)
        delta[rows, cols] = 1.0
        factors[m] = delta
    return factors


def _rank1_fits(y: torch.Tensor, sweeps: int = 5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batched rank-one fits ``y[n] ~ b[n] ∘ c[n] ∘ d[n]`` of y (N, S, I, J); b and c unit norm."""
    n, s_dim, i_dim, j_dim = y.shape
    # Start from the SVD of the (S, I*J) matricisation, then a few power sweeps (HOPM).
    u, _, vh = torch.linalg.svd(y.reshape(n, s_dim, i_dim * j_dim), full_matrices=False)
    b = u[:, :, 0]
    u2, _, vh2 = torch.linalg.svd(vh[:, 0, :].reshape(n, i_dim, j_dim), full_matrices=False)
    c, d = u2[:, :, 0], vh2[:, 0, :]
    for _ in range(sweeps):
        b = torch.einsum("nsij,ni,nj->ns", y, c, d)
        b = b / b.norm(dim=1, keepdim=True).clamp_min(1e-300)
        c = torch.einsum("nsij,ns,nj->ni", y, b, d)
        c = c / c.norm(dim=1, keepdim=True).clamp_min(1e-300)
        d = torch.einsum("nsij,ns,ni->nj", y, b, c)
    return b, c, d


def _slice_init(core: torch.Tensor, rank: int, generator: torch.Generator) -> list[torch.Tensor]:
    """Initial factors in the core's coordinates.

    In the HOSVD basis the core's slice ``core[r]`` is the r-th right singular vector of the
    (T, S*kh*kw) unfolding times its singular value; term r starts as the unit vector e_r on
    the output mode times a rank-one fit of that slice. Terms beyond T use the slices along
    the input mode the same way, and any further terms are random.
    """
    t_dim, s_dim, i_dim, j_dim = core.shape
    dt = core.dtype
    a, b, c, d = (core.new_zeros(dim, rank) for dim in core.shape)
    k = min(rank, t_dim)
    bb, cc, dd = _rank1_fits(core[:k].double())
    a[:k, :k] = torch.eye(k, dtype=dt, device=core.device)
    b[:, :k], c[:, :k], d[:, :k] = bb.T.to(dt), cc.T.to(dt), dd.T.to(dt)
    done = k
    if done < rank:
        k = min(rank - done, s_dim)
        aa, cc, dd = _rank1_fits(core[:, :k].transpose(0, 1).double())
        a[:, done : done + k] = aa.T.to(dt)
        b[:k, done : done + k] = torch.eye(k, dtype=dt, device=core.device)
        c[:, done : done + k], d[:, done : done + k] = cc.T.to(dt), dd.T.to(dt)
        done += k
    if done < rank:
        for f in (a, b, c, d):
            extra = torch.randn(f.shape[0], rank - done, generator=generator, dtype=torch.float64)
            f[:, done:] = (extra / extra.norm(dim=0, keepdim=True)).to(dt)
    return [a, b, c, d]


def _gram(f: torch.Tensor) -> torch.Tensor:
    """f^T f in float64 (the product itself runs in f's dtype: accurate enough and 2x faster)."""
    return (f.T @ f).double()


def _solve(mttkrp: torch.Tensor, gram: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """The least-squares update ``mttkrp @ gram^-1`` (gram is SPD up to a small ridge)."""
    g = gram.clone()
    ridge = _RIDGE * (float(g.diagonal().mean()) or 1.0)
    for _ in range(6):
        g.diagonal().add_(ridge)
        chol, info = torch.linalg.cholesky_ex(g)
        if int(info) == 0:
            if mttkrp.shape[0] > gram.shape[0]:
                # Many rows: one float64 inverse, then a product in the working precision
                # (rounding the inverse costs no more accuracy than the rounding already in
                # mttkrp) beats two float64 triangular solves.
                return mttkrp @ torch.cholesky_inverse(chol).to(out_dtype)
            return torch.cholesky_solve(mttkrp.double().T, chol).T.to(out_dtype).contiguous()
        ridge *= 100.0
    return torch.linalg.lstsq(gram, mttkrp.double().T).solution.T.to(out_dtype).contiguous()


def _khatri_rao3(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """The Khatri-Rao product with rows in C order: kr[(i, j, k), r] = a[i, r] b[j, r] c[k, r]."""
    bc = (b[:, None, :] * c[None, :, :]).reshape(-1, b.shape[1])
    return (a[:, None, :] * bc[None, :, :]).reshape(-1, a.shape[1])


def _reconstruct(factors: Sequence[torch.Tensor]) -> torch.Tensor:
    """out @ khatri_rao(inp, vertical, horizontal)^T: no intermediate beyond S*kh*kw*R entries."""
    a, b, c, d = factors
    return (a @ _khatri_rao3(b, c, d).T).reshape(a.shape[0], b.shape[0], c.shape[0], d.shape[0])


def _als(
    x: torch.Tensor, factors: Sequence[torch.Tensor], norm_x2: float, max_iter: int, tol: float
) -> list[torch.Tensor]:
    """CP-ALS with line-search extrapolation on a 4-D tensor x of squared norm ``norm_x2``.

    A sweep costs two large matrix products with the (T, S*kh*kw) unfolding x1: the
    output-mode MTTKRP ``x1 @ khatri_rao(b, c, d)`` and ``w = a^T x1``, from which the
    MTTKRPs of the input and both spatial modes follow by small contractions.
    """
    t_dim, s_dim, kh, kw = x.shape
    dtype = x.dtype
    x1 = x.reshape(t_dim, -1)  # columns (s, i, j)
    a, b, c, d = (f.to(dtype).contiguous() for f in factors)
    grams = [_gram(a), _gram(b), _gram(c), _gram(d)]

    def rel_err(inner: float, g: list[torch.Tensor]) -> float:
        # ||x - x_hat||^2 = ||x||^2 - 2 <x, x_hat> + ||x_hat||^2, the last from the Grams.
        fit2 = float((g[0] * g[1] * g[2] * g[3]).sum())
        return math.sqrt(max(norm_x2 - 2.0 * inner + fit2, 0.0) / norm_x2)

    err = math.inf
    pending = None  # (factors, grams, error) of the last ALS point while trying an extrapolation
    acc_pow, fails = 3.0, 0
    for it in range(max_iter):
        m_a = x1 @ _khatri_rao3(b, c, d)
        if pending is not None:
            # The extrapolated point's error comes almost free from its first MTTKRP.
            ext_err = rel_err(float((m_a * a).sum(dtype=torch.float64)), grams)
            if ext_err < pending[2]:
                err, fails = ext_err, 0
            else:
                (a, b, c, d), grams, err = pending
                m_a = x1 @ _khatri_rao3(b, c, d)
                fails += 1
                if fails >= 2:  # extrapolating too far: shorten the steps from now on
                    acc_pow, fails = acc_pow + 1.0, 0
            pending = None
        start = (a, b, c, d)

        a = _solve(m_a, grams[1] * grams[2] * grams[3], dtype)
        grams[0] = _gram(a)
        w = (a.T @ x1).reshape(-1, s_dim, kh * kw)  # (R, S, kh*kw)
        cd = (c[:, None, :] * d[None, :, :]).reshape(kh * kw, -1)  # (kh*kw, R)
        m_b = torch.bmm(w, cd.T.unsqueeze(2)).squeeze(2).T
        b = _solve(m_b, grams[0] * grams[2] * grams[3], dtype)
        grams[1] = _gram(b)
        v = torch.bmm(b.T.unsqueeze(1), w).reshape(-1, kh, kw)  # (R, kh, kw)
        c = _solve(torch.einsum("rij,jr->ir", v, d), grams[0] * grams[1] * grams[3], dtype)
        grams[2] = _gram(c)
        m_d = torch.einsum("rij,ir->jr", v, c)
        d = _solve(m_d, grams[0] * grams[1] * grams[2], dtype)
        grams[3] = _gram(d)
        new_err = rel_err(float((m_d * d).sum(dtype=torch.float64)), grams)

        converged = math.isfinite(err) and abs(err - new_err) <= tol * err
        err = new_err
        if converged or err == 0.0 or it == max_iter - 1:
            break
        if it + 1 >= _EXTRAPOLATION_WARMUP:
            # Bro's extrapolation: jump along the last update; kept only if the error drops.
            pending = ((a, b, c, d), list(grams), err)
            step = (it + 1) ** (1.0 / acc_pow)
            a, b, c, d = (old + step * (new - old) for old, new in zip(start, (a, b, c, d)))
            grams = [_gram(a), _gram(b), _gram(c), _gram(d)]
    if pending is not None:
        (a, b, c, d), grams, err = pending
    return [a, b, c, d]


def _balance(factors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Rescale each term so its four columns have the same norm (the product is unchanged)."""
    norms = torch.stack([f.double().norm(dim=0) for f in factors])  # (4, R)
    target = norms.prod(dim=0).pow(0.25)
    out = []
    for f, n in zip(factors, norms):
        scale = torch.where(n > 0, target / n.clamp_min(1e-300), torch.zeros_like(n))
        out.append((f.double() * scale).to(f.dtype))
    return out


def _finish(factors: Sequence[torch.Tensor], x: torch.Tensor) -> CPFactors:
    """Balance the columns and measure the exact relative error against ``x``."""
    factors = [f.to(x.dtype).contiguous() for f in _balance(factors)]
    residual = x.double() - _reconstruct(factors).double()
    err = float(residual.norm() / x.double().norm()) if bool(x.any()) else 0.0
    return CPFactors(*factors, relative_error=err)
