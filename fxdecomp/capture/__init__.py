"""Capture helpers beyond the whole-model frontends of `fxdecomp.frontend`.

- `hidden`: Linear/Conv-shaped weights that a captured graph hands to opaque calls
  (``torch.fx.wrap``'d functions, scripted submodules), which fxdecomp cannot decompose.
- `export_modules`: dropout and BatchNorm that torch.export flattened into aten ops, made
  modules again (they follow ``train()``, and the BatchNorm passes find them).
- `partial`: models that no frontend captures whole; their largest capturable
  submodules are captured and compressed under one global budget.
"""

from .hidden import OpaqueWeight, opaque_weights

__all__ = ["OpaqueWeight", "opaque_weights"]
