"""Weight-only damage on a lean residual network: a layer's error counts by its share of the signal (issue 16)."""

import warnings

import pytest
import torch
from torch import nn

import fxdecomp
from fxdecomp.errors import InvalidInputError

WIDTH = 32


class _Block(nn.Module):
    """An inverted-residual-like block: x + BN(project(ReLU6(BN(dw(ReLU6(BN(expand(x))))))))."""

    def __init__(self):
        super().__init__()
        self.expand, self.bn1 = nn.Conv2d(WIDTH, WIDTH, 1, bias=False), nn.BatchNorm2d(WIDTH)
        self.dw, self.bn2 = nn.Conv2d(WIDTH, WIDTH, 3, padding=1, groups=WIDTH, bias=False), nn.BatchNorm2d(WIDTH)
        self.project, self.bn3 = nn.Conv2d(WIDTH, WIDTH, 1, bias=False), nn.BatchNorm2d(WIDTH)

    def forward(self, x):
        act = nn.functional.relu6
        return x + self.bn3(self.project(act(self.bn2(self.dw(act(self.bn1(self.expand(x))))))))


class _LeanNet(nn.Module):
    """stem -> BN -> ReLU6 -> transition (flat spectrum, on the main path) -> BN -> two residual blocks.

    The blocks' pointwise convs have slowly decaying spectra (0.97^i) and their branches are weak next
    to the skip; the transition's singular values are all equal, so any truncation of it removes its
    share of the signal from everything after it.
    """

    def __init__(self):
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, WIDTH, 3, padding=1, bias=False), nn.BatchNorm2d(WIDTH)
        self.transition, self.bnt = nn.Conv2d(WIDTH, WIDTH, 1, bias=False), nn.BatchNorm2d(WIDTH)
        self.blocks = nn.Sequential(_Block(), _Block())

    def forward(self, x):
        return self.blocks(self.bnt(self.transition(nn.functional.relu6(self.bn0(self.stem(x))))))


def _spectrum(generator, decay: float) -> torch.Tensor:
    q1, _ = torch.linalg.qr(torch.randn(WIDTH, WIDTH, generator=generator))
    q2, _ = torch.linalg.qr(torch.randn(WIDTH, WIDTH, generator=generator))
    return (q1 @ torch.diag(decay ** torch.arange(WIDTH, dtype=torch.float32)) @ q2.T)[:, :, None, None]


def _lean_net() -> _LeanNet:
    generator = torch.Generator().manual_seed(0)
    net = _LeanNet()
    with torch.no_grad():
        net.transition.weight.copy_(_spectrum(generator, 1.0))
        for block in net.blocks:
            block.expand.weight.copy_(_spectrum(generator, 0.97))
            block.project.weight.copy_(_spectrum(generator, 0.97))
            block.bn3.weight.fill_(0.5)
    return net.eval()


