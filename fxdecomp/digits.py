"""Real data that ships with scikit-learn: the 8x8 handwritten digits, and a small VGG-style CNN for them.

Used by the demo, the training benchmark and the tests (offline, no downloads).
The images are upsampled to 16x16 so the CNN has room for two pooling stages.

Example::

    train, test = load_digits_split()
    model = DigitsCNN()
    train_classifier(model, train, epochs=10)
    accuracy(model, test)   # ~0.98
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class Split:
    images: torch.Tensor  # (N, 1, 16, 16), float32, roughly zero-mean unit-variance
    labels: torch.Tensor  # (N,), int64

    def batches(self, size: int, shuffle: bool = False, seed: int = 0):
        order = torch.randperm(len(self.labels), generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(len(self.labels))
        for start in range(0, len(order), size):
            index = order[start : start + size]
            yield self.images[index], self.labels[index]


def load_digits_split(test_fraction: float = 0.3, seed: int = 0) -> tuple[Split, Split]:
    """scikit-learn's digits (1797 images), split into train and test sets deterministically."""
    from sklearn.datasets import load_digits

    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(16, 16), mode="bilinear", align_corners=False)
    images = (images - 0.5) / 0.5
    labels = torch.tensor(data.target, dtype=torch.int64)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    cut = int(len(labels) * (1 - test_fraction))
    train, test = order[:cut], order[cut:]
    return Split(images[train], labels[train]), Split(images[test], labels[test])


class DigitsCNN(nn.Module):
    """A VGG-style CNN: 3x3 conv blocks, max pooling, a two-layer classifier."""

    def __init__(self, width: int = 32, classes: int = 10):
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(w, w, 3, padding=1), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )  # fmt: skip
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(2 * w * 16, 128), nn.ReLU(inplace=True), nn.Linear(128, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def train_classifier(model: nn.Module, data: Split, epochs: int = 10, lr: float = 1e-3, batch_size: int = 64, seed: int = 0) -> nn.Module:
    """Plain cross-entropy training with Adam; returns the model (trained in place)."""
    torch.manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for epoch in range(epochs):
        for images, labels in data.batches(batch_size, shuffle=True, seed=seed + epoch):
            optimizer.zero_grad()
            F.cross_entropy(model(images), labels).backward()
            optimizer.step()
    return model.eval()


@torch.no_grad()
def logits(model: nn.Module, data: Split, batch_size: int = 256) -> torch.Tensor:
    """The model's logits (N, 10) on every image of ``data``, without gradients."""
    with torch.no_grad():
        return torch.cat([model(images) for images, _ in data.batches(batch_size)])


def logit_error(model: nn.Module, reference: torch.Tensor, data: Split) -> float:
    """||logits - reference|| / ||reference||: the relative L2 error of ``model``'s logits on ``data``
    against the original's (``reference = logits(original, data)``); unlike accuracy, it does not saturate."""
    return float((logits(model, data) - reference).norm() / reference.norm())


def accuracy(model: nn.Module, data: Split, batch_size: int = 256) -> float:
    was_training = model.training
    model.eval()
    correct = sum(int((model(images).argmax(1) == labels).sum()) for images, labels in data.batches(batch_size))
    model.train(was_training)
    return correct / len(data.labels)
