"""Keep mode's checks that the user's model with its layers swapped is the result: each decomposed module
maps the features of the layer it replaces (`check_shape`), and the model computes what
``result.graph_module`` computes on the example inputs (`check_outputs`), both run in eval mode
with every submodule's mode restored.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from .errors import FxDecompError, InvalidInputError, UnsupportedLayerError
from .graph.effects import eval_mode
from .layer_spec import LAYER_TYPES
from .transformers_layers import is_conv1d


def check_shape(name: str, layer: nn.Module, decomposed: nn.Module) -> None:
    """`InvalidInputError` when ``decomposed`` does not map the features ``layer`` maps (a result applied to another model)."""
    weight = layer.weight
    first = next((m for m in decomposed.modules() if isinstance(m, LAYER_TYPES)), None)
    last = [m for m in decomposed.modules() if isinstance(m, LAYER_TYPES)]
    if first is None:
        return  # TT / tiled layers: checked by the outputs
    if isinstance(layer, nn.Linear) or is_conv1d(layer):
        in_features, out_features = (weight.shape[1], weight.shape[0]) if isinstance(layer, nn.Linear) else weight.shape
        got = (getattr(first, "in_features", None), getattr(last[-1], "out_features", None))
        if got != (in_features, out_features):
            raise InvalidInputError(
                f"layer {name!r} maps {in_features} -> {out_features} features in this model, but the result's "
                f"decomposed module maps {got[0]} -> {got[1]}: apply the result to the model it was compressed from"
            )


def first_tensor(output) -> torch.Tensor | None:
    """The first tensor of a model's output: in nested containers, pytree nodes (transformers' ModelOutput) and
    plain dataclasses, which pytree does not open."""
    if dataclasses.is_dataclass(output) and not isinstance(output, type):
        output = [getattr(output, f.name) for f in dataclasses.fields(output)]
    for leaf in tree_leaves(output):
        found = leaf if isinstance(leaf, torch.Tensor) else first_tensor(leaf) if dataclasses.is_dataclass(leaf) else None
        if found is not None:
            return found
    return None


def check_outputs(gm: nn.Module, new: nn.Module, example_inputs, rtol: float, atol: float) -> None:
    """`FxDecompError` unless ``new`` computes what ``gm`` computes on ``example_inputs`` (first output tensor)."""
    args = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []  # manual_seed seeds them all
    # One random stream for both runs, the caller's left as it was: a model that draws in eval mode (SpeechT5's
    # prenet keeps its dropout on) computes the same function from the same draws.
    # Both in eval mode, each left in its own: a graph_module set to train() for fine-tuning would draw dropout and
    # update its BatchNorm statistics on the check's batch.
    with torch.no_grad(), torch.random.fork_rng(devices=cuda), eval_mode(gm), eval_mode(new):
        torch.manual_seed(0)
        want = first_tensor(gm(*args))
        try:
            torch.manual_seed(0)
            got = first_tensor(new(*args))
        except (AttributeError, UnsupportedLayerError) as exc:  # model code reads what a swapped layer lacks
            raise FxDecompError(
                f"{type(new).__name__} reads a swapped layer's weight values or an attribute it lacks outside that "
                f"layer's forward ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); exclude that "
                "layer when compressing (compress(..., exclude=[name])) to keep the model, or use result.graph_module"
            ) from exc
    if want is None or got is None or got.shape != want.shape or not torch.allclose(got, want, rtol=rtol, atol=atol):
        diff = float((got - want).abs().max()) if got is not None and want is not None and got.shape == want.shape else None
        raise FxDecompError(
            "the model with its layers swapped does not compute what result.graph_module computes "
            f"(max abs diff {diff}); a swapped layer's weight may also be read outside its forward "
            "(tied or functional use): exclude that layer, or use result.graph_module"
        )
