"""spatial_svd, tucker2 and cp fitted to calibration data (issue #16, item 2).

The oracle is the layer itself: both the data-fitted and the weight-only module run on
the activations the Gram matrix was computed from (in the test, from unfolded patches),
and their outputs are compared with the original layer's.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from torch import nn

import fxdecomp
from fxdecomp.calibration import GramAccumulator
from fxdecomp.decomposers import get_decomposer
from fxdecomp.errors import RecipeError
from fxdecomp.layer_spec import layer_spec

from tests.strategies import conv_layers

METHODS = ["spatial_svd", "tucker2", "cp"]


def activations(n: int, channels: int, size: int, seed: int = 0) -> torch.Tensor:
    """Correlated, non-negative activations: spatially smoothed noise, channels mixed with a decaying spectrum, ReLU."""
    generator = torch.Generator().manual_seed(seed)
    z = F.avg_pool2d(torch.randn(n, channels, size + 2, size + 2, generator=generator), 3, 1)
    mix = torch.randn(channels, channels, generator=generator) * torch.logspace(0, -2, channels)
    return F.relu(torch.einsum("dc,nchw->ndhw", mix, z) + 0.3)


def patch_grams(conv: nn.Conv2d, x: torch.Tensor) -> list[torch.Tensor]:
    """Per group, the mean Gram matrix of the unfolded (zero-padded) input patches, float64: computed here, not by fxdecomp."""
    patches = F.unfold(x.double(), conv.kernel_size, conv.dilation, conv.padding, conv.stride)  # (N, S*kh*kw, L)
    rows = patches.transpose(1, 2).reshape(-1, patches.shape[1])
    per_group = rows.shape[1] // conv.groups
    return [(b.T @ b) / len(b) for b in rows.split(per_group, dim=1)]


def output_error(module: nn.Module, conv: nn.Conv2d, x: torch.Tensor, h: torch.Tensor | None = None) -> float:
    """Relative output error on x, optionally weighted by an output Gram matrix h: tr(E h E^T) / tr(Y h Y^T)."""
    with torch.no_grad():
        reference = F.conv2d(x.double(), conv.weight.double(), None, conv.stride, conv.padding, conv.dilation, conv.groups)
        bias = conv.bias.double()[None, :, None, None] if conv.bias is not None else 0.0
        error = module.double()(x.double()) - bias - reference
    e, y = (t.movedim(1, -1).reshape(-1, t.shape[1]) for t in (error, reference))
    h = torch.eye(e.shape[1], dtype=torch.float64) if h is None else h
    return float(((e @ h) * e).sum() / ((y @ h) * y).sum()) ** 0.5


def built(decomposer, spec, state, ranks, conv) -> nn.Module:
    return decomposer.build(spec, state, ranks, conv.bias.detach() if conv.bias is not None else None, conv.weight.detach().double())


LAYERS = {
    "3x3": lambda: nn.Conv2d(12, 16, 3, padding=1),
    "grouped-strided-2x3": lambda: nn.Conv2d(8, 10, (2, 3), stride=2, padding=(0, 1), groups=2, bias=False),
}
RANKS = {
    "3x3": {"spatial_svd": [(1,), (3,), (6,), (12,)], "tucker2": [(2, 3), (4, 8), (8, 6), (10, 14)], "cp": [(2,), (6,), (12,)]},
    "grouped-strided-2x3": {"spatial_svd": [(1,), (3,), (6,)], "tucker2": [(1, 2), (2, 4), (4, 3)], "cp": [(1,), (3,), (5,)]},
}


@pytest.mark.parametrize("layer", sorted(LAYERS))
@pytest.mark.parametrize("method", METHODS)
def test_fitted_factors_beat_weight_only_on_the_output_error(method, layer):
    torch.manual_seed(1)
    conv = LAYERS[layer]()
    spec = layer_spec(conv)
    x = activations(24, conv.in_channels, 10)
    grams = patch_grams(conv, x)
    decomposer = get_decomposer("conv2d", method)
    weight_only = decomposer.factorize(spec, conv.weight)
    fitted = decomposer.factorize_whitened(spec, conv.weight, grams)
    for ranks in RANKS[layer][method]:
        blind = output_error(built(decomposer, spec, weight_only, ranks, conv), conv, x)
        aware = output_error(built(decomposer, spec, fitted, ranks, conv), conv, x)
        assert aware < blind, (ranks, aware, blind)
        # The error the planner is given is the output error on this data (CP's estimate: of its quicker factors).
        assert decomposer.error(spec, fitted, ranks) == pytest.approx(aware, rel=1e-6, abs=1e-9)
        estimate = copy.deepcopy(conv).double()
        with torch.no_grad():
            estimate.weight.copy_(decomposer.estimate_reconstruct(spec, fitted, ranks))
        measured = output_error(estimate, conv, x)
        assert decomposer.estimate_error(spec, fitted, ranks) == pytest.approx(measured, rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("method", ["spatial_svd", "tucker2"])
def test_fit_with_an_output_gram_beats_weight_only_in_that_metric(method):
    torch.manual_seed(2)
    conv = nn.Conv2d(10, 12, 3, padding=1)
    spec = layer_spec(conv)
    x = activations(24, 10, 10, seed=3)
    mix = torch.randn(12, 12, dtype=torch.float64) * torch.logspace(0, -1.5, 12, dtype=torch.float64)
    h = mix @ mix.T + 1e-3 * torch.eye(12, dtype=torch.float64)
    values, vectors = torch.linalg.eigh(h)
    pair = ((vectors * values.sqrt()) @ vectors.T, (vectors / values.sqrt()) @ vectors.T)
    decomposer = get_decomposer("conv2d", method)
    one_sided = decomposer.factorize_whitened(spec, conv.weight, patch_grams(conv, x))
    two_sided = decomposer.factorize_whitened(spec, conv.weight, patch_grams(conv, x), [pair])
    weight_only = decomposer.factorize(spec, conv.weight)
    for ranks in ([(2,), (5,), (9,)] if method == "spatial_svd" else [(3, 3), (6, 4), (8, 8)]):
        errors = [output_error(built(decomposer, spec, s, ranks, conv), conv, x, h) for s in (weight_only, one_sided, two_sided)]
        assert errors[2] < errors[0], (ranks, errors)
        assert errors[2] <= errors[1] + 1e-9, (ranks, errors)  # closed forms: optimal in H's metric given the basis
        assert decomposer.estimate_error(spec, two_sided, ranks) == pytest.approx(errors[2], rel=1e-6)


@settings(max_examples=25, deadline=None)
@given(conv_layers())
def test_fitted_factors_at_full_rank_reproduce_the_layer(conv):
    spec = layer_spec(conv)
    x = activations(2, conv.in_channels, 9, seed=4)
    accumulator = GramAccumulator(spec)
    accumulator.update(x)
    grams = [accumulator.matrix(g) for g in range(spec.groups)]  # damped, as the calibrate pass gives them
    conv = conv.double()
    reference = conv(x.double())
    for method in METHODS:
        decomposer = get_decomposer("conv2d", method)
        state = decomposer.factorize_whitened(spec, conv.weight, grams)
        module = decomposer.build(spec, state, decomposer.max_ranks(spec), conv.bias, conv.weight)
        out = module(x.double())
        assert out.shape == reference.shape
        torch.testing.assert_close(out, reference, rtol=1e-7, atol=1e-7 * float(reference.detach().abs().max()) + 1e-12)
        assert decomposer.error(spec, state, decomposer.max_ranks(spec)) < 1e-6


class TwoConvs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(6, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 16, 3, padding=1)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


@pytest.mark.parametrize("method", METHODS)
def test_compress_fits_the_factors_unless_asked_not_to(method):
    torch.manual_seed(5)
    model = TwoConvs().eval()
    batches = [(activations(4, 6, 8, seed=s),) for s in range(3)]
    x = batches[0][0][:1]
    # Raw statistics: the predicted error is then the in-sample error the test measures (shrinkage,
    # the default, predicts the error toward the weight-only limit instead).
    recipe = fxdecomp.load_recipe("default").with_options(calibrate={"shrinkage": 0.0})
    layer = model.b
    ranks = {"spatial_svd": (6,), "tucker2": (6, 6), "cp": (6,)}[method]
    plan = {"a": ("keep", ()), "b": (method, ranks)}
    results = {
        fit: fxdecomp.compress(model, (x,), methods=[method], calibration=batches, plan=plan, pipeline=recipe.with_options(plan={"fit": fit}))
        for fit in ("data", "svd", "weights")
    }
    inputs = torch.cat([torch.relu(model.a(b[0])) for b in batches]).detach()
    errors = {fit: output_error(r.graph_module.get_submodule("b"), layer, inputs) for fit, r in results.items()}
    assert errors["data"] < errors["weights"], errors
    assert errors["svd"] == pytest.approx(errors["weights"], rel=1e-5), errors  # "svd": only svd fitted, as before #16
    decision = next(d for d in results["data"].decisions if d.name == "b")
    # The planner's predicted error is the fitted module's error on the (damped) calibration statistics.
    assert decision.error == pytest.approx(errors["data"], rel=0.1)


def test_an_unknown_fit_mode_is_refused():
    model = TwoConvs().eval()
    x = torch.randn(1, 6, 8, 8)
    recipe = fxdecomp.load_recipe("default").with_options(plan={"fit": "both"})
    with pytest.raises(RecipeError, match="fit"):
        fxdecomp.compress(model, (x,), budget=0.6, pipeline=recipe)
