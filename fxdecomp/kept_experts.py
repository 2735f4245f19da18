"""Decomposed experts in the user's own mixture-of-experts module (keep-the-model mode).

transformers (5.x) keeps a mixture of experts' weights stacked: ``experts.gate_up_proj`` (E, 2I, H)
and ``experts.down_proj`` (E, H, I), or (E, in, out) where the class says ``is_transposed`` (GPT-OSS),
and its experts module applies them in one of its implementations: transformers' grouped matmul
(``transformers::grouped_mm_fallback``, ``torch._grouped_mm``, ``F.grouped_mm`` over rows sorted by
expert), the ``eager`` loop (``F.linear(rows, self.gate_up_proj[e])``), or ``bmm`` with every expert on
its own rows (Llama 4). fxdecomp decomposes each expert as a Linear (`fxdecomp.capture.experts`).

To keep the model's class, the experts module keeps its class (a subclass made once per class, as
``torch.nn.utils.parametrize`` does) and each decomposed stack becomes a `KeptExperts` child
``<stack>_experts``: expert e is a `fxdecomp.kept_layer.KeptLayer` of its factors, or an nn.Linear
where it was kept. The stack's attribute then answers an `AbsentStack`: the shape, dtype and device
of the stack and no data, through which the implementations above run the experts' layers:

- a grouped matmul with it (read as (E, in, out), transposed where stored (E, out, in)): the rows of
  expert e (``offs``) through layer e, rows past ``offs[-1]`` zero, as transformers' fallback;
- ``stack[e]`` (an int or a 0-d tensor; stored (E, out, in)): expert e's weight, which ``F.linear`` runs
  through its layer;
- ``torch.bmm(x, stack)`` (read as (E, in, out)): ``x[e]`` through layer e, stacked.

Any other computation with it raises `UnsupportedLayerError` naming the stack, as an `AbsentWeight` does.

Example::

    kept = result.apply_to(mixtral)     # kept.model.layers[0].mlp.experts.gate_up_proj_experts[3] is a KeptLayer
    kept.generate(ids, max_new_tokens=8)
"""

from __future__ import annotations

import torch
from torch import nn

from .capture.experts import EXPERT_SUFFIX, EXPERTS_PATTERN, expert_of, is_grouped_mm_function, join_expert_rows, split_expert_rows
from .errors import InvalidInputError, UnsupportedLayerError

EXPERTS_CHILD = "{}_experts"  # the child of the experts module holding a decomposed stack's experts


class AbsentStack(torch.Tensor):
    """A stacked expert weight whose experts are layers: shape (E, a, b), dtype and device, no data (see the module).

    ``linear_layout`` is True where ``stack[e]`` is an (out, in) Linear weight, False where it reads (in, out).
    """

    @staticmethod
    def __new__(cls, experts: "KeptExperts", linear_layout: bool):
        shape = experts.stack_shape if linear_layout == experts.linear_layout else experts.stack_shape[:1] + experts.stack_shape[:0:-1]
        tensor = torch.Tensor._make_wrapper_subclass(cls, shape, dtype=experts.dtype, device=experts.device)
        tensor.experts, tensor.linear_layout = experts, linear_layout
        return tensor

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.Tensor.transpose, torch.transpose) and _swaps_last_two(args, kwargs):
            return AbsentStack(args[0].experts, not args[0].linear_layout)
        if func is torch.Tensor.__getitem__:
            out = _expert_weight(*args)
            if out is not None:
                return out
        if func is torch.bmm or func is torch.Tensor.bmm:
            out = _batched(*args, **kwargs)
            if out is not None:
                return out
        if is_grouped_mm_function(func):
            out = _grouped(*args, **kwargs)
            if out is not None:
                return out
        return super().__torch_function__(func, types, args, kwargs)

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        name = next((a.experts.stack_name for a in args if isinstance(a, AbsentStack)), "a decomposed expert stack")
        raise UnsupportedLayerError(
            f"the model computes with the stacked expert weight {name} ({func}); decomposition replaced its experts by "
            "their factors, and only its shape, dtype and device remain. A transformers experts module runs them in its "
            "'grouped_mm' implementation (model.set_experts_implementation('grouped_mm')); or compress with "
            f"exclude=[{EXPERTS_PATTERN!r}] to keep the experts dense"
        )

    def __repr__(self, *, tensor_contents=None) -> str:
        return f"AbsentStack(shape={tuple(self.shape)}, dtype={self.dtype}, device={self.device}, stack={self.experts.stack_name})"


