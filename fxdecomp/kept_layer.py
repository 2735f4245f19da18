"""The decomposed layer as it sits in the user's own model (keep-the-model mode).

Model code often reads a layer outside its forward: transformers' ViT, DeiT and CLIP read
``projection.weight.dtype``, T5 ``wo.weight.dtype``, Qwen2-Audio ``conv1.weight.device``,
Whisper ``conv1.stride``. After decomposition the dense weight no longer exists, so
`KeptLayer` keeps the original layer's configuration and answers ``weight`` / ``bias`` with
an `AbsentWeight`: a tensor with the original shape, the factors' dtype and device and no
data, whose every computation raises `UnsupportedLayerError` naming the layer (reading
values of a weight that is gone must not succeed silently). The one exception is the
layer's own computation: ``F.linear(x, layer.weight, layer.bias)`` on a kept Linear (model
code that applies the weight itself, torchvision's Swin) runs the factors.

Example::

    kept = result.apply_to(vit)
    kept.embeddings.patch_embeddings.projection.weight.dtype   # torch.float32
    kept.embeddings.patch_embeddings.projection.weight.sum()   # UnsupportedLayerError
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from .errors import UnsupportedLayerError
from .layer_spec import LAYER_TYPES, computes_plain_linear
from .transformers_layers import is_conv1d
from .user_warnings import warn

# The configuration a swapped layer keeps for model code that reads it.
LAYER_ATTRIBUTES = (
    "in_features", "out_features", "in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation",
    "groups", "padding_mode", "output_padding", "transposed", "nf", "nx",
)


class AbsentWeight(torch.Tensor):
    """Shape, dtype, device and requires_grad of a weight that decomposition replaced by factors; no data.

    Reading metadata works; any operation on it raises `UnsupportedLayerError`, except ``F.linear`` with its
    own layer's bias, which runs that layer's factors (`_linear_through_factors`).
    """

    @staticmethod
    def __new__(cls, shape, dtype, device, requires_grad, layer: str, kept: nn.Module | None = None, role: str = ""):
        tensor = torch.Tensor._make_wrapper_subclass(cls, shape, dtype=dtype, device=device, requires_grad=requires_grad)
        tensor.layer = layer
        tensor.kept, tensor.role = kept, role  # the KeptLayer it describes, and which of its tensors ("weight", "bias")
        return tensor

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            out = _linear_through_factors(*args, **kwargs)
            if out is not None:
                return out
        return super().__torch_function__(func, types, args, kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        layer = next((a.layer for a in args if isinstance(a, AbsentWeight)), "a decomposed layer")
        raise UnsupportedLayerError(
            f"the model computes with the weight of {layer} ({func}), which decomposition replaced by its factors; "
            "only its shape, dtype and device remain. Exclude that layer (compress(..., exclude=[name])) to keep the model"
        )

    def __repr__(self, *, tensor_contents=None) -> str:
        return f"AbsentWeight(shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device}, layer={self.layer})"


def _linear_through_factors(input, weight, bias=None) -> torch.Tensor | None:
    """``F.linear(input, layer.weight, layer.bias)`` on a kept Linear is the kept layer's own output: model code that
    applies a swapped Linear's weight itself (torchvision's Swin: ``F.linear(x, self.qkv.weight, self.qkv.bias)``)
    runs through the factors. None for anything else (another bias, a missing one), which then raises."""
    kept = getattr(weight, "kept", None)
    if not isinstance(kept, KeptLayer) or getattr(weight, "role", "") != "weight" or not kept._linear:
        return None
    if bias is None:
        if kept._bias_shape is not None:
            return None
    elif getattr(bias, "kept", None) is not kept or getattr(bias, "role", "") != "bias":
        return None
    if not isinstance(input, torch.Tensor) or isinstance(input, AbsentWeight) or input.shape[-1:] != kept._weight_shape[1:]:
        return None
    return kept(input)


class KeptLayer(nn.Sequential):
    """A decomposed layer in the user's model: its factors in order (the children of the decomposed Sequential,
    so the same state-dict keys), the original layer's configuration (``stride``, ``in_features``, ...), and
    ``weight`` / ``bias`` as `AbsentWeight` of the original shapes (see the module)."""

    __jit_unused_properties__ = ["weight", "bias"]  # TorchScript compiles the factors only

    def __init__(self, factors: nn.Module | OrderedDict | None = None, layer: nn.Module | None = None, name: str = ""):
        if isinstance(factors, OrderedDict):  # nn.Sequential's own rebuilds
            super().__init__(factors)
        else:
            super().__init__(*(factors if isinstance(factors, nn.Sequential) else [factors] if factors is not None else []))
        self._name = name
        self._linear = isinstance(layer, nn.Linear)  # its weight is (out, in), as F.linear takes it (Conv1D's is not)
        self._weight_shape = tuple(layer.weight.shape) if layer is not None else None
        for attribute in LAYER_ATTRIBUTES:
            value = getattr(layer, attribute, None)
            if value is not None and not isinstance(value, (torch.Tensor, nn.Module)):
                setattr(self, attribute, value)
        bias = getattr(layer, "bias", None)
        # A folded BatchNorm gives a layer without bias one: the factors say.
        biases = [p for n, p in self.named_parameters() if n.rpartition(".")[2] == "bias"]
        self._bias_shape = tuple(bias.shape) if isinstance(bias, torch.Tensor) else tuple(biases[-1].shape) if biases else None

    def __setattr__(self, name: str, value) -> None:
        if name in ("weight", "bias") and "_weight_shape" in self.__dict__:
            # transformers' tie_weights sets a tied head's weight: a decomposed head holds factors, not a weight.
            warn(
                f"fxdecomp: setting {name!r} of the decomposed layer {self._name or ''} is ignored: it holds factors, not a "
                "weight (a tied head stays decomposed)"
            )
            return
        super().__setattr__(name, value)

    def __getitem__(self, index):
        if isinstance(index, slice):  # a part of the factors is not the layer
            return nn.Sequential(OrderedDict(list(self._modules.items())[index]))
        return super().__getitem__(index)

    def _absent(self, shape: tuple[int, ...] | None, role: str) -> AbsentWeight:
        if shape is None:
            raise AttributeError(f"{self._name or 'this KeptLayer'} has no original layer to describe")
        first = next((p for p in self.parameters() if p.is_floating_point()), None)
        dtype = first.dtype if first is not None else torch.get_default_dtype()
        device = first.device if first is not None else torch.device("cpu")
        return AbsentWeight(shape, dtype, device, bool(first is not None and first.requires_grad), self._name or "a decomposed layer",
                            self, role)

    @property
    def weight(self) -> AbsentWeight:
        """The original weight's shape, with the factors' dtype and device; no data. ``F.linear(x, weight, bias)``
        with this layer's own bias runs the factors."""
        return self._absent(self._weight_shape, "weight")

    @property
    def bias(self) -> AbsentWeight | None:
        """The bias's shape (None where the decomposed layer has none); no data."""
        return None if self._bias_shape is None else self._absent(self._bias_shape, "bias")


