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
    """Convs with BatchNorms (whose running statistics distilled calibration matches). Input: (N, 3, 16, 16)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )  # fmt: skip
    for bn in (model[1], model[4]):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    return model.eval()


def broken() -> nn.Module:
    raise RuntimeError("this factory fails on purpose")


def not_a_model():
    return 42
