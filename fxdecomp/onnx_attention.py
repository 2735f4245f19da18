"""Attention written out for ONNX export: a graph's scaled_dot_product_attention calls as the math kernel.

torch.onnx's dynamo exporter re-traces a graph and then decomposes it. Where a graph
calls ``scaled_dot_product_attention`` on non-contiguous heads (T5 with its default
SDPA attention, any ``q.transpose(1, 2)`` fed straight in) and reshapes the transposed
result, the first trace records a ``view`` that is valid for the fused kernel's
output strides, and the decomposition's math output then cannot be viewed: the export
fails with "Cannot view a tensor with shape ... and strides ..." (pytorch/pytorch#136543,
still in torch 2.13). Calling ``aten._scaled_dot_product_attention_math`` (torch's own
math reference, which the decomposition produces anyway) from the start gives the
first trace the strides the decomposition will have.

`with_math_attention` rewrites a copy of the graph that shares the module's parameters,
buffers and submodules; the module itself is not changed.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import fx

# F.scaled_dot_product_attention's parameters in order; aten's schema has the last two keyword-only.
_SDPA_PARAMETERS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_SDPA_TARGETS = (F.scaled_dot_product_attention, torch.ops.aten.scaled_dot_product_attention.default)


def math_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    """`F.scaled_dot_product_attention` (same arguments and shapes: (..., L, E) queries, (..., S, E) keys,
    (..., S, Ev) values, (..., L, Ev) out) computed by torch's math kernel.

    The math kernel adds a mask as it is; SDPA reads a boolean mask as "attend where True",
    so a boolean mask becomes 0 / -inf first, as SDPA does before choosing a kernel.
    """
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        attn_mask = torch.zeros_like(attn_mask, dtype=query.dtype).masked_fill(~attn_mask, float("-inf"))
    return torch.ops.aten._scaled_dot_product_attention_math(
        query, key, value, attn_mask, dropout_p, is_causal, scale=scale, enable_gqa=enable_gqa
    )[0]


def has_attention(gm: fx.GraphModule) -> bool:
    """Whether ``gm``'s graph calls scaled_dot_product_attention (functional or aten form)."""
    return any(node.op == "call_function" and node.target in _SDPA_TARGETS for node in gm.graph.nodes)


def with_math_attention(gm: fx.GraphModule) -> fx.GraphModule:
    """A GraphModule like ``gm`` whose scaled_dot_product_attention calls are `math_attention` calls.

    Same outputs (the math kernel is torch's reference implementation; float32 agrees to rounding).
    ``gm``'s graph, parameters and ``meta`` are left as they were: the copy shares the parameters,
    buffers and leaf modules, and copies ``meta``. Raises nothing of its own; a graph without
    attention comes back as an equal copy.
    """
    graph = copy.deepcopy(gm.graph)  # keeps the codegen (torch.export graphs take and return pytrees)
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in _SDPA_TARGETS:
            continue
        bound = dict(zip(_SDPA_PARAMETERS, node.args))
        bound.update(node.kwargs)
        with graph.inserting_after(node):
            output = graph.call_function(math_attention, (), bound)
        output.meta = dict(node.meta)
        node.replace_all_uses_with(output)
        graph.erase_node(node)
    rewritten = fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    rewritten.meta = dict(getattr(gm, "meta", {}))
    return rewritten
