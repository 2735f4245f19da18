"""Checkpoints read and written tensor by tensor, so that a model never has to sit whole in memory.

A Hugging Face model directory holds ``config.json`` and either one
``model.safetensors`` or ``model.safetensors.index.json`` with its shards.
`LazyCheckpoint` opens such a directory and hands out single tensors on demand
(safetensors memory-maps the shards, so a tensor costs its own bytes only while
it is held); `LazyCheckpoint.materialize` fills a module built on the meta device
(`empty_model`) with its tensors, and `release` sends it back to meta.
`fxdecomp.large.shards.ShardWriter` writes tensors as they come into shards of
bounded size plus the index that ``from_pretrained`` reads.

Libraries: safetensors for the file format, accelerate's ``init_empty_weights``
for the meta-device skeleton, transformers for the model classes.

Example::

    checkpoint = LazyCheckpoint("llama-dir")
    model = empty_model(checkpoint)                      # parameters on the meta device
    block = model.model.layers[0]
    checkpoint.materialize(block, "model.layers.0")      # ~one block's bytes in memory
    ...
    checkpoint.release(block)
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import InvalidInputError
from .fused import FusedKey, build, fused_sources
from .shards import INDEX_FILE, SAFETENSORS_DTYPES, SINGLE_FILE, ShardWriter  # noqa: F401 (ShardWriter: re-exported)

_DTYPE_BYTES = {name: dtype.itemsize for dtype, name in SAFETENSORS_DTYPES.items()}  # safetensors dtype name -> bytes


class LazyCheckpoint:
    """A safetensors checkpoint directory, read one tensor at a time.

    Raises `InvalidInputError` when the directory has no config.json or no safetensors weights.
    """

    def __init__(self, path: str | os.PathLike):
        from safetensors import safe_open

        self.path = Path(path)
        config = self.path / "config.json"
        if not config.is_file():
            raise InvalidInputError(f"{self.path} has no config.json; give a Hugging Face model directory (save_pretrained)")
        self.config: dict[str, Any] = json.loads(config.read_text())
        if (self.path / INDEX_FILE).is_file():
            weight_map = json.loads((self.path / INDEX_FILE).read_text())["weight_map"]
        elif (self.path / SINGLE_FILE).is_file():
            with safe_open(self.path / SINGLE_FILE, framework="pt") as handle:
                weight_map = {key: SINGLE_FILE for key in handle.keys()}
        else:
            raise InvalidInputError(
                f"{self.path} holds no {SINGLE_FILE} or {INDEX_FILE}; save the model with "
                "save_pretrained(..., safe_serialization=True)"
            )
        self.weight_map: dict[str, str] = dict(weight_map)
        self._renamed: dict[str, str] = {}  # the model's key -> the checkpoint's, where transformers renames on load
        self._prefix = ""  # the model's base_model_prefix ("transformer"), which a checkpoint may store its keys without
        self._converters: list = []  # transformers' WeightConverters: tensors it builds from several stored ones (MoE experts)
        self._fused: dict[str, FusedKey] = {}  # the model's key -> the stored tensors transformers builds it from
        self._stack = ExitStack()
        self._handles: dict[str, Any] = {}
        self._safe_open = safe_open

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def unused(self, model: nn.Module) -> list[str]:
        """The checkpoint's tensors that no parameter or buffer of ``model`` is read from."""
        read = set()
        for key in model.state_dict(keep_vars=True):
            try:
                resolved = self._resolve(key)
            except InvalidInputError:
                continue
            read.update(resolved.stored if isinstance(resolved, FusedKey) else (resolved,))
        return sorted(set(self.weight_map) - read)

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def tensor(self, name: str | FusedKey) -> torch.Tensor:
        """One tensor, read from its shard (a fresh CPU tensor of the stored dtype), or built as transformers builds a
        `FusedKey` from the stored ones."""
        if isinstance(name, FusedKey):
            return build(name, self.tensor)
        try:
            shard = self.weight_map[name]
        except KeyError:
            raise InvalidInputError(f"{name!r} is not in the checkpoint {self.path}") from None
        if shard not in self._handles:
            self._handles[shard] = self._stack.enter_context(self._safe_open(self.path / shard, framework="pt"))
        return self._handles[shard].get_tensor(name)

    def materialize(
        self, module: nn.Module, prefix: str = "", skip: str | None = None, dtype: torch.dtype | None = None, buffers: bool = True,
        placed_dtype: bool = False,
    ) -> None:
        """Load every meta parameter of ``module`` from ``prefix.<name>``, and every persistent buffer stored there
        (with ``buffers=False``: only meta ones). Parameters come in ``dtype`` (default: as stored), or with
        ``placed_dtype`` in the dtype of their meta placeholder.

        Tied parameters (one Parameter in several modules) are loaded once and stay
        tied; submodules under ``skip`` (a path relative to ``module``) are left alone. Raises
        `InvalidInputError` for a tensor missing or of another shape.
        """
        prefix = f"{prefix}." if prefix else ""
        loaded: dict[int, nn.Parameter] = {}
        for owner_name, owner in module.named_modules(remove_duplicate=False):
            if skip is not None and (owner_name == skip or owner_name.startswith(skip + ".")):
                continue
            path = f"{prefix}{owner_name + '.' if owner_name else ''}"
            for name, param in list(owner._parameters.items()):
                if param is None or not param.is_meta:
                    continue
                if id(param) not in loaded:
                    value = self._read(self._resolve(path + name), path + name, param)
                    want = param.dtype if placed_dtype else dtype
                    loaded[id(param)] = nn.Parameter(value.to(want) if want is not None else value, requires_grad=False)
                owner._parameters[name] = loaded[id(param)]
            for name, buffer in list(owner._buffers.items()):
                stored = self._stored(path + name) if buffer is not None and name not in owner._non_persistent_buffers_set else None
                if stored is not None and (buffer.is_meta or buffers):  # BatchNorm statistics: the saved ones, not the initial ones
                    value = self._read(stored, path + name, buffer)
                    owner._buffers[name] = value.to(dtype) if dtype is not None and value.is_floating_point() else value

    def _read(self, key: str | FusedKey, name: str, like: torch.Tensor) -> torch.Tensor:
        """The stored tensor ``key`` for the model's ``name``; `InvalidInputError` unless it has ``like``'s shape."""
        value = self.tensor(key)
        if value.shape != like.shape:
            key = key.name if isinstance(key, FusedKey) else key
            raise InvalidInputError(
                f"{key!r} in the checkpoint {self.path} has shape {tuple(value.shape)}, but the model's {name!r} has "
                f"{tuple(like.shape)}: the checkpoint was not saved from this configuration"
            )
        return value

    def sizes(self) -> tuple[int, int]:
        """(elements, bytes) of every tensor in the checkpoint, read from the shard headers."""
        elements = nbytes = 0
        for name in self.weight_map:
            shard = self.weight_map[name]
            if shard not in self._handles:
                self._handles[shard] = self._stack.enter_context(self._safe_open(self.path / shard, framework="pt"))
            piece = self._handles[shard].get_slice(name)
            count = math.prod(piece.get_shape())
            elements += count
            nbytes += count * _DTYPE_BYTES[piece.get_dtype()]
        return elements, nbytes

    def follow_renames(self, model: nn.Module) -> None:
        """Read the checkpoint under the names ``model`` uses: transformers (5 and later) renames some stored keys
        when it loads (GPT-NeoX's ``embed_out`` is ``lm_head``; Mixtral's ``block_sparse_moe`` is ``mlp``). Tensors
        it builds from several stored ones (``WeightConverter``: fused mixture-of-experts weights) are built as it
        builds them (`fxdecomp.large.fused`)."""
        self._prefix = getattr(model, "base_model_prefix", "") or ""
        try:
            from transformers.conversion_mapping import get_model_conversion_mapping

            transforms = get_model_conversion_mapping(model)
        except Exception:  # an older transformers, or a model it does not know: keys as stored
            return
        renames = [
            (source, t.target_patterns[0])
            for t in transforms
            if type(t).__name__ == "WeightRenaming" and not getattr(t, "scope_prefix", None) and len(t.target_patterns) == 1
            for source in t.source_patterns
        ]
        self._converters = [t for t in transforms if type(t).__name__ == "WeightConverter"]
        stored_as: dict[str, str] = {}  # a stored key under transformers' renames -> the stored key
        for key in self.weight_map:
            renamed = key
            for source, target in renames:
                renamed = re.sub(source, target, renamed)
            stored_as.setdefault(renamed, key)
            if renamed != key:
                self._renamed.setdefault(renamed, key)
        self._fused = fused_sources(self._converters, stored_as)

    def _stored(self, key: str) -> str | None:
        """The stored name of the model's ``key``: as is, renamed by transformers, or with / without the base model's
        prefix (a checkpoint saved from ``GPT2Model`` read into ``GPT2LMHeadModel``, as the Hub's GPT-2 is stored)."""
        prefix = self._prefix + "." if self._prefix else None
        for name in (key, self._renamed.get(key), key[len(prefix):] if prefix and key.startswith(prefix) else None,
                     prefix + key if prefix else None):
            if name is not None and name in self.weight_map:
                return name
        return None

    def _resolve(self, key: str) -> str | FusedKey:
        stored = self._stored(key)
        if stored is not None:
            return stored
        tied = self.config.get("tie_word_embeddings", False)
        if tied and key.endswith("lm_head.weight"):
            for embedding in ("model.embed_tokens.weight", "transformer.wte.weight", "embed_tokens.weight"):
                if (stored := self._stored(embedding)) is not None:
                    return stored
        fused = self._fused.get(key)
        if fused is not None and fused.missing:
            raise InvalidInputError(fused.missing)
        if fused is not None:
            return fused
        converted = [t for c in self._converters for t in c.target_patterns if t.strip(".") and t in key]
        if converted:
            raise InvalidInputError(
                f"the checkpoint {self.path} has no tensor {key!r}, and transformers builds it ({converted[0]!r}) from "
                "stored tensors that are not there either, or not under names read here; load the model with "
                "from_pretrained and compress it in memory"
            )
        raise InvalidInputError(f"the checkpoint {self.path} has no tensor {key!r} that the model needs")

    def release(self, module: nn.Module) -> None:
        """Send ``module``'s parameters back to the meta device (tied ones stay tied), freeing their memory."""
        released: dict[int, nn.Parameter] = {}
        for owner in module.modules():
            for name, param in list(owner._parameters.items()):
                if param is not None and not param.is_meta:
                    if id(param) not in released:
                        released[id(param)] = nn.Parameter(torch.empty_like(param, device="meta"), requires_grad=False)
                    owner._parameters[name] = released[id(param)]

    def close(self) -> None:
        """Unmap the open shards (they reopen on the next read): mapped pages count in the process's RSS."""
        self._stack.close()
        self._stack = ExitStack()
        self._handles.clear()

    def __enter__(self) -> "LazyCheckpoint":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def empty_model(checkpoint: LazyCheckpoint, dtype: torch.dtype | None = None, class_name: str | None = None) -> nn.Module:
    """The checkpoint's model class built with every parameter on the meta device (buffers real).

    The class is ``class_name``, else the one ``config.json``'s ``architectures`` names (what
    ``save_pretrained`` writes), else a causal LM (`AutoModelForCausalLM`). Non-persistent buffers
    (rotary frequencies) are computed as usual, so a block runs once its parameters are
    materialized. Raises `InvalidInputError` when transformers does not know the config's model
    type or the named class.
    """
    from types import SimpleNamespace

    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    named = model_class(SimpleNamespace(**checkpoint.config), class_name)
    try:  # the class's own config class reads a model type transformers does not register (a custom model)
        config = named.config_class.from_pretrained(checkpoint.path) if named is not None else AutoConfig.from_pretrained(checkpoint.path)
    except (ValueError, KeyError) as exc:
        raise InvalidInputError(f"transformers cannot read {checkpoint.path / 'config.json'}: {exc}") from exc
    with init_empty_weights(include_buffers=False):
        if named is not None:
            model = named._from_config(config, dtype=dtype)
        else:
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    if hasattr(model, "tie_weights"):
        model.tie_weights()  # from_config on the meta device leaves tied heads untied
    checkpoint.follow_renames(model)
    return model.eval()


def model_class(config, name: str | None = None) -> type | None:
    """The transformers class ``name`` (default: the one ``config.architectures`` names, which save_pretrained writes):
    from transformers' namespace, or from the model type's modeling module (``WhisperEncoder`` is not exported).
    None when no name is given or recorded; `InvalidInputError` when transformers has no such class."""
    import importlib

    import transformers

    name = name or (getattr(config, "architectures", None) or [None])[0]
    if not name:
        return None
    found = getattr(transformers, name, None)
    if not isinstance(found, type):
        model_type = str(getattr(config, "model_type", "")).replace("-", "_")
        try:
            found = getattr(importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}"), name, None)
        except ImportError:
            found = None
    if not isinstance(found, type):
        raise InvalidInputError(f"config.json names the class {name!r}, which transformers {transformers.__version__} does not have")
    return found


def tensor_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of distinct tensors (a tied tensor counts once)."""
    seen, total = set(), 0
    for tensor in tensors:
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape)) if not tensor.is_meta else id(tensor)
        if key not in seen:
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
    return total
