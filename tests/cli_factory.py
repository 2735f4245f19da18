"""Model factories for the CLI tests, as a user names them: ``tests.cli_factory:small_cnn``."""

import torch
from torch import nn


class SmallCNN(nn.Module):
    """Convs, max pooling and a two-layer classifier: every FLOP is in a Conv2d or a Linear."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )  # fmt: skip
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(32 * 4 * 4, 64), nn.ReLU(), nn.Linear(64, 10))

    def forward(self, x):
        return self.classifier(self.features(x))


def small_cnn() -> nn.Module:
    """Seeded, so that every process builds the same weights. Input: (N, 3, 16, 16)."""
    torch.manual_seed(0)
    return SmallCNN().eval()


def bn_cnn() -> nn.Module:
    """Convs with BatchNorms whose running statistics come from "training data" unlike noise (shifted,
    scaled channels): what distilled calibration matches. Any input size: (N, 3, H, W)."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    )  # fmt: skip
    g = torch.Generator().manual_seed(1)
    data = torch.randn(64, 3, 12, 12, generator=g) * torch.tensor([3.0, 0.5, 1.5]).view(1, 3, 1, 1) + torch.tensor([2.0, -1.0, 0.5]).view(1, 3, 1, 1)
    for bn in (net[1], net[4]):
        bn.momentum = None  # a cumulative average over the batches
    with torch.no_grad():
        net.train()
        for chunk in data.split(16):
            net(chunk)
    return net.eval()


def broken() -> nn.Module:
    raise RuntimeError("this factory fails on purpose")


def not_a_model():
    return 42
