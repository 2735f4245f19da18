"""Keep-the-model mode: apply a compression plan to a copy of the user's own model.

`compress` returns a GraphModule: a flat graph, which for a transformers model
loses the class and its methods (``generate``, ``save_pretrained``, ``config``)
and the KV-cache path. When every decomposed layer is a module (``nn.Linear``,
any ``nn.Conv*d`` / ``nn.ConvTranspose*d``, transformers' ``Conv1D``), `apply_to_model` swaps each of those
modules in a deep copy of the model for the decomposed module that `compress`
built (the very factors of ``result.graph_module``, copied, as a `fxdecomp.kept_layer.KeptLayer` that keeps the layer's configuration and
the shape, dtype and device of its weight for model code that reads them), so the model keeps everything else. A decision whose weight is not held by such a module (a
functional ``F.linear(x, self.w)``) cannot be applied this way and is named in
an `UnsupportedLayerError`. A transformers model's copy records its decomposed layers in its
config (`fxdecomp.kept_record`), so that its ``save_pretrained`` directory loads back with
`fxdecomp.large.load_compressed`, which calls `rebuild_kept`.

Example::

    result = fxdecomp.compress(gpt2, (ids,), budget=0.5)
    small = result.apply_to(gpt2, example_inputs=(ids,))   # a GPT2LMHeadModel
    small.generate(ids, max_new_tokens=8)
    small.save_pretrained("small")                          # fxdecomp.large.load_compressed("small") loads it back
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Sequence

import torch
from torch import nn

from .errors import FxDecompError, InvalidInputError, UnsupportedLayerError
from .capture.experts import expert_of, stacks_of
from .decomposers.base import inherit_trainable
from .kept_experts import is_kept_expert, rebuild_experts, swap_experts
from .graph.attention import packed
from .graph.computed_conv import overrides_forward, plain_with_weight, plain_equivalent
from .kept_attention import KeptAttention, in_projection_like
from .kept_check import check_outputs, check_shape
from . import kept_record
from .kept_layer import FactoredWeightOwner, KeptLayer, applies_own_weight, as_layer, own_factors, replaceable
from .kept_record import KeptEntry
from .layer_spec import LAYER_TYPES, ConvSpec, layer_spec, pad_module
from .meta import DECOMPOSED_SPECS
from .user_warnings import warn


def apply_to_model(
    result, model: nn.Module, example_inputs: Sequence | torch.Tensor | None = None, rtol: float = 1e-4, atol: float = 1e-5
) -> nn.Module:
    """A deep copy of ``model`` with each decomposed layer replaced by its decomposed module; ``model`` is untouched.

    ``result`` is the `CompressionResult` of compressing ``model`` (or a model of the same
    structure). With ``example_inputs`` the copy is run and its first output tensor compared
    with ``result.graph_module``'s (``|a - b| <= atol + rtol * |b|``): a mismatch (e.g. a
    module whose weight is also read outside its forward) raises `FxDecompError`.
    Raises `UnsupportedLayerError` naming every decision that is not a module of ``model``, and
    `InvalidInputError` for a partial result (whose ``graph_module`` already is the model's class).
    """
    from .training.plan import installed_modules  # training imports compress, which imports this module's users

    if not isinstance(model, nn.Module):
        raise InvalidInputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if result.partial:
        raise InvalidInputError(
            f"this result is partial: result.graph_module is already a {type(result.graph_module).__name__} (the model's "
            "own class) with its captured submodules compressed; use it (copy.deepcopy(result.graph_module)) instead of apply_to"
        )
    decided = [d for d in result.decisions if d.decomposed]
    modules = dict(model.named_modules())
    # nn.MultiheadAttention modules with a decomposed projection: swapped whole for a KeptAttention (the model's own
    # forward hands their weights to F.multi_head_attention_forward, which an AbsentWeight cannot serve).
    attentions = _attention_owners([d.name for d in decided], modules)
    attention = {f"{owner}.in_proj_weight" for owner in attentions}
    stacks = stacks_of(result.graph_module)
    experts = [d.name for d in decided if expert_of(stacks, d.name)]  # kept in their stacks: fxdecomp.kept_experts
    specs = getattr(result.graph_module, "meta", {}).get(DECOMPOSED_SPECS, {})
    functional = [d.name for d in decided if d.name not in attention and not replaceable(modules.get(d.name))
                  and not (d.op == "linear" and applies_own_weight(modules.get(d.name), specs.get(d.name)))
                  and d.name not in experts]
    if functional:
        raise UnsupportedLayerError(
            f"keep-the-model mode swaps modules, but {functional} are not nn.Linear, nn.Conv*d / nn.ConvTranspose*d or transformers "
            f"Conv1D modules of {type(model).__name__} (functional weights, or a different model); use "
            f"result.graph_module, or compress again with exclude={functional}"
        )
    installed = installed_modules(result.graph_module, [d.name for d in decided])
    for d in decided:
        if d.name not in attention and d.name not in experts:
            check_shape(d.name, as_layer(modules[d.name]), installed[d.name])
    new = copy.deepcopy(model)
    _carry_batchnorm(result.graph_module, new, set(installed))
    pads: dict = {}
    factors = {n: copy.deepcopy(m) for n, m in installed.items()}
    _swap_decomposed(new, [d.name for d in decided if d.name not in experts], attentions, factors, specs, pads)
    swap_experts(new, stacks, experts, factors)
    folded = getattr(result.graph_module, "meta", {}).get("fxdecomp.folded_batchnorm", ())
    used = {expert_of(stacks, name)[0] for name in experts}
    _record(new, decided, specs, pads, installed, list(folded), {stack: stacks[stack] for stack in used})
    if example_inputs is not None:
        check_outputs(result.graph_module, new, example_inputs, rtol, atol)
    return new


def rebuild_kept(model: nn.Module, record: dict) -> nn.Module:
    """Put the recorded decomposed structures (`fxdecomp.kept_record`) in ``model``, in place; returns it.

    ``model`` is the kept model's class built from its config (on the meta device, its tensors
    loaded afterwards): each recorded layer becomes a `KeptLayer` of the decomposer's structure at
    the recorded ranks, an attention with a decomposed projection a `KeptAttention`, and each folded
    BatchNorm an Identity after a layer with a bias. Raises `InvalidInputError` for a record that
    does not fit the model.
    """
    entries, folded = kept_record.from_json(record)
    modules = dict(model.named_modules())
    # Factors of an earlier decomposed layer (a loaded model compressed again) exist once that layer is rebuilt.
    outer = [e for e in entries if not any(e.name.startswith(f.name + ".") for f in entries)]
    stacks = kept_record.expert_stacks(record)
    experts = {e.name for e in outer if expert_of(stacks, e.name)}  # rebuilt in their stacks: fxdecomp.kept_experts
    missing = [e.name for e in outer if e.name not in modules and e.name not in experts
               and not (_attention_owner(e.name) and _attention_owner(e.name) in modules)]
    if missing:
        raise InvalidInputError(f"the record names layers {missing[:5]} that {type(model).__name__} does not have")
    decided = {e.name for e in entries}
    for layer, norm in folded:
        _swap(model, norm, nn.Identity())
        if layer in decided:
            continue
        held = model.get_submodule(layer)
        if overrides_forward(held):  # a conv computing its weight in forward was folded as its plain equivalent
            held = plain_with_weight(held, held.weight, held.bias)
            _swap(model, layer, held)
        if getattr(held, "bias", None) is None:  # a folded BatchNorm gave it one
            out = held.weight.shape[1] * held.groups if getattr(held, "transposed", False) else held.weight.shape[0]
            held.register_parameter("bias", nn.Parameter(torch.empty(out, device="meta", dtype=held.weight.dtype)))  # loaded next
    attentions = _attention_owners([e.name for e in entries], modules)
    structures = {e.name: _structure(e) for e in entries}
    pads = {e.name: (e.pad, e.pad_mode) if e.pad else None for e in entries}
    _swap_decomposed(model, [e.name for e in entries if e.name not in experts], attentions, structures, {e.name: e.spec for e in entries}, pads)
    rebuild_experts(model, stacks, {name: structures[name] for name in experts})
    kept_record.write(model, record)
    return model


def _record(new: nn.Module, decided: list, specs: dict, pads: dict, installed: dict, folded: list, stacks: dict) -> None:
    """Write the `fxdecomp.kept_record` of ``new``'s decomposed layers into its transformers config (if it has one),
    so that ``save_pretrained`` writes it; warn where a layer's module is not what the record would rebuild."""
    config = kept_record.config_of(new)
    if config is None:
        return
    previous = getattr(config, kept_record.RECORD_KEY, None)
    entries, other = [], []
    for d in decided:
        spec = specs.get(d.name)
        pad, mode = pads.get(d.name) or ((), "zeros")
        # A correction pass may have given the factors a bias the layer lacked: the record says so.
        fits = [e for e in (KeptEntry(d.name, d.method, tuple(d.ranks), s, pad, mode) for s in _with_and_without_bias(spec))
                if _shapes(_structure(e)) == _shapes(installed[d.name])]
        if fits:
            entries.append(fits[0])
        else:
            other.append(d.name)
    if other:
        kept_record.write(new, None)  # an earlier record would not describe this model either
        warn(
            f"fxdecomp: {other[:3]} hold modules other than their method's structure at their ranks: save_pretrained of "
            "the kept model cannot be loaded back by fxdecomp.large.load_compressed (torch.save the whole model instead)"
        )
        return
    known = {**(kept_record.expert_stacks(previous) if previous else {}), **stacks}
    kept_record.write(new, kept_record.merged(previous, entries, folded, lambda name: _is_kept(new, name, known), stacks))


