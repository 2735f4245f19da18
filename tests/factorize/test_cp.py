"""Tests of fxdecomp.factorize.cp: exactness at max rank, quality, determinism, input checks."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fxdecomp.errors import InvalidInputError
from fxdecomp.examples.kernels import trained_like
from fxdecomp.factorize.cp import CPFactors, cp_conv_kernel, max_cp_rank


def rel_err(kernel: torch.Tensor, approx: torch.Tensor) -> float:
    k = kernel.double()
    return float((k - approx.double()).norm() / k.norm())


def einsum_reconstruction(cp: CPFactors) -> torch.Tensor:
    return torch.einsum("tr,sr,ir,jr->tsij", cp.out, cp.inp, cp.vertical, cp.horizontal)


# --- exact construction -------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape",
    [
        (8, 4, 3, 3),  # out channels largest
        (4, 8, 3, 3),  # in channels largest
        (2, 3, 5, 4),  # kernel height largest, kh != kw
        (2, 3, 4, 6),  # kernel width largest, kh != kw
        (6, 5, 1, 3),  # 1x3 kernel
        (7, 7, 1, 1),  # pointwise conv: the exact CP is a matrix factorisation
        (3, 3, 3, 3),  # all modes tie
    ],
)
def test_exact_at_max_rank(shape):
    kernel = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    rank = max_cp_rank(shape)
    assert rank == math.prod(shape) // max(shape)
    cp = cp_conv_kernel(kernel, rank)
    t, s, kh, kw = shape
    assert cp.out.shape == (t, rank) and cp.inp.shape == (s, rank)
    assert cp.vertical.shape == (kh, rank) and cp.horizontal.shape == (kw, rank)
    assert cp.out.dtype == torch.float32
    torch.testing.assert_close(einsum_reconstruction(cp), kernel, rtol=0, atol=1e-5)
    torch.testing.assert_close(cp.reconstruct(), kernel, rtol=0, atol=1e-5)
    assert cp.relative_error < 1e-6


def test_rank_above_max_is_exact_with_max_rank_terms():
    kernel = torch.randn(5, 4, 3, 2, generator=torch.Generator().manual_seed(2))
    cp = cp_conv_kernel(kernel, 1000)
    assert cp.rank == max_cp_rank(kernel.shape) == 24
    torch.testing.assert_close(cp.reconstruct(), kernel, rtol=0, atol=1e-5)


def test_exact_float64_stays_float64():
    kernel = torch.randn(6, 4, 3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    cp = cp_conv_kernel(kernel, max_cp_rank(kernel.shape))
    assert cp.out.dtype == torch.float64
    torch.testing.assert_close(cp.reconstruct(), kernel, rtol=0, atol=1e-12)


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(1, 5), min_size=4, max_size=4), st.integers(0, 2**16))
def test_exact_at_max_rank_any_shape(shape, seed):
    kernel = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    cp = cp_conv_kernel(kernel, max_cp_rank(shape))
    torch.testing.assert_close(einsum_reconstruction(cp), kernel, rtol=0, atol=1e-5)


# --- ALS quality --------------------------------------------------------------------------


def test_error_non_increasing_in_rank():
    kernel = trained_like(32, 32, 3, 3, seed=0)
    errors = [cp_conv_kernel(kernel, r).relative_error for r in (1, 2, 4, 8, 16, 32, 64, 128)]
    for smaller, larger in zip(errors, errors[1:]):
        assert larger <= smaller + 2e-3, errors
    assert errors[-1] < 0.5 * errors[0]


def unfolding_floor(kernel: torch.Tensor, rank: int) -> float:
    """Least relative error of any tensor whose every mode unfolding has rank <= ``rank`` (Eckart-Young per mode)."""
    k = kernel.double()
    floors = []
    for mode in range(k.ndim):
        s = torch.linalg.svdvals(k.movedim(mode, 0).reshape(k.shape[mode], -1))
        floors.append(float(s[rank:].norm() / s.norm()))
    return max(floors)


def test_relative_error_and_reconstruction_are_consistent():
    kernel = trained_like(24, 16, 3, 3, seed=1)
    cp = cp_conv_kernel(kernel, 10)
    torch.testing.assert_close(cp.reconstruct(), einsum_reconstruction(cp), rtol=1e-5, atol=1e-6)
    assert cp.relative_error == pytest.approx(rel_err(kernel, einsum_reconstruction(cp)), rel=1e-4)
    # A rank-10 CP has every unfolding of rank <= 10: Eckart-Young on each unfolding bounds its error below.
    assert unfolding_floor(kernel, 10) <= cp.relative_error < 1.0
    assert unfolding_floor(kernel, 10) > 0.01


def test_column_norms_are_balanced():
    cp = cp_conv_kernel(trained_like(16, 12, 3, 3, seed=2), 8)
    norms = torch.stack([f.norm(dim=0) for f in (cp.out, cp.inp, cp.vertical, cp.horizontal)])
    torch.testing.assert_close(norms, norms[:1].expand_as(norms), rtol=1e-4, atol=1e-6)


def test_low_rank_kernel_is_recovered():
    g = torch.Generator().manual_seed(4)
    fs = [torch.randn(d, 5, generator=g) for d in (20, 12, 3, 3)]
    kernel = torch.einsum("tr,sr,ir,jr->tsij", *fs)
    assert cp_conv_kernel(kernel, 5, max_iter=500, tol=1e-10).relative_error < 1e-3


@pytest.mark.filterwarnings("ignore:Trying to compute SVD")  # tensorly, on the 3x3 modes
@pytest.mark.parametrize("kind", ["trained", "gaussian"])
def test_no_worse_than_tensorly_parafac(kind):
    import tensorly as tl  # a declared dependency: missing is a failure
    from tensorly.decomposition import parafac

    if kind == "trained":
        kernel = trained_like(32, 32, 3, 3, seed=0)
    else:
        kernel = torch.randn(32, 32, 3, 3, generator=torch.Generator().manual_seed(0))
    ours = cp_conv_kernel(kernel, 16).relative_error
    tl.set_backend("numpy")
    cp = parafac(kernel.double().numpy(), 16, n_iter_max=100, init="svd", random_state=0)
    theirs = rel_err(kernel, torch.from_numpy(tl.cp_to_tensor(cp)))
    assert ours <= theirs + 1e-3, (ours, theirs)


# --- determinism, dtypes, degenerate inputs -------------------------------------------------


def test_deterministic_and_leaves_global_rng_alone():
    # rank > T + S, so part of the initialisation is random
    kernel = trained_like(6, 5, 3, 3, seed=3)
    state = torch.get_rng_state()
    first = cp_conv_kernel(kernel, 14, seed=7)
    second = cp_conv_kernel(kernel, 14, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    for name in ("out", "inp", "vertical", "horizontal"):
        assert torch.equal(getattr(first, name), getattr(second, name))
    assert first.relative_error == second.relative_error
    other = cp_conv_kernel(kernel, 14, seed=8)
    assert not torch.equal(first.out, other.out)


def test_half_precision_kernel_gives_float32_factors():
    kernel = trained_like(16, 8, 3, 3).to(torch.bfloat16)
    cp = cp_conv_kernel(kernel, 4)
    assert cp.out.dtype == torch.float32
    assert unfolding_floor(kernel.float(), 4) <= cp.relative_error < 1.0


def test_zero_kernel():
    cp = cp_conv_kernel(torch.zeros(4, 3, 3, 3), 2)
    assert cp.relative_error == 0.0
    assert torch.count_nonzero(cp.reconstruct()) == 0


def test_factors_are_frozen():
    cp = cp_conv_kernel(torch.randn(4, 3, 3, 3), 2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cp.out = cp.inp  # type: ignore[misc]


@pytest.mark.parametrize(
    ("kernel", "rank", "match"),
    [
        (torch.randn(4, 3, 3), 2, "4-D"),
        (torch.randn(4, 3, 3, 3, 1), 2, "4-D"),
        (torch.randn(4, 3, 3, 3), 0, "rank"),
        (torch.randn(4, 3, 3, 3), -3, "rank"),
        (torch.randn(4, 3, 3, 3), 2.5, "rank"),
        (torch.ones(4, 3, 3, 3, dtype=torch.int64), 2, "floating"),
        (torch.zeros(0, 3, 3, 3), 2, "empty"),
        ([[[[1.0]]]], 1, "torch.Tensor"),
    ],
)
def test_bad_input_raises(kernel, rank, match):
    with pytest.raises(InvalidInputError, match=match):
        cp_conv_kernel(kernel, rank)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_kernel_raises(bad):
    kernel = torch.randn(4, 3, 3, 3)
    kernel[1, 2, 0, 1] = bad
    with pytest.raises(InvalidInputError, match="non-finite"):
        cp_conv_kernel(kernel, 2)


def test_bad_iteration_settings_raise():
    kernel = torch.randn(4, 3, 3, 3)
    with pytest.raises(InvalidInputError, match="max_iter"):
        cp_conv_kernel(kernel, 2, max_iter=-1)
    with pytest.raises(InvalidInputError, match="tol"):
        cp_conv_kernel(kernel, 2, tol=-1e-3)


def test_max_cp_rank_rejects_empty_shapes():
    assert max_cp_rank((512, 256, 3, 3)) == 256 * 9
    with pytest.raises(InvalidInputError):
        max_cp_rank((4, 0, 3, 3))