def _swaps_last_two(args, kwargs) -> bool:
    dims = [d % 3 for d in (list(args[1:3]) + [kwargs.get("dim0"), kwargs.get("dim1")]) if isinstance(d, int)]
    return sorted(dims) == [1, 2]


def _expert_weight(stack: "AbsentStack", index) -> torch.Tensor | None:
    if not stack.linear_layout or not (isinstance(index, int) or (isinstance(index, torch.Tensor) and index.dim() == 0
                                                                 and not index.is_floating_point())):
        return None
    return stack.experts[int(index)].weight


def _grouped(input, weight, offs=None, *rest, **kwargs) -> torch.Tensor | None:
    if not isinstance(weight, AbsentStack) or weight.linear_layout or offs is None or rest or any(v is not None for v in kwargs.values()):
        return None
    chunks = split_expert_rows(input, offs)
    outputs = [layer(rows) for layer, rows in zip(weight.experts, chunks)]
    return join_expert_rows(outputs, chunks[-1])


def _batched(input, mat2, **kwargs) -> torch.Tensor | None:
    if not isinstance(mat2, AbsentStack) or mat2.linear_layout or kwargs:
        return None
    return torch.stack([layer(rows) for layer, rows in zip(mat2.experts, input.unbind(0))])


class KeptExperts(nn.ModuleList):
    """The experts of one decomposed stack: layer e is expert e (a KeptLayer of its factors, or an nn.Linear kept
    dense), and the stack's shape and layout (``linear_layout``: stored (E, out, in)), for `AbsentStack`."""

    def __init__(self, layers, stack_shape: tuple[int, ...] = (), linear_layout: bool = True, stack_name: str = ""):
        super().__init__(layers)
        self.stack_shape, self.linear_layout, self.stack_name = tuple(stack_shape), linear_layout, stack_name

    @property
    def dtype(self) -> torch.dtype:
        return next(p for p in self.parameters() if p.is_floating_point()).dtype

    @property
    def device(self) -> torch.device:
        return next(iter(self.parameters())).device

    def stack(self) -> AbsentStack:
        return AbsentStack(self, self.linear_layout)


class FactoredStackOwner:
    """A mixin for an experts module whose stacked weights are `KeptExperts` children: each stack attribute answers
    its `AbsentStack`. It pickles as its original class with the mixin (see `own_stacks`)."""

    _fxdecomp_base: type
    _fxdecomp_stacks: tuple[str, ...]

    def __reduce_ex__(self, protocol):
        return _restore_owner, (self._fxdecomp_base, self._fxdecomp_stacks, self.__dict__)


_OWNER_CLASSES: dict[tuple[type, tuple[str, ...]], type] = {}


def own_stacks(owner: nn.Module, stacks: dict[str, KeptExperts]) -> None:
    """Replace ``owner``'s stacked Parameters named in ``stacks`` by their `KeptExperts` (registered as
    ``<name>_experts``), in place."""
    names = tuple(sorted(set(getattr(owner, "_fxdecomp_stacks", ())) | set(stacks)))
    base = getattr(owner, "_fxdecomp_base", type(owner))
    for name, experts in stacks.items():
        del owner._parameters[name]
        owner.add_module(EXPERTS_CHILD.format(name), experts)
    owner.__class__ = owner_class(base, names)


def owner_class(base: type, names: tuple[str, ...]) -> type:
    """The subclass of ``base`` (made once) whose attributes ``names`` answer their `KeptExperts`' AbsentStack."""
    key = (base, names)
    if key not in _OWNER_CLASSES:
        properties = {name: property(_stack_getter(name), doc=f"the AbsentStack of {name}'s decomposed experts") for name in names}
        _OWNER_CLASSES[key] = type(f"Factored{base.__name__}", (FactoredStackOwner, base),
                                   {"_fxdecomp_base": base, "_fxdecomp_stacks": names, **properties})
    return _OWNER_CLASSES[key]


def _stack_getter(name: str):
    child = EXPERTS_CHILD.format(name)
    return lambda self: self._modules[child].stack()


def _restore_owner(base: type, names: tuple[str, ...], state: dict) -> nn.Module:
    owner = object.__new__(owner_class(base, names))
    owner.__dict__.update(state)
    return owner


