"""Small image models: the architectures fxdecomp must handle (plain convs, residual, inverted residual,
a ViT, functional calls, a layer called twice). Random weights; inputs (N, 3, 16, 16).

Example::

    cls, shape = image_models()["resnet"]
    model, x = cls().eval(), torch.randn(*shape)
"""

import torch
import torch.nn.functional as F
from torch import nn


class VGG(nn.Module):
    def __init__(self, widths=(16, "M", 32, "M", 32), classes=10):
        super().__init__()
        layers, channels = [], 3
        for w in widths:
            if w == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(channels, w, 3, padding=1), nn.ReLU(inplace=True)]
                channels = w
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(channels * 4 * 4, 64), nn.ReLU(), nn.Linear(64, classes))

    def forward(self, x):
        return self.classifier(self.features(x))


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)) if stride > 1 or cin != cout else nn.Identity()

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.down(x))


class ResNet(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.layers = nn.Sequential(BasicBlock(16, 16, 1), BasicBlock(16, 32, 2), BasicBlock(32, 48, 2))
        self.fc = nn.Linear(48, classes)

    def forward(self, x):
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.layers(self.stem(x)), 1), 1))


class InvertedResidual(nn.Module):
    def __init__(self, cin, cout, stride, expand=4):
        super().__init__()
        hidden = cin * expand
        self.block = nn.Sequential(
            nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(),
            nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout),
        )
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.block(x) if self.residual else self.block(x)


class MobileNetV2ish(nn.Module):
    def __init__(self, classes=10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU6())
        self.blocks = nn.Sequential(InvertedResidual(16, 16, 1), InvertedResidual(16, 24, 2), InvertedResidual(24, 24, 1))
        self.head = nn.Linear(24, classes)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


class Attention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = (q @ k.transpose(-2, -1) * (d // self.heads) ** -0.5).softmax(-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, d))


class ViT(nn.Module):
    def __init__(self, dim=48, depth=2, heads=4, classes=10, patch=4, image=16):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, patch, patch)
        self.pos = nn.Parameter(torch.randn(1, (image // patch) ** 2, dim) * 0.02)
        self.blocks = nn.ModuleList(
            nn.ModuleDict(dict(norm1=nn.LayerNorm(dim), attn=Attention(dim, heads), norm2=nn.LayerNorm(dim),
                               mlp=nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))))
            for _ in range(depth)
        )
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2) + self.pos
        for block in self.blocks:
            x = x + block["attn"](block["norm1"](x))
            x = x + block["mlp"](block["norm2"](x))
        return self.head(x.mean(1))


class Functional(nn.Module):
    """Calls F.conv2d, F.linear, torch.addmm and matmul on its own parameters."""

    def __init__(self):
        super().__init__()
        self.conv_weight = nn.Parameter(torch.randn(24, 3, 3, 3) * 0.2)
        self.conv_bias = nn.Parameter(torch.zeros(24))
        self.fc1_weight = nn.Parameter(torch.randn(64, 24 * 16) * 0.05)
        self.fc2_weight_t = nn.Parameter(torch.randn(64, 48) * 0.1)  # stored (in, out)
        self.fc2_bias = nn.Parameter(torch.zeros(48))
        self.fc3 = nn.Parameter(torch.randn(48, 10) * 0.1)

    def forward(self, x):
        x = F.relu(F.conv2d(x, self.conv_weight, self.conv_bias, stride=2, padding=1))
        x = F.adaptive_avg_pool2d(x, 4).flatten(1)
        x = F.relu(F.linear(x, self.fc1_weight))
        x = F.relu(torch.addmm(self.fc2_bias, x, self.fc2_weight_t))
        return torch.matmul(x, self.fc3)


class SharedLayer(nn.Module):
    """Calls one conv twice: it must be decomposed once and reused."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 3, padding=1)
        self.shared = nn.Conv2d(32, 32, 3, padding=1)
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = F.relu(self.shared(x))
        x = F.relu(self.shared(x))
        return self.head(x.mean((2, 3)))


def image_models() -> dict[str, tuple[type[nn.Module], tuple[int, ...]]]:
    """Name -> (model class, example input shape) of every model in this module."""
    return {
        "vgg": (VGG, (2, 3, 16, 16)),
        "resnet": (ResNet, (2, 3, 16, 16)),
        "mobilenetv2": (MobileNetV2ish, (2, 3, 16, 16)),
        "vit": (ViT, (2, 3, 16, 16)),
        "functional": (Functional, (2, 3, 16, 16)),
        "shared": (SharedLayer, (2, 3, 16, 16)),
    }
