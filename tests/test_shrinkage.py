"""Shrinkage of calibration Gram matrices toward their weight-only limit (Ledoit-Wolf over sampling units)."""

import pytest
import torch
import torch.nn.functional as F
from sklearn.covariance import ledoit_wolf_shrinkage as sklearn_shrinkage
from torch import nn

import fxdecomp
from fxdecomp.calibration import GramAccumulator, OutputGramAccumulator, ledoit_wolf_shrinkage, whitened_spectrum
from fxdecomp.errors import InvalidInputError
from fxdecomp.factorize.svd import low_rank_factors
from fxdecomp.layer_spec import layer_spec, pad_input


def _correlated(n: int, d: int, seed: int, span: float = 1.5) -> torch.Tensor:
    """n rows of a zero-mean Gaussian with a fixed anisotropic covariance (same for every seed; column scales 1 .. 10^-span)."""
    mixing = torch.randn(d, d, generator=torch.Generator().manual_seed(123), dtype=torch.float64) * torch.logspace(0, -span, d, dtype=torch.float64)
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) @ mixing.T


def test_single_rows_as_units_match_scikit_learn():
    x = _correlated(40, 12, seed=1)
    gram = GramAccumulator(layer_spec(nn.Linear(12, 3)))
    gram.shrinkage = "auto"  # unit statistics are kept only for "auto"
    gram.update(x[:15])
    gram.update(x[15:])
    assert gram.units == 40
    expected = sklearn_shrinkage(x.numpy(), assume_centered=True)
    assert ledoit_wolf_shrinkage(gram.sum[0], float(gram.unit_squares[0]), gram.units) == pytest.approx(expected, rel=1e-9)
    gram.shrinkage = "auto"
    mean = x.T @ x / 40
    a = expected
    shrunk = (1 - a) * mean + a * float(mean.diagonal().mean()) * torch.eye(12, dtype=torch.float64)
    torch.testing.assert_close(gram.matrix(0, damping=0.0), shrunk)


@pytest.mark.parametrize("size, in_channels", [(9, 2), (3, 8)])  # patches per image >= and < the patch length
def test_conv_units_are_images(size, in_channels):
    layer = nn.Conv2d(in_channels, 4, 3, padding=1)
    spec = layer_spec(layer)
    gram = GramAccumulator(spec)
    gram.shrinkage = "auto"  # unit statistics are kept only for "auto"
    x = torch.randn(5, in_channels, size, size)
    gram.update(x[:2])
    gram.update(x[2:])
    patches = F.unfold(pad_input(x, spec.pads, "zeros"), 3).double().transpose(1, 2)  # (N, L, d)
    per_image = patches.transpose(1, 2) @ patches
    torch.testing.assert_close(gram.sum[0], per_image.sum(0))
    assert float(gram.unit_squares[0]) == pytest.approx(float(per_image.pow(2).sum()), rel=1e-9)
    assert gram.units == 5


def test_output_side_units_are_probe_images():
    layer = nn.Linear(6, 5)
    gram = OutputGramAccumulator(layer_spec(layer))
    gram.shrinkage = "auto"  # unit statistics are kept only for "auto"
    grads = [torch.randn(3, 4, 5) for _ in range(2)]
    for g in grads:
        gram.update(g)
        gram.end_probe()
    per_sequence = torch.cat([g.double().transpose(1, 2) @ g.double() for g in grads])
    assert gram.units == 6 and float(gram.unit_squares[0]) == pytest.approx(float(per_sequence.pow(2).sum()), rel=1e-9)


def test_shrinkage_is_positive_with_few_samples_and_vanishes_with_many():
    intensities, distances = [], []
    for n in (8, 64, 512, 8192):
        x = _correlated(n, 24, seed=n)
        gram = GramAccumulator(layer_spec(nn.Linear(24, 3)))
        gram.shrinkage = "auto"  # unit statistics are kept only for "auto"
        gram.update(x)
        gram.shrinkage = "auto"
        intensities.append(gram.shrinkage_intensity())
        dense = x.T @ x / n
        distances.append(float((gram.matrix(0, damping=0.0) - dense).norm() / dense.norm()))
    assert intensities[0] > 0.05
    assert all(a > b for a, b in zip(intensities, intensities[1:]))
    assert intensities[-1] < 0.01 and distances[-1] < 1e-2  # tends to the dense estimate


def _heldout_error(gram_matrix: torch.Tensor, weight: torch.Tensor, rank: int, test: torch.Tensor) -> float:
    first, second = low_rank_factors(weight, rank, whitened_spectrum(weight, gram_matrix))
    return float(((weight - first @ second) @ test.T).norm() / (weight @ test.T).norm())


def test_shrinkage_improves_heldout_whitened_svd():
    """Fewer calibration samples than dimensions: the shrunk Gram matrix's whitened SVD errs less on fresh data."""
    d, rank = 48, 12
    weight = torch.randn(32, d, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    test = _correlated(4000, d, seed=999, span=0.6)
    raw_errors, shrunk_errors = [], []
    for seed in range(5):
        gram = GramAccumulator(layer_spec(nn.Linear(d, 32)))
        gram.shrinkage = "auto"  # unit statistics are kept only for "auto"
        gram.update(_correlated(24, d, seed=seed, span=0.6))
        gram.shrinkage = 0.0  # the raw estimate first
        raw_errors.append(_heldout_error(gram.matrix(0, damping=0.0), weight, rank, test))
        gram.shrinkage = "auto"
        assert gram.shrinkage_intensity() > 0
        shrunk_errors.append(_heldout_error(gram.matrix(0, damping=0.0), weight, rank, test))
    assert sum(shrunk_errors) < 0.96 * sum(raw_errors)


def test_fixed_shrinkage_keeps_the_trace_and_reaches_the_identity():
    gram = GramAccumulator(layer_spec(nn.Linear(6, 2)))
    gram.shrinkage = "auto"  # unit statistics are kept only for "auto"
    gram.update(_correlated(30, 6, seed=3))
    dense = gram.matrix(0, damping=0.0)
    gram.shrinkage = 1.0
    torch.testing.assert_close(gram.matrix(0, damping=0.0), float(dense.diagonal().mean()) * torch.eye(6, dtype=torch.float64))
    gram.shrinkage = 0.3
    assert float(gram.matrix(0, damping=0.0).trace()) == pytest.approx(float(dense.trace()))


def test_compress_option_checked_and_applied():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    x = torch.randn(4, 16)
    batches = [(torch.randn(4, 16),) for _ in range(3)]
    bad = fxdecomp.load_recipe("default").with_options(calibrate={"shrinkage": 2.0})
    with pytest.raises(InvalidInputError, match="shrinkage"):
        fxdecomp.compress(model, (x,), budget=0.6, calibration=batches, pipeline=bad)
    shrunk = fxdecomp.load_recipe("default").with_options(calibrate={"shrinkage": 1.0})
    full = fxdecomp.load_recipe("default").with_options(calibrate={"shrinkage": 1.0, "output_aware": False})
    weight_only = fxdecomp.compress(model, (x,), budget=0.6, methods=["svd"])
    identity = fxdecomp.compress(model, (x,), budget=0.6, methods=["svd"], calibration=batches, pipeline=full)
    # Full shrinkage of the input Gram matrix is the weight-only limit: the same ranks as weight-only.
    assert [d.ranks for d in identity.decisions] == [d.ranks for d in weight_only.decisions]
    fxdecomp.compress(model, (x,), budget=0.6, calibration=batches, pipeline=shrunk)  # output-aware side runs too