def _is_kept(model: nn.Module, name: str, stacks: dict) -> bool:
    """Whether the layer at ``name`` is a KeptLayer, or a KeptAttention's packed projection (``owner.in_proj_weight``)."""
    owner, _, attribute = name.rpartition(".")
    try:
        if attribute == "in_proj_weight":
            return isinstance(model.get_submodule(owner), KeptAttention)
        if expert_of(stacks, name):
            return is_kept_expert(model, stacks, name)
        return isinstance(model.get_submodule(name), (KeptLayer, FactoredWeightOwner))
    except AttributeError:
        return False


def _with_and_without_bias(spec) -> list:
    return [] if spec is None else [spec, dataclasses.replace(spec, has_bias=not spec.has_bias)]


def _structure(entry: KeptEntry) -> nn.Module:
    """The recorded layer's decomposed module on the meta device: its method's structure at its ranks."""
    from .decomposers import get_decomposer

    with torch.device("meta"):
        return get_decomposer(entry.spec.kind, entry.method).structure(entry.spec, entry.ranks)


def _shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def _swap_decomposed(new: nn.Module, names: list[str], attentions: set[str], factors: dict, specs: dict, pads: dict) -> None:
    """Swap each named layer of ``new`` for a KeptLayer of its ``factors`` (attentions with a decomposed projection
    for KeptAttentions), in the layer's device, dtype, mode and trainability. ``pads`` maps a name to the padding its
    factors need before them (`_pad_before`); a name missing is looked up, and its padding written into ``pads``."""
    attention = {f"{owner}.in_proj_weight" for owner in attentions}
    for owner in sorted(attentions):
        name = f"{owner}.in_proj_weight"
        _swap(new, owner, _kept_attention(new.get_submodule(owner), factors.get(name), name))
    for name in names:
        if name in attention:
            continue
        old = new.get_submodule(name)
        if not replaceable(old):  # a module applying its own weight (a router): it keeps its class, the weight goes
            module = KeptLayer(factors[name], as_layer(old), repr(name))
            _place_like(module, old.weight, old.training)
            inherit_trainable(module, old)
            own_factors(old, module)
            pads[name] = None
            continue
        if name not in pads:
            pads[name] = _pad_before(name, old, specs.get(name))
        module = factors[name] if pads[name] is None else nn.Sequential(pad_module(*pads[name]), factors[name])
        module = KeptLayer(module, old, repr(name))
        _place_like(module, old.weight, old.training)
        inherit_trainable(factors[name], old)
        twins = _tied_twins(new, name, set(names))
        for path in [name, *twins]:
            _swap(new, path, module)
        _declare_ties(new, name, twins, module)


