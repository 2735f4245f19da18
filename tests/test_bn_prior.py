"""The weight-only damage model on a lean network: BatchNorm scales decide which truncation is harmless."""

import math

import pytest
import torch
from torch import nn

import fxdecomp
from fxdecomp.bn_prior import rectified_second_moment
from fxdecomp.planning.damage import retained_energy_damage
from fxdecomp.errors import InvalidInputError


def _lean_net() -> nn.Sequential:
    """stem -> depthwise -> pointwise A (+BN) -> ReLU6 -> pointwise B (+BN): the features a head would read.

    A's rows shrink geometrically, and its BatchNorm's running variance follows them (as training
    leaves it), so the BatchNorm scales the small rows back up: A is full rank on its BatchNorm's output
    though its weight looks nearly rank 8. B is rank 8 plus 10 % noise, with plain BatchNorm scales.
    """
    generator = torch.Generator().manual_seed(0)
    width = 32
    net = nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU6(),
        nn.Conv2d(width, width, 3, padding=1, groups=width, bias=False), nn.BatchNorm2d(width), nn.ReLU6(),
        nn.Conv2d(width, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU6(),
        nn.Conv2d(width, width, 1, bias=False), nn.BatchNorm2d(width),
    )
    q, _ = torch.linalg.qr(torch.randn(width, width, generator=generator))
    rows = 0.7 ** torch.arange(width, dtype=torch.float32)
    low_rank = torch.randn(width, 8, generator=generator) @ torch.randn(8, width, generator=generator) / math.sqrt(8)
    noise = torch.randn(width, width, generator=generator) * 0.1 * low_rank.norm() / width
    with torch.no_grad():
        net[6].weight.copy_((rows[:, None] * q)[:, :, None, None])
        net[7].running_var.copy_(rows**2 * 0.25)
        net[9].weight.copy_((low_rank + noise)[:, :, None, None])
        net[10].running_var.fill_(float((low_rank + noise).pow(2).sum(1).mean()) * 0.25)
        for bn in (net[1], net[4]):
            bn.running_var.fill_(4.0)
    return net.eval()


def _output_error(model, compressed, x) -> float:
    with torch.no_grad():
        reference = model(x)
        return float((compressed(x) - reference).norm() / reference.norm())


def test_batchnorm_prior_keeps_a_lean_network_working():
    net = _lean_net()
    x = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(1))
    test = torch.randn(16, 3, 12, 12, generator=torch.Generator().manual_seed(2))
    total = fxdecomp.count_flops(net, (x,))
    pointwise = 2 * 32 * 32 * 12 * 12 * x.shape[0]
    budget = 1 - 0.4 * pointwise / total  # one pointwise layer keeps about a quarter of its rank
    kwargs = dict(budget=budget, methods=["svd"], exclude=("0", "3"))
    old = fxdecomp.compress(net, (x,), pipeline=fxdecomp.load_recipe("default").with_options(calibrate={"weight_prior": "none"}), **kwargs)
    new = fxdecomp.compress(net, (x,), pipeline=fxdecomp.load_recipe("default").with_options(calibrate={"weight_prior": "batchnorm"}), **kwargs)
    chosen = lambda result: {d.name for d in result.decisions if d.method != "keep"}  # noqa: E731
    assert chosen(old) == {"6"} and chosen(new) == {"9"}
    old_error, new_error = _output_error(net, old.graph_module, test), _output_error(net, new.graph_module, test)
    assert old_error > 0.5  # the plain weight-only plan breaks the network ...
    assert new_error < 0.15 and new_error < old_error / 4  # ... the BatchNorm-weighted one does not


def test_rectified_second_moment_matches_sampling():
    mean, std = torch.tensor([-1.0, 0.0, 0.5, 2.0], dtype=torch.float64), torch.tensor([0.5, 1.0, 2.0, 0.3], dtype=torch.float64)
    z = mean + std * torch.randn(400_000, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    torch.testing.assert_close(rectified_second_moment(mean, std), z.clamp_min(0).pow(2).mean(0), rtol=0.02, atol=1e-3)


def test_unknown_weight_prior_is_refused():
    net = _lean_net()
    recipe = fxdecomp.load_recipe("default").with_options(calibrate={"weight_prior": "bn"})
    with pytest.raises(InvalidInputError, match="weight_prior"):
        fxdecomp.compress(net, (torch.randn(1, 3, 8, 8),), budget=0.8, pipeline=recipe)


def test_retained_energy_damage_is_squared_error_when_small_and_adds_up_over_a_chain():
    assert retained_energy_damage(0.01) == pytest.approx(1e-4, rel=1e-3)
    assert retained_energy_damage(0.999) > 5 * 0.999**2  # grows without bound as e -> 1
    errors = [0.3, 0.5, 0.2]
    kept = math.prod(1 - e**2 for e in errors)  # energy fraction surviving the chain
    assert sum(retained_energy_damage(e) for e in errors) == pytest.approx(-math.log(kept))


def test_unknown_weight_damage_is_refused():
    recipe = fxdecomp.load_recipe("default").with_options(calibrate={"weight_damage": "cubic"})
    with pytest.raises(InvalidInputError, match="weight_damage"):
        fxdecomp.compress(_lean_net(), (torch.randn(1, 3, 8, 8),), budget=0.8, pipeline=recipe)