def _compress(net, x, budget, weight_damage):
    recipe = fxdecomp.load_recipe("default").with_options(
        calibrate={"weight_damage": weight_damage}, plan={"round_to": 1, "min_efficiency": 0}
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fxdecomp.compress(net, (x,), budget=budget, methods=["svd"], exclude=("stem",), pipeline=recipe)


def _output_error(model, compressed, x) -> float:
    with torch.no_grad():
        reference = model(x)
        return float((compressed(x) - reference).norm() / reference.norm())


def test_signal_share_keeps_the_main_path_of_a_lean_residual_net():
    net = _lean_net()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    test = torch.randn(16, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    squared = _compress(net, x, 0.4, "squared")
    shared = _compress(net, x, 0.4, "signal_share")
    for result in (squared, shared):
        assert result.flops_after <= 0.4 * result.flops_before * (1 + 1e-9)
    transition = lambda result: next(d for d in result.decisions if d.name == "transition")  # noqa: E731
    # e^2 is at most 1: the old plan buys FLOPs by emptying the main-path conv, and the output is gone.
    assert transition(squared).error > 0.95
    assert _output_error(net, squared.graph_module, test) > 0.95
    # Weighted by its share of the signal, the main path is cut far less and the output survives.
    assert transition(shared).error < 0.8
    assert _output_error(net, shared.graph_module, test) < 0.8


def test_signal_shares_match_the_branch_energy_at_the_residual_sum():
    from types import SimpleNamespace

    from fxdecomp.planning.signal_share import signal_shares

    net = _lean_net()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    gm = torch.fx.symbolic_trace(net)
    names = ("stem", "transition", "blocks.0.expand", "blocks.0.project", "blocks.1.expand")
    nodes = {n.target: n for n in gm.graph.nodes if n.op == "call_module"}
    candidates = {name: SimpleNamespace(sites=[SimpleNamespace(node=nodes[name])]) for name in names}
    shares = signal_shares(gm, candidates, (x,))
    act = nn.functional.relu6
    with torch.no_grad():  # the oracle: the blocks' branches recomputed from the modules
        h = net.bnt(net.transition(act(net.bn0(net.stem(x)))))
        expected = {}
        for i, block in enumerate(net.blocks):
            branch = block.bn3(block.project(act(block.bn2(block.dw(act(block.bn1(block.expand(h))))))))
            expected[f"blocks.{i}"] = float(branch.double().pow(2).sum() / (h + branch).double().pow(2).sum())
            h = h + branch
    assert shares["stem"] == 1.0 and shares["transition"] == 1.0  # every sum after them adds two of their own paths
    assert shares["blocks.0.expand"] == pytest.approx(expected["blocks.0"], rel=1e-6)
    assert shares["blocks.0.project"] == pytest.approx(expected["blocks.0"], rel=1e-6)
    assert shares["blocks.1.expand"] == pytest.approx(expected["blocks.1"], rel=1e-6)
    assert 0.0 < expected["blocks.0"] < 0.5


def test_unknown_weight_damage_names_signal_share():
    recipe = fxdecomp.load_recipe("default").with_options(calibrate={"weight_damage": "cubic"})
    with pytest.raises(InvalidInputError, match="signal_share"):
        fxdecomp.compress(_lean_net(), (torch.randn(1, 3, 8, 8),), budget=0.9, pipeline=recipe)


def test_signal_shares_are_the_same_under_torch_export():
    """torch.export records residual sums as aten.add.Tensor, not Python's +: the shares must not fall back to 1."""
    net = _lean_net()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    recipe = fxdecomp.load_recipe("default").with_options(
        calibrate={"weight_damage": "signal_share"}, plan={"round_to": 1, "min_efficiency": 0}
    )
    plans = {}
    for frontend in ("fx", "export"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = fxdecomp.compress(
                net, (x,), budget=0.4, methods=["svd"], exclude=("stem",), pipeline=recipe, frontend=frontend
            )
        plans[frontend] = {d.name: (d.method, tuple(d.ranks)) for d in result.decisions}
    assert plans["export"] == plans["fx"]


def test_signal_shares_leave_inputs_the_model_writes_into_alone():
    """The shares' forward pass runs on copies: later passes see the example inputs as the user gave them."""
    from types import SimpleNamespace

    from fxdecomp.planning.signal_share import signal_shares

    class WritesItsInput(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.branch = nn.Linear(16, 16), nn.Linear(16, 16)

        def forward(self, x):
            x.mul_(2.0)
            h = self.fc(x)
            return h + self.branch(h)

    torch.manual_seed(0)
    gm = torch.fx.symbolic_trace(WritesItsInput().eval())
    nodes = {n.target: n for n in gm.graph.nodes if n.op == "call_module"}
    candidates = {name: SimpleNamespace(sites=[SimpleNamespace(node=nodes[name])]) for name in ("fc", "branch")}
    x = torch.randn(4, 16)
    before = x.clone()
    shares = signal_shares(gm, candidates, (x,))
    assert torch.equal(x, before)
    assert shares["fc"] == 1.0 and 0.0 < shares["branch"] < 1.0


@pytest.mark.parametrize("heads", [1, 2])
def test_an_additive_attention_mask_is_not_a_residual_sum(heads):
    """Eager attention adds a mask of finfo.min at padded keys to the scores (broadcast over the heads, or not, with
    one head); that sum is not where q's and k's errors join the signal: the residual sum after attention is."""
    from types import SimpleNamespace

    from fxdecomp.planning.signal_share import signal_shares

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.q, self.k, self.v, self.o = (nn.Linear(16, 16) for _ in range(4))

        def forward(self, x, mask):
            b, n, _ = x.shape
            split = lambda t: t.view(b, n, heads, 16 // heads).transpose(1, 2)  # noqa: E731
            scores = split(self.q(x)) @ split(self.k(x)).transpose(-1, -2) + mask
            out = (scores.softmax(-1) @ split(self.v(x))).transpose(1, 2).reshape(b, n, 16)
            return x + self.o(out)

    torch.manual_seed(0)
    gm = torch.fx.symbolic_trace(Attention().eval())
    nodes = {n.target: n for n in gm.graph.nodes if n.op == "call_module"}
    candidates = {name: SimpleNamespace(sites=[SimpleNamespace(node=nodes[name])]) for name in "qkvo"}
    mask = torch.zeros(2, 1, 1, 5)
    mask[0, ..., 3:] = torch.finfo(torch.float32).min  # padded keys of the first sequence
    shares = signal_shares(gm, candidates, (torch.randn(2, 5, 16), mask))
    assert 0.0 < shares["v"] < 1.0
    assert shares["q"] == pytest.approx(shares["v"]) and shares["k"] == pytest.approx(shares["v"])


def test_a_graph_that_does_not_run_on_the_example_inputs_gives_every_share_one():
    from types import SimpleNamespace

    from fxdecomp.planning.signal_share import signal_shares

    net = _lean_net()
    gm = torch.fx.symbolic_trace(net)
    nodes = {n.target: n for n in gm.graph.nodes if n.op == "call_module"}
    candidates = {name: SimpleNamespace(sites=[SimpleNamespace(node=nodes[name])]) for name in ("stem", "blocks.0.expand")}
    for bad in ((torch.randn(2, 5, 8, 8),), ("not a tensor",), ()):  # wrong channels, wrong type, missing input
        assert signal_shares(gm, candidates, bad) == {"stem": 1.0, "blocks.0.expand": 1.0}

    class Embedded(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.fc = nn.Embedding(4, 8), nn.Linear(8, 8)

        def forward(self, ids):
            h = self.emb(ids)
            return h + self.fc(h)

    gm = torch.fx.symbolic_trace(Embedded())
    node = next(n for n in gm.graph.nodes if n.target == "fc")
    candidates = {"fc": SimpleNamespace(sites=[SimpleNamespace(node=node)])}
    assert signal_shares(gm, candidates, (torch.tensor([[7]]),)) == {"fc": 1.0}  # IndexError: a token id out of range