def _declare_ties(model: nn.Module, name: str, twins: list[str], module: nn.Module) -> None:
    """Declare the tied layers' factors in a transformers model's ``all_tied_weights_keys`` and ``_tied_weights_keys``
    ({target: source}), as the dense weights were: ``save_pretrained`` then writes them once (under the first path,
    the one ``named_parameters`` and the loader use), and refuses ties it was not told of."""
    tied = getattr(model, "all_tied_weights_keys", None)
    declared = getattr(model, "_tied_weights_keys", None)
    if not twins or not isinstance(tied, dict):
        return
    declared = dict(declared) if isinstance(declared, dict) else {}  # an instance copy: the class's stays as it was
    order = {path: i for i, (path, _) in enumerate(model.named_modules(remove_duplicate=False))}
    group = sorted([name, *twins], key=lambda path: order.get(path, len(order)))
    source, prefixes = group[0], tuple(f"{path}." for path in group)
    for keys in (tied, declared):
        for key in [k for k, v in keys.items() if k.startswith(prefixes) or (isinstance(v, str) and v.startswith(prefixes))]:
            del keys[key]  # the dense weights' tie is gone with them
        for path in group[1:]:
            keys.update({f"{path}.{key}": f"{source}.{key}" for key, _ in module.named_parameters()})
    model._tied_weights_keys = declared


