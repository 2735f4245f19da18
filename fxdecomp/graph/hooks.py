"""Hooks a user registered on a module (``register_forward_hook`` and the like), told apart from torch's own.

A decomposed layer is a new module, so hooks on the layer it replaces would no longer
run; torch.fx traces the root's ``forward``, not its ``__call__``, so hooks on the model
itself are not in an fx graph. torch.export records what forward hooks compute on
tensors, for every module it calls, but neither their Python side effects nor backward
hooks (`EXPORT_DROPS`). torch's own weight-computing pre-hooks (pruning masks, the
hook-based ``weight_norm`` and ``spectral_norm``) are not the user's: the private copy
materializes their weights (`fxdecomp.graph.parametrized`).

Example::

    user_hooks(layer)      # ["forward hook"] after layer.register_forward_hook(fn)
"""

from __future__ import annotations

from torch import nn


def _torch_hook_types() -> tuple[type, ...]:
    from torch.nn.utils.prune import BasePruningMethod
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    return BasePruningMethod, SpectralNorm, WeightNorm


_KINDS = (
    ("_forward_pre_hooks", "forward pre-hook"),
    ("_forward_hooks", "forward hook"),
    ("_backward_pre_hooks", "backward pre-hook"),
    ("_backward_hooks", "backward hook"),
)


def user_hooks(module: nn.Module) -> list[str]:
    """The kinds of hooks registered on ``module`` itself (not its children) other than torch's own, one entry each."""
    own = _torch_hook_types()
    return [kind for attribute, kind in _KINDS for hook in getattr(module, attribute, {}).values() if not isinstance(hook, own)]


# What a graph captured by torch.export loses of the hooks it traced through.
EXPORT_DROPS = "their Python side effects (a list a hook appends to) and backward hooks do not run in it"


def describe(hooked: dict[str, list[str]], limit: int = 5) -> str:
    """``"fc1 (forward hook), conv2 (forward pre-hook, forward hook)"`` for {module path: kinds}."""
    parts = [f"{name or '<the model>'} ({', '.join(kinds)})" for name, kinds in list(hooked.items())[:limit]]
    return ", ".join(parts) + (f" and {len(hooked) - limit} more" if len(hooked) > limit else "")


def kept_for_hooks(hooked: dict[str, list[str]], entry: str) -> str:
    """The warning for layers kept dense because they carry the user's hooks; ``entry`` is the call that kept them."""
    return (
        f"fxdecomp: {len(hooked)} layer(s) carry hooks of yours and are kept as they are, since a decomposed layer is a "
        f"new module that would not run them: {describe(hooked)}. To decompose them, remove the hooks (handle.remove()) "
        f"before {entry} and register them again where you need them."
    )
