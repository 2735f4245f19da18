"""Hypothesis strategies shared by the tests: every Conv2d attribute the exactness tests cover."""

from __future__ import annotations

import torch
from hypothesis import strategies as st
from torch import nn


@st.composite
def conv_layers(draw, in_channels=None):
    """A Conv2d with random groups, channels, kernel, dilation, padding (mode, 'same'/'valid', asymmetric sizes), stride, bias and weights.

    ``in_channels`` fixes the input channels (groups then divide them), to chain layers.
    """
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    if in_channels is not None:
        groups = groups if in_channels % groups == 0 else 1
        in_ch = in_channels
    else:
        in_ch = groups * draw(st.integers(1, 4))
    out_ch = groups * draw(st.integers(1, 4))
    kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    mode = draw(st.sampled_from(["zeros", "reflect", "replicate", "circular"]))
    if draw(st.booleans()):
        padding, stride = draw(st.sampled_from(["same", "valid"])), (1, 1)
    else:
        padding = (draw(st.integers(0, 2)), draw(st.integers(0, 2)))
        stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    bias = draw(st.booleans())
    torch.manual_seed(draw(st.integers(0, 2**16)))
    return nn.Conv2d(in_ch, out_ch, (kh, kw), stride, padding, dilation, groups, bias, mode)
