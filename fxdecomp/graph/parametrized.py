"""A private copy of the user's model with every computed weight turned into a plain parameter.

Weights computed from other parameters, by `torch.nn.utils.parametrize`
(``parametrizations.weight_norm`` / ``spectral_norm`` / ``orthogonal``) or by
the old hook-based ``torch.nn.utils.weight_norm`` / ``spectral_norm`` (a
forward pre-hook recomputing ``weight`` from ``weight_g``/``weight_v`` or
``weight_orig``), or by a conv subclass's own forward (timm's weight-standardised
convs, `fxdecomp.graph.computed_conv`), are materialized in the copy at their eval-mode value: the
layer computes exactly what it computed, and the decomposers factor the
effective weight. After a training step the old hooks leave ``weight`` as a
non-leaf tensor that `copy.deepcopy` refuses; the copy takes a detached clone
of it instead. The user's model is never touched.

Example::

    copy, notes = private_copy(model)   # notes: {"0.weight": "weight_norm (hook) ...", ...}
"""

from __future__ import annotations

import copy
import weakref

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..errors import InvalidInputError
from .computed_conv import materialize_computed_convs

_NOTES: "weakref.WeakKeyDictionary[nn.Module, dict[str, str]]" = weakref.WeakKeyDictionary()


def _hooks():
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    return WeightNorm, SpectralNorm


def private_copy(model: nn.Module) -> tuple[nn.Module, dict[str, str]]:
    """(eval-mode deep copy of ``model`` with plain parameters for computed weights, {weight path: what it was}).

    Raises InvalidInputError naming the layer when a weight is a computed tensor
    that no known parametrization or hook produces (fxdecomp cannot know what it stands for).
    """
    weight_norm, spectral_norm = _hooks()
    memo: dict[int, torch.Tensor] = {}
    for name, module in model.named_modules():
        known = {h.name for h in module._forward_pre_hooks.values() if isinstance(h, (weight_norm, spectral_norm))}
        for attribute, value in vars(module).items():
            if isinstance(value, torch.Tensor) and not isinstance(value, nn.Parameter) and value.grad_fn is not None:
                if attribute not in known:
                    path = f"{name}.{attribute}" if name else attribute
                    raise InvalidInputError(
                        f"layer {name or type(model).__name__!r}: its tensor {path!r} is computed (it has a grad_fn) by "
                        "something fxdecomp does not know, so its effective value is unknown; use "
                        "torch.nn.utils.parametrize, or remove the hook, or exclude nothing and compute it before compress"
                    )
                memo[id(value)] = value.detach().clone()
    try:
        private = copy.deepcopy(model, memo)
    except RuntimeError as exc:
        raise InvalidInputError(
            f"cannot copy {type(model).__name__} ({str(exc).splitlines()[0]}); fxdecomp works on a private copy and never "
            "modifies the model: make it deep-copyable"
        ) from exc
    private.eval()
    return private, materialize(private)


def materialize(model: nn.Module) -> dict[str, str]:
    """Replace, in place, every parametrized or hook-computed weight of ``model`` by a plain Parameter of its value.

    Returns {weight path: description}; the same mapping is kept for `notes_of`.
    """
    weight_norm, spectral_norm = _hooks()
    notes: dict[str, str] = {}
    for name, module in list(model.named_modules()):
        prefix = f"{name}." if name else ""
        for hook in [h for h in module._forward_pre_hooks.values() if isinstance(h, (weight_norm, spectral_norm))]:
            kind = "weight_norm" if isinstance(hook, weight_norm) else "spectral_norm"
            with torch.no_grad():
                if kind == "weight_norm":
                    torch.nn.utils.remove_weight_norm(module, hook.name)
                else:
                    torch.nn.utils.remove_spectral_norm(module, hook.name)
            notes[prefix + hook.name] = f"{kind} (hook-based) materialized: its effective weight was factored and the {kind} is gone"
        if parametrize.is_parametrized(module):
            # deepcopy shares parametrize's per-module class with the user's module, and
            # remove_parametrizations deletes the property from that class: give the copy its own.
            cls = type(module)
            module.__class__ = type(cls.__name__, cls.__bases__, {k: v for k, v in vars(cls).items() if k not in ("__dict__", "__weakref__")})
            for tensor_name in list(module.parametrizations.keys()):
                kinds = ", ".join(type(p).__name__ for p in module.parametrizations[tensor_name])
                with torch.no_grad():
                    parametrize.remove_parametrizations(module, tensor_name, leave_parametrized=True)
                notes[prefix + tensor_name] = f"parametrization ({kinds}) materialized: its effective weight was factored and the parametrization is gone"
    notes.update(materialize_computed_convs(model))
    _NOTES[model] = notes
    return notes


def notes_of(model: nn.Module | None) -> dict[str, str]:
    """{weight path: note} of a model made by `private_copy`; empty for any other."""
    return dict(_NOTES.get(model, {})) if model is not None else {}
