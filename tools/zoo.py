"""VGG-16 and ResNet-50 as torchvision defines them (torchvision is not installed), with realistic spectra.

The definitions follow torchvision 0.19 layer for layer (module names included:
``features.28``, ``layer3.2.conv2``, ``classifier.0``), so plans and ONNX graphs
read the same. Weights are random, seeded, and then reshaped so a low-rank plan
means something: trained layers have decaying spectra, fresh random ones flat.
`with_power_law_spectra` gives every layer singular values falling as k^-alpha:

- a Linear weight becomes exactly U diag(s) V^T, s_k = k^-alpha, with U and V
  random orthonormal columns (of a random-signed orthonormal DCT basis: exact,
  and seconds instead of minutes for VGG's 4096 x 25088 classifier);
- a Conv kernel (T, S, kh, kw) becomes a Gaussian core multiplied on its output
  mode by U_T diag(k^-alpha) and on its input mode by U_S diag(k^-alpha) (U random
  orthogonal, as above), so every unfolding decays: the lowered T x (S kh kw) matrix
  (svd, tiled_svd), both channel modes (tucker2), the spatial matrix (spatial_svd).

Every weight is then scaled to the Frobenius norm torchvision's initialisation
gives it (Kaiming normal, fan_out, for convs; N(0, 0.01) for VGG's Linear layers;
PyTorch's default for ResNet's fc), so activations keep their usual scale.

Example::

    from tools.zoo import build
    model = build("vgg16")          # eval mode, seed 0, alpha 0.7
    model(torch.randn(1, 3, 224, 224)).shape  # (1, 1000)
"""

from __future__ import annotations

import numpy as np
import scipy.fft
import torch
from torch import nn

VGG16_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


class VGG(nn.Module):
    """torchvision.models.vgg16 (configuration D, no batch norm)."""

    def __init__(self, cfg=VGG16_CFG, num_classes: int = 1000):
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(channels, v, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
                channels = v
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 4096),
            nn.ReLU(True),
            nn.Dropout(p=0.5),
            nn.Linear(4096, 4096),
            nn.ReLU(True),
            nn.Dropout(p=0.5),
            nn.Linear(4096, num_classes),
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.constant_(m.bias, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


class Bottleneck(nn.Module):
    """torchvision's ResNet v1.5 bottleneck: the stride sits on the 3x3 conv."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        return self.relu(out + identity)


class ResNet(nn.Module):
    """torchvision.models.resnet50: Bottleneck blocks [3, 4, 6, 3]."""

    def __init__(self, layers=(3, 4, 6, 3), num_classes: int = 1000):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(64, layers[0])
        self.layer2 = self._make_layer(128, layers[1], stride=2)
        self.layer3 = self._make_layer(256, layers[2], stride=2)
        self.layer4 = self._make_layer(512, layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * Bottleneck.expansion, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * Bottleneck.expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * Bottleneck.expansion, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * Bottleneck.expansion),
            )
        layers = [Bottleneck(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * Bottleneck.expansion
        layers += [Bottleneck(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc(x)


def vgg16(num_classes: int = 1000) -> nn.Module:
    return VGG(VGG16_CFG, num_classes)


def resnet50(num_classes: int = 1000) -> nn.Module:
    return ResNet((3, 4, 6, 3), num_classes)


MODELS = {"vgg16": vgg16, "resnet50": resnet50}


# ---- spectra ----------------------------------------------------------------------------


def power_law(n: int, alpha: float) -> np.ndarray:
    return np.arange(1, n + 1, dtype=np.float64) ** -alpha


def _dct_columns(n: int, chosen: np.ndarray, weights: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """n x len(chosen): the ``chosen`` columns of a random-signed orthonormal DCT basis, scaled by ``weights``.

    Exactly orthonormal columns, in O(n^2 log n): no QR of large Gaussians.
    """
    picked = np.zeros((n, len(chosen)), dtype=np.float32)
    picked[chosen, np.arange(len(chosen))] = weights
    basis = scipy.fft.idct(picked, axis=0, norm="ortho", workers=1)
    return basis * rng.choice(np.array([-1.0, 1.0], dtype=np.float32), n)[:, None]


def spectral_matrix(rows: int, cols: int, alpha: float, rng: np.random.Generator) -> np.ndarray:
    """A rows x cols float32 matrix U diag(k^-alpha) V^T with exactly that spectrum.

    U and V are random columns of random-signed orthonormal DCT bases: U diag(s)
    is built at rows x k, then one DCT along the columns gives the product with V^T.
    """
    k = min(rows, cols)
    left = _dct_columns(rows, rng.permutation(rows)[:k], power_law(k, alpha), rng)  # U diag(s)
    embedded = np.zeros((rows, cols), dtype=np.float32)
    embedded[:, rng.permutation(cols)[:k]] = left
    signs = rng.choice(np.array([-1.0, 1.0], dtype=np.float32), cols)
    return scipy.fft.idct(embedded, axis=1, norm="ortho", workers=1) * signs[None, :]


def spectral_kernel(shape: tuple[int, ...], alpha: float, rng: np.random.Generator) -> np.ndarray:
    """A conv kernel (T, S, kh, kw): Gaussian core x_T U_T diag(k^-alpha) x_S U_S diag(k^-alpha)."""
    t, s = shape[:2]
    core = rng.standard_normal(shape, dtype=np.float32)
    out_mode = _dct_columns(t, rng.permutation(t), power_law(t, alpha), rng)
    in_mode = _dct_columns(s, rng.permutation(s), power_law(s, alpha), rng)
    return np.einsum("ta,abhw,sb->tshw", out_mode, core, in_mode, optimize=True).astype(np.float32)


@torch.no_grad()
def with_power_law_spectra(model: nn.Module, alpha: float = 0.7, seed: int = 0) -> nn.Module:
    """Give every ungrouped Conv2d and every Linear a k^-alpha spectrum, keeping each weight's norm. In place."""
    rng = np.random.default_rng(seed)
    for module in model.modules():
        if isinstance(module, nn.Linear):
            new = spectral_matrix(module.out_features, module.in_features, alpha, rng)
        elif isinstance(module, nn.Conv2d) and module.groups == 1:
            new = spectral_kernel(tuple(module.weight.shape), alpha, rng)
        else:
            continue
        weight = module.weight
        scale = float(weight.norm()) / max(float(np.linalg.norm(new)), 1e-30)
        weight.copy_(torch.from_numpy(new * scale))
    return model


def build(name: str, seed: int = 0, alpha: float = 0.7, num_classes: int = 1000) -> nn.Module:
    """``name`` ("vgg16" or "resnet50"), seeded torchvision init, k^-alpha spectra, eval mode."""
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; known: {sorted(MODELS)}")
    torch.manual_seed(seed)
    model = MODELS[name](num_classes)
    with_power_law_spectra(model, alpha, seed)
    return model.eval()


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


if __name__ == "__main__":
    for model_name in MODELS:
        net = build(model_name)
        print(model_name, f"{parameter_count(net) / 1e6:.1f} M parameters", tuple(net(torch.randn(1, 3, 224, 224)).shape))
