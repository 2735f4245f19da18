"""Tests of fxdecomp.vbmf: EVBMF rank estimation on synthetic low-rank-plus-noise matrices."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fxdecomp.errors import InvalidInputError
from fxdecomp.vbmf import VBMFResult, evbmf, evbmf_singular_values, vbmf_rank

# EVB threshold constant at alpha = L/M = 1 ([1]: the zero of 2 log(1 + t)/t - 1).
TAU_BAR_SQUARE = 2.5129


def synthetic(n_rows: int, n_cols: int, rank: int, sigma: float, seed: int, low: float = 2.0, high: float = 4.0) -> np.ndarray:
    """U diag(s) V^T + sigma * N(0, 1) with orthonormal U, V.

    The signal singular values run from ``high`` down to ``low`` times the noise
    edge sigma (sqrt(L) + sqrt(M)), i.e. clearly above the EVB threshold.
    """
    rng = np.random.default_rng(seed)
    signal = np.zeros((n_rows, n_cols))
    if rank:
        u = np.linalg.qr(rng.standard_normal((n_rows, rank)))[0]
        v = np.linalg.qr(rng.standard_normal((n_cols, rank)))[0]
        edge = sigma * (math.sqrt(n_rows) + math.sqrt(n_cols))
        signal = (u * (edge * np.geomspace(high, low, rank))) @ v.T
    return signal + sigma * rng.standard_normal((n_rows, n_cols))


def tau_bar_reference(alpha: float) -> float:
    """The zero of Xi(tau; alpha) = Phi(tau) + Phi(tau / alpha), Phi(z) = log(1 + z)/z - 1/2 ([1], Theorem 13).

    Solved here by plain bisection, independently of fxdecomp's solver.
    """

    def xi(tau):
        return (math.log1p(tau) / tau - 0.5) + (math.log1p(tau / alpha) / (tau / alpha) - 0.5)

    lo, hi = 1e-9, 100.0  # xi > 0 near 0, < 0 at 100
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if xi(mid) > 0 else (lo, mid)
    return 0.5 * (lo + hi)


def evb_threshold(sigma2: float, n_rows: int, n_cols: int) -> float:
    """The EVB threshold of [1]: gamma = sigma sqrt(M (1 + tau)(1 + alpha / tau)), L <= M, alpha = L / M."""
    small, large = min(n_rows, n_cols), max(n_rows, n_cols)
    alpha = small / large
    tau = tau_bar_reference(alpha)
    return math.sqrt(sigma2 * large * (1 + tau) * (1 + alpha / tau))


def test_reference_tau_bar_is_the_paper_constant_at_alpha_one():
    assert tau_bar_reference(1.0) == pytest.approx(TAU_BAR_SQUARE, abs=1e-4)


@pytest.mark.parametrize("shape", [(512, 4608), (4608, 512), (100, 300), (300, 100), (7, 400), (64, 65)])
def test_threshold_of_non_square_matrices_is_the_formula(shape):
    # The aspect ratio alpha = L / M enters both tau_bar and the (1 + alpha / tau) factor.
    y = np.random.default_rng(sum(shape)).standard_normal(shape)
    for sigma2 in (0.3, 1.0):
        result = evbmf(y, sigma2=sigma2)
        expected = evb_threshold(sigma2, *shape)
        assert result.threshold == pytest.approx(expected, rel=1e-6)
        s = np.array(result.singular_values)
        assert result.rank == max(1, int(np.sum(s > expected)))


@pytest.mark.parametrize("shape", [(512, 4608), (4608, 512)])
def test_recovers_rank_near_the_noise_edge_of_a_wide_matrix(shape):
    # Ten components whose observed singular values sit 1.1 to 1.45 times the EVB threshold: recovered
    # only with the threshold of this aspect ratio (the square-matrix one is ~1.5 times higher here).
    n_rows, n_cols = shape
    small, large = min(shape), max(shape)
    rng = np.random.default_rng(19)
    u = np.linalg.qr(rng.standard_normal((small, 10)))[0]
    v = np.linalg.qr(rng.standard_normal((large, 10)))[0]
    # A spike theta in noise of unit variance shows up at sqrt((theta^2 + M)(theta^2 + L)) / theta
    # (Benaych-Georges and Nadakuditi 2012); place the observed values between 1.15 and 1.45 x the threshold.
    gamma = evb_threshold(1.0, small, large) * np.linspace(1.45, 1.15, 10)
    g2 = gamma**2
    b = g2 - small - large
    theta2 = 0.5 * (b + np.sqrt(b * b - 4 * small * large))
    y = (u * np.sqrt(theta2)) @ v.T + rng.standard_normal((small, large))
    y = y if n_rows == small else y.T
    s = np.linalg.svd(y, compute_uv=False)
    threshold = evb_threshold(1.0, small, large)
    assert s[9] > 1.05 * threshold and s[10] < threshold  # the case is as close to the edge as intended
    assert s[0] < 1.6 * threshold
    result = evbmf(y)
    assert result.sigma2 == pytest.approx(1.0, rel=0.05)
    assert result.rank == 10
    assert vbmf_rank(torch.from_numpy(y).float()) == 10


SHAPES = [(64, 128), (128, 64), (100, 300), (300, 100), (50, 50), (64, 576), (576, 64)]
# Ranks up to a third of the smaller side, where recovery is clear-cut.
CASES = [(shape, rank) for shape in SHAPES for rank in (1, 5, 20) if rank <= min(shape) // 3]


@pytest.mark.parametrize("shape, rank", CASES, ids=[f"{s[0]}x{s[1]}-r{r}" for s, r in CASES])
def test_recovers_true_rank(shape, rank):
    n_rows, n_cols = shape
    sigma = 0.05
    y = synthetic(n_rows, n_cols, rank, sigma, seed=rank * 1000 + n_rows)
    result = evbmf(y)
    assert result.rank == rank
    assert result.sigma2 == pytest.approx(sigma**2, rel=0.25)
    # Float32 torch weights, the production case, give the same rank.
    assert vbmf_rank(torch.from_numpy(y).float()) == rank


def test_recovers_rank_of_wide_conv_unfolding():
    # The mode-1 unfolding shape of a 512 -> 512, 3x3 convolution.
    y = synthetic(512, 4608, 32, 0.01, seed=3)
    assert vbmf_rank(torch.from_numpy(y).float()) == 32
    assert vbmf_rank(torch.from_numpy(y.T.copy()).float()) == 32


def test_result_fields():
    y = synthetic(40, 90, 3, 0.1, seed=1)
    result = evbmf(torch.from_numpy(y))
    assert isinstance(result, VBMFResult)
    assert isinstance(result.rank, int)
    assert isinstance(result.singular_values, tuple) and len(result.singular_values) == 40
    s = np.array(result.singular_values)
    assert np.all(np.diff(s) <= 0)
    expected = torch.linalg.svdvals(torch.from_numpy(y)).numpy()
    np.testing.assert_allclose(s, expected, rtol=0, atol=1e-10 * expected[0])
    # Exactly the singular values above the threshold are kept.
    assert result.rank == int(np.sum(s > result.threshold))
    assert result.threshold > 0.1 * (math.sqrt(40) + math.sqrt(90))  # above the noise edge
    with pytest.raises(AttributeError):
        result.rank = 7  # frozen


@pytest.mark.parametrize("c", [1e-6, 1e-3, 0.7, 1e3, 1e6])
def test_scale_invariance_fixed(c):
    y = synthetic(80, 200, 6, 0.05, seed=11, low=0.9, high=3.0)
    base = evbmf(y)
    scaled = evbmf(c * y)
    assert scaled.rank == base.rank
    assert scaled.sigma2 == pytest.approx(c * c * base.sigma2, rel=1e-6)
    assert scaled.threshold == pytest.approx(c * base.threshold, rel=1e-6)


@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**32 - 1),
    n_rows=st.integers(1, 60),
    n_cols=st.integers(1, 60),
    rank=st.integers(0, 8),
    strength=st.floats(0.3, 4.0),
    log10_c=st.floats(-6.0, 6.0),
)
def test_scale_and_transpose_invariance(seed, n_rows, n_cols, rank, strength, log10_c):
    rank = min(rank, n_rows, n_cols)
    y = synthetic(n_rows, n_cols, rank, 1.0, seed, low=strength, high=strength * 1.5)
    c = 10.0**log10_c
    base = evbmf(y)
    # The rank is the count of singular values above the threshold, clamped to at least 1.
    assert base.rank == max(1, int(np.sum(np.array(base.singular_values) > base.threshold)))

    scaled = evbmf(c * y)
    assert scaled.rank == base.rank
    assert scaled.sigma2 == pytest.approx(c * c * base.sigma2, rel=1e-6)
    assert scaled.threshold == pytest.approx(c * base.threshold, rel=1e-6)

    # Bit-identical unless square (then Y Y^T and Y^T Y round differently).
    transposed = evbmf(y.T)
    assert transposed.rank == base.rank
    assert transposed.sigma2 == pytest.approx(base.sigma2, rel=1e-6)
    assert transposed.threshold == pytest.approx(base.threshold, rel=1e-6)
    assert vbmf_rank(torch.from_numpy(np.ascontiguousarray(y.T))) == base.rank


@pytest.mark.parametrize("shape", [(64, 128), (128, 64), (50, 50), (300, 100), (10, 10), (3, 3), (2, 7)])
def test_pure_noise_gives_small_rank(shape):
    rng = np.random.default_rng(sum(shape))
    for _ in range(3):
        result = evbmf(rng.standard_normal(shape))
        assert result.rank <= 2
    if min(shape) >= 50:
        assert result.sigma2 == pytest.approx(1.0, rel=0.15)


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (7, 1), (1, 500), (500, 1)])
def test_vectors(shape):
    y = np.random.default_rng(0).standard_normal(shape)
    result = evbmf(y)
    assert result.rank == 1
    assert len(result.singular_values) == 1
    assert result.singular_values[0] == pytest.approx(np.linalg.norm(y))
    # With one row the bounds of sigma^2 coincide at |y|^2 / max(L, M).
    assert result.sigma2 == pytest.approx(np.sum(y * y) / max(shape))
    assert math.isfinite(result.threshold)


def test_one_dimensional_torch_row():
    assert vbmf_rank(torch.arange(1.0, 6.0).reshape(1, 5)) == 1


@pytest.mark.parametrize("shape", [(2, 2), (2, 3), (3, 2), (3, 3), (4, 4), (2, 50), (5, 9)])
def test_small_matrices(shape):
    rng = np.random.default_rng(shape[0] * 100 + shape[1])
    for _ in range(5):
        y = rng.standard_normal(shape)
        result = evbmf(y)
        s = np.linalg.svd(y, compute_uv=False)
        assert result.rank == max(1, int(np.sum(s > result.threshold)))
        assert result.sigma2 > 0
        # Given sigma2, the threshold is the formula of [1] at this aspect ratio.
        assert result.threshold == pytest.approx(evb_threshold(result.sigma2, *shape), rel=1e-6)


def test_exact_rank_one():
    rng = np.random.default_rng(4)
    u, v = rng.standard_normal(70), rng.standard_normal(130)
    assert vbmf_rank(np.outer(u, v)) == 1
    assert vbmf_rank(torch.from_numpy(np.outer(v, u)).float()) == 1
    assert vbmf_rank(np.outer(np.arange(1.0, 5.0), np.arange(1.0, 8.0))) == 1


def test_noise_free_low_rank():
    rng = np.random.default_rng(5)
    y = rng.standard_normal((96, 7)) @ rng.standard_normal((7, 160))
    assert vbmf_rank(y) == 7
    assert vbmf_rank(torch.from_numpy(y).float()) == 7


def test_rank_one_plus_noise():
    assert vbmf_rank(synthetic(90, 45, 1, 0.1, seed=8)) == 1


def test_zero_matrix():
    result = evbmf(torch.zeros(4, 6))
    assert result.rank == 1
    assert result.sigma2 == 0.0
    assert result.threshold == 0.0
    assert result.singular_values == (0.0,) * 4


def test_given_sigma2():
    sigma = 0.05
    y = synthetic(120, 120, 5, sigma, seed=9)
    result = evbmf(y, sigma2=sigma**2)
    assert result.rank == 5
    assert result.sigma2 == sigma**2
    # The EVB threshold at alpha = 1: sigma sqrt(M (1 + tau)(1 + 1/tau)), tau = 2.5129.
    tau = TAU_BAR_SQUARE
    assert result.threshold == pytest.approx(sigma * math.sqrt(120 * (1 + tau) * (1 + 1 / tau)), rel=1e-4)
    # A huge noise variance leaves nothing above the threshold; the rank is clamped to 1.
    assert evbmf(y, sigma2=1e6).rank == 1
    # A tiny one keeps everything, never more than min(L, M).
    assert evbmf(y, sigma2=1e-12).rank == 120


def test_input_types():
    y = synthetic(30, 70, 2, 0.1, seed=12)
    expected = vbmf_rank(y)
    assert expected == 2
    assert vbmf_rank(torch.from_numpy(y).requires_grad_()) == expected
    assert vbmf_rank(torch.from_numpy(y).half()) == expected
    assert vbmf_rank(y.astype(np.float32)) == expected
    assert vbmf_rank(y.tolist()) == expected
    assert vbmf_rank(np.asfortranarray(y)) == expected


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_input_raises(bad):
    y = np.ones((5, 8))
    y[2, 3] = bad
    with pytest.raises(InvalidInputError, match="non-finite"):
        evbmf(y)
    with pytest.raises(InvalidInputError, match="non-finite"):
        vbmf_rank(torch.from_numpy(y).float())


@pytest.mark.parametrize(
    "matrix",
    [torch.ones(5), torch.ones(2, 3, 4), np.float64(3.0), np.ones((0, 4)), torch.ones(3, 0)],
    ids=["1d", "3d", "scalar", "empty-rows", "empty-cols"],
)
def test_bad_shape_raises(matrix):
    with pytest.raises(InvalidInputError, match="2-D|empty"):
        evbmf(matrix)


def test_complex_and_non_numeric_raise():
    with pytest.raises(InvalidInputError, match="complex"):
        evbmf(torch.ones(3, 3, dtype=torch.complex64))
    with pytest.raises(InvalidInputError):
        evbmf(np.array([["a", "b"], ["c", "d"]]))


@pytest.mark.parametrize("sigma2", [0.0, -1.0, float("nan"), float("inf"), "x", True])
def test_bad_sigma2_raises(sigma2):
    with pytest.raises(InvalidInputError, match="sigma2"):
        evbmf(np.ones((3, 4)), sigma2=sigma2)


@pytest.mark.parametrize("shape", [(60, 150), (150, 60), (1, 9), (20, 20)])
def test_from_singular_values_matches_matrix(shape):
    y = synthetic(*shape, rank=min(3, min(shape)), sigma=0.1, seed=13)
    direct = evbmf(y)
    s = torch.linalg.svdvals(torch.from_numpy(y))
    for spectrum in (s, s.flip(0).numpy(), list(s.numpy()), torch.cat([s, torch.zeros(max(shape) - min(shape), dtype=s.dtype)])):
        result = evbmf_singular_values(spectrum, shape)
        assert result.rank == direct.rank
        assert result.sigma2 == pytest.approx(direct.sigma2, rel=1e-6)
        assert len(result.singular_values) == min(shape)
    assert evbmf_singular_values(s * 1e-5, shape).rank == direct.rank
    assert evbmf_singular_values(s, shape, sigma2=0.01).rank == evbmf(y, sigma2=0.01).rank
    assert evbmf_singular_values(torch.zeros(min(shape)), shape).rank == 1


@pytest.mark.parametrize(
    "spectrum, shape, words",
    [
        (np.ones(3), (4, 5), "4 to 5"),
        (np.ones(6), (4, 5), "4 to 5"),
        (np.ones((2, 2)), (2, 2), "1-D"),
        (np.array([1.0, float("nan")]), (2, 2), "finite"),
        (np.array([1.0, -1.0]), (2, 2), "non-negative"),
        (np.ones(2), (2, 0), "shape"),
        (np.ones(2), (2,), "shape"),
        (np.ones(2), (2.0, 2), "shape"),
        (["a", "b"], (2, 2), "singular values"),
    ],
)
def test_from_singular_values_bad_input(spectrum, shape, words):
    with pytest.raises(InvalidInputError, match=words):
        evbmf_singular_values(spectrum, shape)


def test_error_is_a_value_error():
    with pytest.raises(ValueError):
        evbmf(torch.ones(4))


def free_energy_reference(sigma2: float, s: np.ndarray, n_rows: int, n_cols: int) -> float:
    """The EVB free energy of [2] as a function of sigma2, up to constants, written from the paper:
    sum_h psi(x_h), x_h = gamma_h^2 / (M sigma2), psi(x) = x - log x + [x > x_bar] psi_1(x),
    psi_1(x) = log(tau + 1) + alpha log(tau / alpha + 1) - tau, tau the larger root of
    tau^2 - (x - 1 - alpha) tau + alpha = 0 (L <= M, alpha = L / M)."""
    small, large = min(n_rows, n_cols), max(n_rows, n_cols)
    alpha = small / large
    t = tau_bar_reference(alpha)
    x_bar = (1 + t) * (1 + alpha / t)
    total = 0.0
    for gamma in s[:small]:
        x = gamma**2 / (large * sigma2)
        total += x - math.log(x)
        if x > x_bar:
            b = x - 1 - alpha
            tau = (b + math.sqrt(b * b - 4 * alpha)) / 2
            total += math.log(tau + 1) + alpha * math.log(tau / alpha + 1) - tau
    return total


@pytest.mark.parametrize("shape, rank, seed", [((40, 120), 6, 1), ((90, 60), 10, 2), ((50, 50), 4, 3)])
def test_estimated_sigma2_minimises_the_free_energy(shape, rank, seed):
    # Components near the threshold, so the psi_1 part of the free energy shapes the minimum.
    y = synthetic(*shape, rank, 1.0, seed, low=0.8, high=1.6)
    s = np.linalg.svd(y, compute_uv=False)
    result = evbmf(y)
    small, large = min(shape), max(shape)
    upper = float(np.sum(s**2)) / (small * large)
    grid = np.exp(np.linspace(math.log(upper / 20), math.log(upper), 4001))
    energies = np.array([free_energy_reference(g, s, *shape) for g in grid])
    best = grid[int(np.argmin(energies))]
    assert result.sigma2 == pytest.approx(best, rel=2e-3)
    assert free_energy_reference(result.sigma2, s, *shape) <= energies.min() + 1e-9 * abs(energies.min())
    assert result.threshold == pytest.approx(evb_threshold(result.sigma2, *shape), rel=1e-9)


def test_from_singular_values_uses_the_given_sigma2_and_float64():
    y = synthetic(60, 150, 3, 0.1, seed=13)
    s = torch.linalg.svdvals(torch.from_numpy(y))
    given_sigma2 = evbmf_singular_values(s, (60, 150), sigma2=0.02)
    assert given_sigma2.sigma2 == 0.02
    assert given_sigma2.threshold == pytest.approx(evb_threshold(0.02, 60, 150), rel=1e-9)
    # A float32 tensor is read in float64: the same answer as its float64 copy, to the last bit.
    s32 = s.float()
    assert evbmf_singular_values(s32, (60, 150)).sigma2 == evbmf_singular_values(s32.double().numpy(), (60, 150)).sigma2
