"""The graphs users bring (issue 13): in-place side effects, several weights behind one module,
a tied output head, multi-head attention.

Example::

    model, x = Holder().eval(), torch.randn(2, 5, 32)     # three functional weights: attn.wq, attn.wk, attn.wv
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

def _add_into(t: torch.Tensor, value: float) -> torch.Tensor:
    """Writes into ``t``: a function torch.fx does not trace into (torchvision MViT's ``_add_shortcut``, ``x.add_(q)``)."""
    t.add_(value)
    return t


torch.fx.wrap("_add_into")


class SideEffect(nn.Module):
    """conv ``a`` (3 -> 8, 3x3) -> an in-place op of kind ``form`` whose result is not used -> conv ``b`` (8 -> 8).

    ``form``: ``"mul_"`` (issue 13's example), ``"torch.relu_"``, ``"copy_"``, ``"index_put_"``, ``"setitem"``,
    ``"inplace_kwarg"``, ``"inplace_module"``, ``"buffer"`` (a buffer updated in place), ``"input_mul_"``
    (the input itself) or ``"wrapped"`` (an ``fx.wrap``'d function that writes into its argument). Input (N, 3, 8, 8).
    """

    def __init__(self, form: str):
        super().__init__()
        self.form = form
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.act = nn.ReLU(inplace=True)
        self.register_buffer("scale", torch.ones(()))

    def forward(self, x):
        if self.form == "input_mul_":
            x.mul_(2.0)
        t = self.a(x)
        if self.form == "mul_":
            t.mul_(2.0)
        elif self.form == "torch.relu_":
            torch.relu_(t)
        elif self.form == "copy_":
            t.copy_(t * 3.0)
        elif self.form == "index_put_":
            t.index_put_((torch.tensor([0]),), torch.zeros(8, 8, 8))
        elif self.form == "setitem":
            t[:, 0] = 0.0
        elif self.form == "inplace_kwarg":
            F.relu(t, inplace=True)
        elif self.form == "inplace_module":
            self.act(t)
        elif self.form == "wrapped":
            _add_into(t, 1.0)
        elif self.form == "buffer":
            self.scale.add_(1.0)
            t = t * self.scale
        return self.b(t)


class QKV(nn.Module):
    """Three (d, d) weights applied with F.linear in one module's forward."""

    def __init__(self, d=32):
        super().__init__()
        self.wq, self.wk, self.wv = (nn.Parameter(torch.randn(d, d) / d**0.5) for _ in range(3))

    def forward(self, x):
        return F.linear(x, self.wq) * F.linear(x, self.wk).sigmoid() + F.linear(x, self.wv)


class Holder(nn.Module):
    """`QKV` as a submodule ``attn``: its weights are named ``attn.wq``, ``attn.wk``, ``attn.wv``. Input (..., 32)."""

    def __init__(self):
        super().__init__()
        self.attn = QKV()

    def forward(self, x):
        return self.attn(x)


class TiedLM(nn.Module):
    """Embedding -> two Linears -> an output head sharing the embedding's weight (``F.linear`` when ``functional``)."""

    def __init__(self, functional, vocab=200, d=32, hidden=128):
        super().__init__()
        self.functional = functional
        self.emb = nn.Embedding(vocab, d)
        self.up, self.down = nn.Linear(d, hidden), nn.Linear(hidden, d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        h = self.down(torch.relu(self.up(self.emb(ids))))
        return F.linear(h, self.emb.weight) if self.functional else self.head(h)


class AttentionNet(nn.Module):
    """nn.MultiheadAttention (batch first) then a Linear; input (N, L, d)."""

    def __init__(self, d=64, heads=4, need_weights=False):
        super().__init__()
        self.need_weights = need_weights
        self.att = nn.MultiheadAttention(d, heads, batch_first=True)
        self.fc = nn.Linear(d, d)

    def forward(self, x):
        return self.fc(self.att(x, x, x, need_weights=self.need_weights)[0])