FACTORS = "weight_factors"  # the child holding the factors of a module that applies its own weight


class FactoredWeightOwner:
    """A mixin for a module whose own forward applies its ``weight`` with ``F.linear`` (Mixtral's and Qwen3-MoE's
    router, ``F.linear(hidden, self.weight)``; GPT-OSS's with its bias): its ``weight`` (and ``bias``) is the `AbsentWeight` of the `KeptLayer` child
    ``weight_factors``, so that call runs the factors. `own_factors` puts it on a module (a subclass made once
    per class, like ``torch.nn.utils.parametrize``'s); it pickles as its original class with the mixin."""

    _fxdecomp_base: type

    @property
    def weight(self) -> AbsentWeight:
        return self._modules[FACTORS].weight

    @property
    def bias(self) -> AbsentWeight | None:
        return self._modules[FACTORS].bias

    def __reduce_ex__(self, protocol):
        return _restore_owner, (self._fxdecomp_base, self.__dict__)


_OWNER_CLASSES: dict[type, type] = {}


def own_factors(owner: nn.Module, kept: "KeptLayer") -> None:
    """Replace ``owner``'s ``weight`` (and ``bias``) Parameter by ``kept`` (registered as ``owner.weight_factors``), in place."""
    del owner._parameters["weight"]
    owner._parameters.pop("bias", None)  # the factors' last layer holds it
    owner.__class__ = _owner_class(type(owner))
    owner.add_module(FACTORS, kept)


def _owner_class(base: type) -> type:
    if base not in _OWNER_CLASSES:
        _OWNER_CLASSES[base] = type(f"Factored{base.__name__}", (FactoredWeightOwner, base), {"_fxdecomp_base": base})
    return _OWNER_CLASSES[base]


def _restore_owner(base: type, state: dict) -> nn.Module:
    owner = object.__new__(_owner_class(base))
    owner.__dict__.update(state)
    return owner


def replaceable(module: nn.Module | None) -> bool:
    """A layer a KeptLayer can stand in for. A Linear subclass whose own forward computes more (PhiMoE's router returns
    (probabilities, weights, experts)) is not: it keeps its class, its weight the factors' (`applies_own_weight`)."""
    if isinstance(module, nn.Linear) and not computes_plain_linear(module):
        return False
    return isinstance(module, LAYER_TYPES) or (module is not None and is_conv1d(module))


def applies_own_weight(module: nn.Module | None, spec=None) -> bool:
    """A module that is no layer type but holds a matrix ``weight`` (and a bias or none), which its forward applies with
    ``F.linear`` (Mixtral's and GPT-OSS's router): kept with its factors as its weight (`own_factors`). Whether the forward really
    does is what the output check (``example_inputs``) confirms; any other use of the weight raises, naming it."""
    weight = module._parameters.get("weight") if module is not None else None
    bias = module._parameters.get("bias") if module is not None else None
    # Its bias goes to the factors: only where the graph's F.linear took it (``spec``), not one the forward adds itself.
    return isinstance(weight, nn.Parameter) and weight.dim() == 2 and (bias is None or getattr(spec, "has_bias", False))


def as_layer(module: nn.Module) -> nn.Module:
    """The layer itself, or for a module applying its own weight the nn.Linear it computes (on the meta device)."""
    if replaceable(module):
        return module
    out, in_ = module.weight.shape
    return nn.Linear(in_, out, bias=False, device="meta", dtype=module.weight.dtype)
