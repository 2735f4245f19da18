"""Perplexity of a causal language model on a token stream, in windows.

Every token after the first is scored exactly once: the stream's targets are
cut into runs of ``stride`` tokens, and each run is predicted from a window of
at most ``window`` tokens that ends with it, so a target sees up to
``window - stride`` tokens of context before its run (the sliding-window
evaluation of the Hugging Face perplexity guide, without its skipped boundary
tokens).

Example::

    ppl = perplexity(model, ids, window=256)          # ids: (tokens,) int64
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import InvalidInputError


@torch.no_grad()
def perplexity(model: nn.Module, ids: torch.Tensor, window: int = 256, stride: int | None = None) -> float:
    """exp(mean negative log-likelihood per target) of ``ids`` (shape (tokens,)) under ``model``.

    ``stride`` (default ``window // 2``) targets are scored per forward pass, on a
    window of ``window`` tokens. ``model(input_ids)`` returns logits (1, length, vocab)
    or an object with ``.logits``. Raises `InvalidInputError` for fewer than two
    tokens or a stride outside [1, window - 1].
    """
    ids = ids.reshape(-1)
    stride = stride or max(window // 2, 1)
    if ids.numel() < 2 or not 1 <= stride <= window - 1:
        raise InvalidInputError(f"need at least 2 tokens and 1 <= stride <= window - 1; got {ids.numel()} tokens, stride {stride}, window {window}")
    total, first = 0.0, 1
    while first < ids.numel():
        last = min(first + stride, ids.numel())  # targets first .. last - 1
        begin = max(0, last - window)
        output = model(ids[begin:last].unsqueeze(0))
        logits = getattr(output, "logits", output)[0]
        total += float(F.cross_entropy(logits[first - 1 - begin : last - 1 - begin].float(), ids[first:last], reduction="sum"))
        first = last
    return math.exp(total / (ids.numel() - 1))
