"""Tensors transformers builds from several stored ones when it loads: read from a checkpoint as it would build them.

transformers (5.x) stores a mixture of experts' weights one per expert
(``mlp.experts.3.gate_proj.weight``, Mixtral's ``block_sparse_moe.experts.3.w1.weight``) and fuses
them on load into the stacked parameters its model holds (``mlp.experts.gate_up_proj``), with the
model's ``WeightConverter``s (``transformers.conversion_mapping``). `fused_sources` finds the stored
tensors each such parameter is built from; `build` runs the converter's own operations on them, so a
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
    missing: str = ""  # why it cannot be built: the stored tensors it lacks (`_missing`)

    @property
    def stored(self) -> tuple[str, ...]:
        return tuple(key for _, keys in self.sources for key in keys)


def fused_sources(converters: list, stored_as: dict[str, str]) -> dict[str, FusedKey]:
    """{model key: its `FusedKey`} of every tensor a converter builds from tensors in ``stored_as`` ({the name after
    transformers' renames: the stored name}), found in one pass over the checkpoint's names. One that lacks some
    expert's tensor says which in its ``missing``."""
    found: dict[str, tuple[Any, str, str, dict[str, list[tuple[int, str]]]]] = {}
    for converter in converters:
        targets = [t for t in converter.target_patterns if t.strip(".")]
        for pattern in converter.source_patterns:
            regex = re.compile("(.*?)" + re.escape(pattern).replace(r"\*", r"(\d+)") + "(.*)$")
            for name, stored in stored_as.items():
                match = regex.match(name)
                if match is None:
                    continue
                prefix, *index, suffix = match.groups()
                for target in targets:
                    entry = found.setdefault(prefix + target + suffix, (converter, prefix, suffix, {}))
                    if entry[0] is converter:
                        entry[3].setdefault(pattern, []).append((int(index[0]) if index else 0, stored))
    fused = {}
    for key, (converter, prefix, suffix, by_pattern) in found.items():
        if len(by_pattern) < len(converter.source_patterns):
            continue  # not every source is stored: transformers would not build it from these either
        sources = [(pattern, sorted(by_pattern[pattern])) for pattern in converter.source_patterns]
        fused[key] = FusedKey(key, converter, tuple((pattern, tuple(s for _, s in pairs)) for pattern, pairs in sources),
                              _missing(key, prefix, suffix, sources))
    return fused


def _missing(key: str, prefix: str, suffix: str, sources: list[tuple[str, list[tuple[int, str]]]]) -> str:
    """The error for ``key`` when a source pattern lacks some of experts 0..E-1 (E: one past the highest stored), or ""."""
    count = max(index for _, pairs in sources for index, _ in pairs) + 1
    missing = [prefix + pattern.replace("*", str(e)) + suffix for pattern, pairs in sources
               for e in sorted(set(range(count)) - {index for index, _ in pairs})]
    if not missing:
        return ""
    return (f"the checkpoint lacks {len(missing)} of the tensors transformers builds {key!r} from (experts 0 to {count - 1}): "
            f"{', '.join(missing[:4])}{', ...' if len(missing) > 4 else ''} (names as transformers renames them on load); "
            "was the checkpoint written completely?")


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
