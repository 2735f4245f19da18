"""Small models built of the conv kinds beyond Conv2d: Conv1d (audio), Conv3d (video), ConvTranspose2d (decoder).

Example::

    for name, model, x in end_to_end_cases():       # seeded: the same weights and inputs every call
        fxdecomp.compress(model, (x,), budget=0.5)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class AudioFrontEnd(nn.Module):
    """A wav2vec2-style feature encoder: strided Conv1d stack, a grouped 'same' conv, a Linear head."""

    def __init__(self):
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv1d(1, 32, 10, stride=5), nn.Conv1d(32, 32, 3, stride=2), nn.Conv1d(32, 32, 2, stride=2)])
        self.pos = nn.Conv1d(32, 32, 8, padding="same", groups=4)
        self.head = nn.Linear(32, 16)

    def forward(self, wave):
        x = wave
        for conv in self.convs:
            x = F.gelu(conv(x))
        x = x + self.pos(x)
        return self.head(x.transpose(1, 2))


class VideoNet(nn.Module):
    """An r3d-style stem and block: Conv3d only."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv3d(3, 16, (3, 7, 7), stride=(1, 2, 2), padding=(1, 3, 3), bias=False)
        self.conv1 = nn.Conv3d(16, 32, 3, padding=1, bias=False)
        self.conv2 = nn.Conv3d(32, 32, 3, padding=1, bias=False)
        self.down = nn.Conv3d(16, 32, 1, bias=False)

    def forward(self, clip):
        x = torch.relu(self.stem(clip))
        return torch.relu(self.conv2(torch.relu(self.conv1(x))) + self.down(x))


class Decoder(nn.Module):
    """A segmentation-style decoder: ConvTranspose2d upsampling (one grouped, one with output_padding)."""

    def __init__(self):
        super().__init__()
        self.up1 = nn.ConvTranspose2d(32, 32, 4, stride=2, padding=1)
        self.up2 = nn.ConvTranspose2d(32, 16, 3, stride=2, padding=1, output_padding=1, groups=2)
        self.out = nn.Conv2d(16, 3, 3, padding=1)

    def forward(self, z):
        return self.out(torch.relu(self.up2(torch.relu(self.up1(z)))))


def end_to_end_cases() -> list[tuple[str, nn.Module, torch.Tensor]]:
    """(name, model in eval mode, example input) of the three models, seeded with 0.

    Inputs: a (2, 1, 800) waveform, a (1, 3, 4, 16, 16) clip, a (1, 32, 6, 6) feature map.
    """
    torch.manual_seed(0)
    return [
        ("audio Conv1d", AudioFrontEnd().eval(), torch.randn(2, 1, 800)),
        ("video Conv3d", VideoNet().eval(), torch.randn(1, 3, 4, 16, 16)),
        ("decoder ConvTranspose2d", Decoder().eval(), torch.randn(1, 32, 6, 6)),
    ]