def swap_experts(new: nn.Module, stacks: dict[str, bool], decided: list[str], factors: dict[str, nn.Module]) -> None:
    """Put the decomposed experts ``decided`` of a result into ``new``, in place: each stack (``stacks``: the lowered
    stacks, `fxdecomp.capture.experts.stacks_of`) with one becomes a `KeptExperts` of the experts' ``factors``
    (KeptLayers) and nn.Linear copies of the experts kept dense. Raises `UnsupportedLayerError` naming a stack
    ``new`` does not hold."""
    for stack, experts in _by_stack(stacks, decided).items():
        owner, attribute, stacked = _stack_of(new, stack)
        _install(owner, attribute, stacked, stacks[stack], {e: (factors[name], name) for e, name in experts.items()}, stack)


def rebuild_experts(model: nn.Module, stacks: dict[str, bool], structures: dict[str, nn.Module]) -> None:
    """`swap_experts` from a kept record (`fxdecomp.keep_model.rebuild_kept`): ``structures`` maps each recorded
    expert to its factors' structure (on the meta device, as ``model``), ``stacks`` is the record's."""
    for stack, experts in _by_stack(stacks, list(structures)).items():
        owner, attribute, stacked = _stack_of(model, stack)
        _install(owner, attribute, stacked, stacks[stack], {e: (structures[name], name) for e, name in experts.items()}, stack)


def experts_path(name: str) -> str:
    """The path of the `KeptExperts` holding expert ``<stack>_expert<e>``: ``<stack>_experts``."""
    return EXPERTS_CHILD.format(name.rpartition(EXPERT_SUFFIX)[0])


def is_kept_expert(model: nn.Module, stacks: dict[str, bool], name: str) -> bool:
    """Whether ``name`` is an expert of ``stacks`` that is a KeptLayer in ``model``'s `KeptExperts`."""
    from .kept_layer import KeptLayer

    found = expert_of(stacks, name)
    if found is None:
        return False
    owner_path, _, attribute = found[0].rpartition(".")
    try:
        experts = (model.get_submodule(owner_path) if owner_path else model)._modules.get(EXPERTS_CHILD.format(attribute))
    except AttributeError:
        return False
    return isinstance(experts, KeptExperts) and found[1] < len(experts) and isinstance(experts[found[1]], KeptLayer)


def _by_stack(stacks: dict[str, bool], names: list[str]) -> dict[str, dict[int, str]]:
    grouped: dict[str, dict[int, str]] = {}
    for name in names:
        stack, expert = expert_of(stacks, name)
        grouped.setdefault(stack, {})[expert] = name
    return grouped


def _stack_of(model: nn.Module, stack: str) -> tuple[nn.Module, str, torch.Tensor]:
    owner_path, _, attribute = stack.rpartition(".")
    try:
        owner = model.get_submodule(owner_path) if owner_path else model
    except AttributeError:
        owner = None
    stacked = owner._parameters.get(attribute) if owner is not None else None
    if not isinstance(stacked, nn.Parameter) or stacked.dim() != 3:
        raise UnsupportedLayerError(
            f"the result decomposed experts of {stack!r}, which {type(model).__name__} does not hold as a stacked 3-D "
            f"parameter; use result.graph_module, or compress again with exclude=[{EXPERTS_PATTERN!r}]"
        )
    return owner, attribute, stacked


def _install(owner: nn.Module, attribute: str, stacked: torch.Tensor, linear_layout: bool, experts: dict[int, tuple], stack: str) -> None:
    """Replace ``owner.<attribute>`` by a `KeptExperts`: ``experts`` {e: (factors, name)} as KeptLayers, the others as
    nn.Linear copies of their slices (left empty on the meta device, where the caller loads them)."""
    from .kept_layer import KeptLayer

    out_features, in_features = stacked.shape[1:] if linear_layout else stacked.shape[:0:-1]
    layers = []
    for e in range(stacked.shape[0]):
        if e in experts:
            factors, name = experts[e]
            shape = nn.Linear(in_features, out_features, bias=False, device="meta")
            layer = KeptLayer(factors, shape, repr(name))  # a structure on the meta device (a record's) stays there
            layer.to(**({} if any(p.is_meta for p in layer.parameters()) else {"device": stacked.device}), dtype=stacked.dtype)
        else:
            layer = nn.Linear(in_features, out_features, bias=False, device=stacked.device, dtype=stacked.dtype)
            if not stacked.is_meta:
                with torch.no_grad():
                    layer.weight.copy_(stacked[e] if linear_layout else stacked[e].T)
        layers.append(layer.train(owner.training).requires_grad_(stacked.requires_grad))
    own_stacks(owner, {attribute: KeptExperts(layers, tuple(stacked.shape), linear_layout, repr(stack))})