def _tied_twins(model: nn.Module, name: str, decided: set[str]) -> list[str]:
    """The other layers of ``model`` that compute what layer ``name`` computes: its weight and bias tied to theirs
    (Zamba's shared transformer block), the same kind and configuration. The graph calls their one decomposed
    module at every site, so the kept model swaps them all for one KeptLayer, still tied."""
    layer = model.get_submodule(name)
    twins = []
    for path, other in model.named_modules():
        if (path != name and path not in decided and other is not layer and type(other) is type(layer)
                and getattr(other, "weight", None) is layer.weight and getattr(other, "bias", None) is layer.bias
                and _same_configuration(other, layer)):
            twins.append(path)
    return twins


def _same_configuration(a: nn.Module, b: nn.Module) -> bool:
    try:
        return layer_spec(a) == layer_spec(b)
    except FxDecompError:  # a layer type without a spec of its own (transformers' Conv1D): its attributes
        return all(getattr(a, k, None) == getattr(b, k, None) for k in ("nf", "nx", "in_features", "out_features"))


def _place_like(module: nn.Module, like: torch.Tensor, training: bool) -> None:
    """``module`` in ``like``'s dtype and device (a structure on the meta device, whose factors rebuild_kept's caller
    loads afterwards, stays there) and in the layer's mode."""
    structure_only = any(p.is_meta for p in module.parameters())
    module.to(**({} if structure_only else {"device": like.device}), dtype=like.dtype).train(training)


def _carry_batchnorm(gm: nn.Module, new: nn.Module, decomposed: set[str]) -> None:
    """The BatchNorm changes of the correction passes: a folded BatchNorm becomes an Identity after its
    folded layer (`fxdecomp.passes.fold_batchnorm`; a kept layer is swapped for its folded copy, a
    decomposed one is swapped afterwards), a re-estimated one takes the graph's statistics."""
    meta = getattr(gm, "meta", {})
    for layer, norm in meta.get("fxdecomp.folded_batchnorm", ()):
        swaps = [(norm, nn.Identity())] + ([] if layer in decomposed else [(layer, _folded_layer(gm, new, layer))])
        for path, module in swaps:
            _swap(new, path, module)
    stats = meta.get("fxdecomp.batchnorm_stats")
    for name in stats.batchnorms if stats is not None else ():
        new.get_submodule(name).load_state_dict(gm.get_submodule(name).state_dict())


def _swap(model: nn.Module, path: str, module: nn.Module) -> None:
    """Put ``module`` in place of the submodule at ``path``, under every name ``model`` registers it by
    (``self.dec = self.enc``: the forward may call either)."""
    old = model.get_submodule(path)
    for name, found in list(model.named_modules(remove_duplicate=False)):
        if found is old and name:
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, leaf, module)


