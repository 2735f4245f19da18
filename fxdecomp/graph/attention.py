"""nn.MultiheadAttention with its projections visible to torch.fx, so that they are candidates like any Linear.

torch.fx keeps nn.MultiheadAttention as one opaque leaf (and cannot trace
`F.multi_head_attention_forward`, which branches on tensor shapes), so its packed
input projection ``in_proj_weight`` and its ``out_proj`` would never be
decomposed. Before capture, `functional_attention` swaps each eligible MHA of
the private copy for `FunctionalMultiheadAttention`, which holds the SAME
parameters under the same names and computes, in eval mode, what
`F.multi_head_attention_forward` computes:

- self-attention (``query is key is value``): ``F.linear(x, in_proj_weight,
  in_proj_bias)``, a functional candidate named ``<mha>.in_proj_weight``
  (cross-attention slices the packed weight: those projections stay as they are);
- the attention itself (scaling, masks, softmax or SDPA) in `attention_core`,
  a function torch.fx keeps as one call (``torch.fx.wrap``);
- ``out_proj``, a Linear module candidate named ``<mha>.out_proj``.

Modules with ``bias_k``/``bias_v``, ``add_zero_attn`` or separate q/k/v weights
(``kdim``/``vdim`` differ) are left as they are. Source: torch 2.13's
`torch.nn.functional.multi_head_attention_forward`, mirrored step by step.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import fx, nn


def attention_core(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, batch_first: bool,
                   key_padding_mask: Optional[torch.Tensor] = None, need_weights: bool = True,
                   attn_mask: Optional[torch.Tensor] = None, average_attn_weights: bool = True,
                   is_causal: bool = False) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Multi-head attention on projected q (..., L, E), k, v (..., S, E) in the module's layout.

    Returns (output before out_proj, in the input layout; averaged or per-head
    weights, or None). Eval mode: no dropout. Mirrors F.multi_head_attention_forward.
    TorchScript compiles it (`fxdecomp.kept_attention.KeptAttention` calls it).
    """
    batched = q.dim() == 3
    if not batched:
        q, k, v = q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.unsqueeze(0)
    elif batch_first:
        q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
    tgt_len, bsz, embed_dim = q.shape
    src_len = k.shape[0]
    head_dim = embed_dim // num_heads
    key_padding_mask = F._canonical_mask(
        mask=key_padding_mask, mask_name="key_padding_mask", other_type=F._none_or_dtype(attn_mask),
        other_name="attn_mask", target_type=q.dtype,
    )
    if is_causal and attn_mask is None:
        raise RuntimeError("Need attn_mask if specifying the is_causal hint.")
    if is_causal and key_padding_mask is None and not need_weights:
        attn_mask = None
    else:
        attn_mask = F._canonical_mask(
            mask=attn_mask, mask_name="attn_mask", other_type=None, other_name="", target_type=q.dtype, check_other=False
        )
        if key_padding_mask is not None:
            is_causal = False
    if attn_mask is not None and attn_mask.dim() == 2:
        attn_mask = attn_mask.unsqueeze(0)
    q = q.reshape(tgt_len, bsz * num_heads, head_dim).transpose(0, 1)
    k = k.reshape(src_len, bsz * num_heads, head_dim).transpose(0, 1)
    v = v.reshape(src_len, bsz * num_heads, head_dim).transpose(0, 1)
    if key_padding_mask is not None:
        key_padding_mask = key_padding_mask.view(bsz, 1, 1, src_len).expand(-1, num_heads, -1, -1).reshape(bsz * num_heads, 1, src_len)
        attn_mask = key_padding_mask if attn_mask is None else attn_mask + key_padding_mask
    weights: Optional[torch.Tensor] = None
    if need_weights:
        q_scaled = q * math.sqrt(1.0 / float(head_dim))
        if attn_mask is not None:
            scores = torch.baddbmm(attn_mask, q_scaled, k.transpose(-2, -1))
        else:
            scores = torch.bmm(q_scaled, k.transpose(-2, -1))
        probabilities = torch.softmax(scores, dim=-1)
        out = torch.bmm(probabilities, v).transpose(0, 1).reshape(tgt_len, bsz, embed_dim)
        probabilities = probabilities.view(bsz, num_heads, tgt_len, src_len)
        if average_attn_weights:
            probabilities = probabilities.mean(dim=1)
        if not batched:
            probabilities = probabilities.squeeze(0)
        weights = probabilities
    else:
        if attn_mask is not None:
            attn_mask = attn_mask.unsqueeze(0) if attn_mask.size(0) == 1 and attn_mask.dim() == 3 else attn_mask.view(bsz, num_heads, -1, src_len)
        q, k, v = q.reshape(bsz, num_heads, -1, head_dim), k.reshape(bsz, num_heads, -1, head_dim), v.reshape(bsz, num_heads, -1, head_dim)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask, 0.0, is_causal)
        out = out.permute(2, 0, 1, 3).reshape(tgt_len, bsz, embed_dim)
    if not batched:
        out = out.squeeze(1)
    elif batch_first:
        out = out.transpose(0, 1)
    return out, weights


fx.wrap("attention_core")


class FunctionalMultiheadAttention(nn.Module):
    """An eval-mode nn.MultiheadAttention whose projections torch.fx sees (same parameters, same names)."""

    def __init__(self, mha: nn.MultiheadAttention):
        super().__init__()
        self.embed_dim, self.num_heads, self.batch_first = mha.embed_dim, mha.num_heads, mha.batch_first
        # nn.TransformerEncoder(Layer) reads this before its fused fast path, which would bypass this forward: False
        # keeps it on the path this module computes (torch's own MHA with separate q/k/v weights takes it too).
        self._qkv_same_embed_dim = False
        self.in_proj_weight = mha.in_proj_weight
        self.in_proj_bias = mha.in_proj_bias
        self.out_proj = mha.out_proj
        self.train(mha.training)

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        if query is key and key is value:
            q, k, v = F.linear(query, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        else:
            w_q, w_k, w_v = self.in_proj_weight.chunk(3)
            b_q, b_k, b_v = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None, None, None)
            q, k, v = F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)
        out, weights = attention_core(
            q, k, v, self.num_heads, self.batch_first, key_padding_mask, need_weights, attn_mask, average_attn_weights, is_causal
        )
        return self.out_proj(out), weights


def packed(module: nn.Module | None) -> bool:
    """An nn.MultiheadAttention that `attention_core` computes (in eval mode): one packed q/k/v projection,
    no ``bias_k`` / ``bias_v``, no ``add_zero_attn``. `fxdecomp.kept_attention.KeptAttention` holds these too."""
    return (
        type(module) is nn.MultiheadAttention
        and module._qkv_same_embed_dim
        and module.bias_k is None
        and module.bias_v is None
        and not module.add_zero_attn
    )


def eligible(module: nn.Module) -> bool:
    """An nn.MultiheadAttention that `FunctionalMultiheadAttention` reproduces exactly: `packed`, in eval mode."""
    return packed(module) and not module.training


def functional_attention(model: nn.Module) -> nn.Module:
    """Swap, in place, every eligible nn.MultiheadAttention of ``model`` (a private eval copy) for the functional form."""
    if eligible(model):
        return FunctionalMultiheadAttention(model)
    for name, child in list(model.named_children()):
        replaced = functional_attention(child)
        if replaced is not child:
            setattr(model, name, replaced)
    return model
