"""`decompose_layer`: one Linear or conv (Conv1d/2d/3d, ConvTranspose1d/2d/3d) in, one decomposed module of standard layers out.

Example::

    import fxdecomp, torch.nn as nn
    small = fxdecomp.decompose_layer(nn.Conv2d(64, 128, 3, padding=1), "tucker2", (32, 48))
"""

from __future__ import annotations

from typing import Any

from torch import nn

from .decomposers import get_decomposer
from .decomposers.base import inherit_trainable
from .layer_spec import check_finite, layer_spec
from .ranks import RankSpec, resolve_ranks
from .grad_mode import outside_inference_mode


def factorize_layer(layer: nn.Module, method: str, ranks: RankSpec = "full", **options: Any):
    """(spec, decomposer, state, ranks): the checked factorisation behind `decompose_layer`."""
    spec = layer_spec(layer)  # refuses layers other than Linear and Conv1d/2d/3d, ConvTranspose1d/2d/3d
    check_finite(type(layer).__name__, layer)
    decomposer = get_decomposer(spec.kind, method, **options)
    decomposer.check(spec)
    state = decomposer.factorize(spec, layer.weight.detach())
    return spec, decomposer, state, resolve_ranks(ranks, decomposer, spec, state)


@outside_inference_mode
def decompose_layer(layer: nn.Module, method: str, ranks: RankSpec = "full", **options: Any) -> nn.Module:
    """Decompose ``layer`` with ``method`` at ``ranks``; the layer itself is left untouched.

    ``ranks`` follow the data flow, input side first (see `fxdecomp.ranks`); ``"full"``
    builds the decomposed structure at maximum rank, which reproduces the layer.
    ``options`` go to the method (``tiles=(2, 2)`` for tiled_svd, ``cores=3`` or
    ``modes=((8, 8, 8), (4, 4, 4))`` for Linear tt, ``max_iter``/``tol``/``seed`` for cp).
    The result has the layer's dtype, device and training mode.
    """
    spec, decomposer, state, chosen = factorize_layer(layer, method, ranks, **options)
    weight = layer.weight.detach()
    module = decomposer.build(spec, state, chosen, layer.bias.detach() if layer.bias is not None else None, weight)
    inherit_trainable(module, layer)
    module.train(layer.training)
    module.fxdecomp_method, module.fxdecomp_ranks = method, chosen
    return module
