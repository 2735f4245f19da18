"""inspect_model: the analysis passes only, per-layer FLOPs, parameters and rank estimates."""

import json

import pytest
import torch
from torch import nn

import fxdecomp
from fxdecomp.errors import InvalidInputError, UnknownMethodError
from fxdecomp.inspect import RANK_FRACTIONS, LayerInfo, inspect_model
from fxdecomp.vbmf import vbmf_rank
from tests.cli_factory import small_cnn


class Shared(nn.Module):
    """One Linear called twice, and a functional conv on a parameter."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(8, 3, 3, 3))
        self.fc = nn.Linear(8 * 6 * 6, 8 * 6 * 6)

    def forward(self, x):
        y = torch.nn.functional.conv2d(x, self.weight, stride=1)
        return self.fc(self.fc(y.flatten(1)))


def _x():
    return torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def test_layers_flops_and_params_add_up_to_the_model():
    model, x = small_cnn(), _x()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    layers = inspect_model(model, (x,))
    assert [l.name for l in layers] == ["features.0", "features.3", "classifier.1", "classifier.3"]
    assert all(isinstance(l, LayerInfo) for l in layers)
    # every FLOP of SmallCNN is in a Conv2d or Linear: the layers' FLOPs are the model's
    assert sum(l.flops for l in layers) == fxdecomp.count_flops(model, (x,))
    assert sum(l.params for l in layers) == sum(p.numel() for p in model.parameters())
    assert layers[1].weight_shape == (32, 16, 3, 3) and layers[1].input_shape == (2, 16, 8, 8) and layers[1].op == "conv2d"
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # nothing modified


def layer_matrix(name: str) -> torch.Tensor:
    """The weight of ``name`` in small_cnn() lowered to out x (in * kh * kw), float64."""
    weight = small_cnn().get_submodule(name).weight.detach().double()
    return weight.reshape(weight.shape[0], -1)


def test_rank_estimates_and_energy_kept():
    layers = inspect_model(small_cnn(), _x(), methods=("svd", "tucker2"))
    for layer in layers:
        svd = layer.estimate("svd")
        assert svd is not None and len(svd.max_ranks) == 1
        assert svd.vbmf[0] == vbmf_rank(layer_matrix(layer.name))
        energies = torch.linalg.svdvals(layer_matrix(layer.name)) ** 2
        kept = torch.cumsum(energies, 0) / energies.sum()
        assert svd.energy_90[0] == int((kept < 0.9).sum()) + 1
        assert svd.energy_99[0] == int((kept < 0.99).sum()) + 1
        assert [at.rank_fraction for at in svd.energy_kept] == list(RANK_FRACTIONS)
        low, half = (at.energy[0] for at in svd.energy_kept)
        assert 0 < low <= half <= 1
    assert layers[1].estimate("tucker2").max_ranks == (16, 32)
    assert layers[2].estimate("tucker2") is None  # a Linear has no Tucker-2


def test_energy_kept_matches_the_singular_values():
    layer = inspect_model(small_cnn(), _x(), methods=("svd",))[2]  # classifier.1: Linear(512 -> 64)
    weight = small_cnn().classifier[1].weight.detach().double()
    energies = torch.linalg.svdvals(weight) ** 2
    for at in layer.estimate("svd").energy_kept:
        (rank,) = at.ranks
        assert rank == int(torch.tensor(at.rank_fraction * 64).ceil())
        assert at.energy[0] == pytest.approx(float(energies[:rank].sum() / energies.sum()), rel=1e-9)


def test_shared_and_functional_layers_exclude_and_json():
    layers = inspect_model(Shared(), (torch.randn(2, 3, 8, 8),), exclude=["fc"])
    by_name = {l.name: l for l in layers}
    assert set(by_name) == {"weight", "fc"} and by_name["weight"].form == "function"
    assert by_name["fc"].calls == 2 and by_name["fc"].excluded and not by_name["weight"].excluded
    assert by_name["fc"].flops == 2 * 2 * 2 * 288 * 288  # two calls, batch 2, 2 FLOPs per multiply-add
    data = json.loads(json.dumps([l.to_dict() for l in layers]))
    assert data[0]["estimates"][0]["energy_kept"][0]["rank_fraction"] == RANK_FRACTIONS[0]


def test_bad_arguments():
    with pytest.raises(UnknownMethodError, match="magic"):
        inspect_model(small_cnn(), _x(), methods=("magic",))
    with pytest.raises(InvalidInputError):
        inspect_model(small_cnn(), torch.randn(1, 5, 16, 16))
    with pytest.raises(InvalidInputError):
        inspect_model("not a model", _x())