def _folded_layer(gm: nn.Module, new: nn.Module, layer: str) -> nn.Module:
    """The kept layer with its BatchNorm folded in: the graph's module (torch.fx), or, where the graph holds the
    layer as an op on ``<layer>.weight`` / ``<layer>.bias`` (torch.export), a copy of the user's module holding them."""
    held = gm.get_submodule(layer)
    if isinstance(held, LAYER_TYPES):
        return copy.deepcopy(held)
    mine = new.get_submodule(layer)
    if not isinstance(mine, LAYER_TYPES) or mine.weight.shape != held.weight.shape:
        raise UnsupportedLayerError(
            f"the BatchNorm after {layer!r} was folded into its weight, but {type(mine).__name__} {layer!r} of the model is not "
            "the conv / Linear module that holds that weight; use result.graph_module, or compress without fold_batchnorm"
        )
    # A conv that computes its weight in forward was captured as its plain equivalent: the folded weight is that one's.
    folded = plain_equivalent(mine) or copy.deepcopy(mine)
    for name in ("weight", "bias"):
        tensor = held.get_parameter(name).detach().clone().to(device=mine.weight.device, dtype=mine.weight.dtype)
        folded.register_parameter(name, nn.Parameter(tensor, mine.weight.requires_grad))
    return folded


def _pad_before(name: str, layer: nn.Module, spec) -> tuple[tuple[int, ...], str] | None:
    """The padding (F.pad order, and its mode) the decomposed module of the user's ``layer`` needs before it, or None.

    torch.export records a conv that pads before convolving (``padding_mode="reflect"``, or a
    subclass such as EfficientNet's ``Conv2dStaticSamePadding``) as a pad op and then a conv
    with less padding: the decomposed module, which computes the conv the graph called, then goes
    after a pad layer that makes up the difference. Any other difference is refused.
    """
    if not isinstance(spec, ConvSpec):
        return None
    try:
        # A conv that computes its weight in forward (weight standardization) was captured as its plain equivalent.
        plain = plain_equivalent(layer) or layer
        mine = dataclasses.replace(layer_spec(plain), has_bias=spec.has_bias)  # a folded BatchNorm adds a bias
    except UnsupportedLayerError as exc:
        raise UnsupportedLayerError(
            f"layer {name!r}: the graph decomposed the conv it calls, but {type(layer).__name__}'s forward does more ({exc}); "
            f"its decomposed module cannot replace it. Use result.graph_module, or compress with exclude={[name]}"
        ) from exc
    if mine == spec:
        return None
    before = tuple(a - b for a, b in zip(mine.pads, spec.pads))
    if (
        not spec.transposed and spec.padding_mode == "zeros" and min(before, default=-1) >= 0
        and (mine.padding_mode == "zeros" or not any(spec.pads))
        and dataclasses.replace(mine, pads=spec.pads, padding_mode="zeros") == spec
    ):
        return before, mine.padding_mode
    raise UnsupportedLayerError(
        f"layer {name!r}: the graph decomposed the conv it calls ({spec}), but {type(layer).__name__}'s forward computes "
        f"another ({mine}); its decomposed module cannot replace it. Use result.graph_module, or compress with "
        f"frontend='fx' or exclude={[name]}"
    )


def _attention_owner(name: str) -> str:
    """``enc.att`` for ``enc.att.in_proj_weight`` or ``enc.att.out_proj`` (an attention's projections); else ''
    (the model itself cannot be swapped: an nn.MultiheadAttention compressed on its own stays as it is)."""
    owner, _, attribute = name.rpartition(".")
    return owner if attribute in ("in_proj_weight", "out_proj") else ""


def _attention_owners(names: list[str], modules: dict[str, nn.Module]) -> set[str]:
    """The nn.MultiheadAttention modules (in ``modules``) whose packed or output projection is among ``names``."""
    return {owner for name in names for owner in [_attention_owner(name)] if owner and packed(modules.get(owner))}


def _kept_attention(mha: nn.MultiheadAttention, decomposed: nn.Module | None, name: str) -> KeptAttention:
    """``mha`` as a KeptAttention: its input projection the decomposed one (a KeptLayer), or, where only
    ``out_proj`` was decomposed, a Linear holding ``mha``'s own packed weight and bias."""
    projection = in_projection_like(mha)
    if decomposed is None:
        in_proj = nn.Linear(projection.in_features, projection.out_features, bias=mha.in_proj_bias is not None, device="meta")
        in_proj.weight, in_proj.bias = mha.in_proj_weight, mha.in_proj_bias
        return KeptAttention(mha, in_proj)
    in_proj = KeptLayer(copy.deepcopy(decomposed), projection, repr(name))
    _place_like(in_proj, mha.in_proj_weight, mha.training)
    for p in in_proj.parameters():
        p.requires_grad_(mha.in_proj_weight.requires_grad)
    return KeptAttention(mha, in_proj)
