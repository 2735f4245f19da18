"""A decomposed ``nn.MultiheadAttention`` input projection in the user's own model (keep-the-model mode).

`fxdecomp.graph.attention` makes an eligible ``nn.MultiheadAttention`` (packed
``in_proj_weight``, no ``bias_k`` / ``bias_v`` / ``add_zero_attn``) visible to the
capture, so its packed input projection is a candidate named ``<mha>.in_proj_weight``
(torchvision's ViT: ``encoder.layers.encoder_layer_0.self_attention.in_proj_weight``).
That weight is not a module, and the attention's own forward hands ``in_proj_weight``
and ``out_proj.weight`` to ``F.multi_head_attention_forward``, so keep-the-model mode
cannot swap either projection like a Linear: `KeptAttention` takes the attention
module's place instead, wherever either was decomposed. It holds the input projection
as a child ``in_proj``: the decomposed one as a `KeptLayer` (its ``weight`` / ``bias``
answer ``in_proj_weight`` / ``in_proj_bias`` as `AbsentWeight`), or a Linear with the
attention's own packed weight. It keeps ``out_proj`` (swapped where it was decomposed), the attention's configuration (``embed_dim``,
``num_heads``, ``batch_first``, ...) and its call signature, and computes what
`torch.nn.functional.multi_head_attention_forward` computes in eval mode, through
the same `attention_core` as the captured graph.

Self-attention (``query is key is value``) projects once; any other call projects
each of query, key and value with the whole decomposed projection and keeps its third
(correct, at three times that projection's cost). No attention dropout is applied, in
training mode either.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from .graph.attention import attention_core
from .kept_layer import KeptLayer

_CONFIGURATION = ("embed_dim", "kdim", "vdim", "num_heads", "dropout", "batch_first", "head_dim", "add_zero_attn")


def in_projection_like(mha: nn.MultiheadAttention) -> nn.Linear:
    """A Linear (on the meta device) with the shapes of ``mha``'s packed input projection, for `KeptLayer`."""
    return nn.Linear(mha.embed_dim, 3 * mha.embed_dim, bias=mha.in_proj_bias is not None, device="meta", dtype=mha.in_proj_weight.dtype)


class KeptAttention(nn.Module):
    """``nn.MultiheadAttention`` with a decomposed projection (``in_proj`` and / or ``out_proj``); see the module docstring.

    Inputs and outputs as ``nn.MultiheadAttention.forward``: (query (L, N, E) or (N, L, E) with
    ``batch_first``, key, value, key_padding_mask, need_weights, attn_mask, average_attn_weights,
    is_causal) -> (output, attention weights or None).
    """

    __jit_unused_properties__ = ["in_proj_weight", "in_proj_bias"]

    def __init__(self, mha: nn.MultiheadAttention, in_proj: nn.Module):
        super().__init__()
        for attribute in _CONFIGURATION:
            setattr(self, attribute, getattr(mha, attribute))
        # nn.TransformerEncoder(Layer) checks this before its fused fast path, which reads in_proj_weight's values
        # (absent here): False keeps it on this forward.
        self._qkv_same_embed_dim = False
        self.bias_k = self.bias_v = None
        self.in_proj = in_proj
        self.out_proj = mha.out_proj
        self.train(mha.training)

    @property
    def in_proj_weight(self) -> torch.Tensor:
        """The packed projection's shape (3E, E), with the factors' dtype and device; no data."""
        return self.in_proj.weight

    @property
    def in_proj_bias(self) -> torch.Tensor | None:
        return self.in_proj.bias

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, key_padding_mask: Optional[torch.Tensor] = None,
                need_weights: bool = True, attn_mask: Optional[torch.Tensor] = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        e = self.embed_dim
        if query is key and key is value:
            q, k, v = self.in_proj(query).chunk(3, dim=-1)
        else:
            q, k, v = self.in_proj(query)[..., :e], self.in_proj(key)[..., e : 2 * e], self.in_proj(value)[..., 2 * e :]
        out, weights = attention_core(
            q, k, v, self.num_heads, self.batch_first, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal
        )
        return self.out_proj(out), weights
