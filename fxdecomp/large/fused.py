"""Tensors transformers builds from several stored ones when it loads: read from a checkpoint as it would build them.

transformers (5.x) stores a mixture of experts' weights one per expert
(``mlp.experts.3.gate_proj.weight``, Mixtral's ``block_sparse_moe.experts.3.w1.weight``) and fuses
them on load into the stacked parameters its model holds (``mlp.experts.gate_up_proj``), with the
model's ``WeightConverter``s (``transformers.conversion_mapping``). `fused_source` finds the stored
tensors one such parameter is built from; `build` runs the converter's own operations on them, so a
streamed block gets exactly what ``from_pretrained`` would give it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import InvalidInputError


@dataclass(frozen=True)
class FusedKey:
    """A model tensor built from stored ones: its name, its converter, and per source pattern the stored keys
    (in expert order)."""

    name: str
    converter: Any  # a transformers WeightConverter
    sources: tuple[tuple[str, tuple[str, ...]], ...]

    @property
    def stored(self) -> tuple[str, ...]:
        return tuple(key for _, keys in self.sources for key in keys)


def fused_source(key: str, converters: list, stored_as: dict[str, str]) -> FusedKey | None:
    """The `FusedKey` of the model's ``key`` if a converter builds it from tensors in ``stored_as`` ({the name
    after transformers' renames: the stored name}), else None."""
    for converter in converters:
        for target in converter.target_patterns:
            if not target.strip(".") or target not in key:
                continue
            prefix, _, suffix = key.partition(target)
            sources = []
            for pattern in converter.source_patterns:
                regex = re.compile(re.escape(prefix) + re.escape(pattern).replace(r"\*", r"(\d+)") + re.escape(suffix) + "$")
                found = sorted((int(m.group(1)) if m.groups() else 0, stored) for name, stored in stored_as.items()
                               if (m := regex.match(name)))
                sources.append((pattern, [index for index, _ in found], tuple(stored for _, stored in found)))
            if all(keys for *_, keys in sources):
                _check_complete(key, prefix, suffix, sources)
                return FusedKey(key, converter, tuple((pattern, keys) for pattern, _, keys in sources))
    return None


def _check_complete(key: str, prefix: str, suffix: str, sources: list) -> None:
    """`InvalidInputError` naming the stored tensors missing for ``key``: every source pattern needs experts 0..E-1."""
    count = max(max(indices) for _, indices, _ in sources) + 1
    missing = [prefix + pattern.replace("*", str(e)) + suffix for pattern, indices, _ in sources
               for e in sorted(set(range(count)) - set(indices))]
    if missing:
        raise InvalidInputError(
            f"the checkpoint lacks {len(missing)} of the tensors transformers builds {key!r} from (experts 0 to {count - 1}): "
            f"{', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''} (names as transformers renames them on load); "
            "was the checkpoint written completely?"
        )


def build(fused: FusedKey, read: Callable[[str], torch.Tensor]) -> torch.Tensor:
    """The tensor transformers builds for ``fused`` from the stored tensors ``read`` gives. Raises
    `InvalidInputError` naming the tensor where the converter's operations fail on them."""
    converter = fused.converter
    tensors: dict[str, Any] = {pattern: [read(key) for key in keys] for pattern, keys in fused.sources}
    try:
        for operation in converter.operations:
            tensors = operation.convert(tensors, source_patterns=converter.source_patterns,
                                        target_patterns=converter.target_patterns, full_layer_name=fused.name)
        (value,) = tensors.values()
    except Exception as exc:
        raise InvalidInputError(
            f"transformers builds {fused.name!r} from {len(fused.stored)} stored tensors, and its conversion "
            f"({', '.join(type(o).__name__ for o in converter.operations)}) failed on them here ({exc}); load the model "
            "with from_pretrained and compress it in memory"
        ) from None
    return value.contiguous()
