"""What a kept model's decomposed layers are, written into its transformers config so that a saved copy loads back.

A kept model (`CompressionResult.apply_to`, `fxdecomp.large.compress_sequential`) holds
`fxdecomp.kept_layer.KeptLayer` modules whose state-dict keys (``c_attn.0.weight``) its class
does not build: ``from_pretrained`` of that class would leave the factors unused and start
the layers from random weights. So the copy's ``config`` records, per decomposed layer, the
decomposer kind, method, ranks and the spec of the layer the graph decomposed (plus the
BatchNorms folded away, and the padding a conv that pads in its own forward needs);
``save_pretrained`` writes it into ``config.json`` under `RECORD_KEY`, and
`fxdecomp.large.load_compressed` rebuilds the structures from it
(`fxdecomp.keep_model.rebuild_kept`) and reads their tensors. A model loaded so and compressed
again keeps its earlier entries (`merged`).

Example::

    small = result.apply_to(model)           # small.config.fxdecomp_decomposed is set
    small.save_pretrained("small")
    again = fxdecomp.large.load_compressed("small")
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from collections.abc import Callable
from typing import Any

from .errors import InvalidInputError
from .layer_spec import ConvSpec, LinearSpec

RECORD_KEY = "fxdecomp_decomposed"
FORMAT = "fxdecomp.kept/1"


@dataclass(frozen=True)
class KeptEntry:
    """One decomposed layer: its module path, the decomposer's method and ranks, the spec it was decomposed as, and the
    padding (F.pad order) a pad layer applies before the factors where the layer pads in its own forward."""

    name: str
    method: str
    ranks: tuple[int, ...]
    spec: ConvSpec | LinearSpec
    pad: tuple[int, ...] = ()
    pad_mode: str = "zeros"


def to_json(entries: list[KeptEntry], folded: list[tuple[str, str]] = (), stacks: dict[str, bool] | None = None) -> dict[str, Any]:
    """The record as JSON data: ``{"format", "layers": [...], "folded": [[layer, batchnorm], ...]}``, and
    ``"expert_stacks": {stack path: stored (E, out, in)?}`` where experts of stacked weights are decomposed
    (`fxdecomp.kept_experts`; an entry ``<stack>_expert<e>`` is one of them)."""
    layers = [
        {"name": e.name, "method": e.method, "ranks": list(e.ranks), "spec_kind": "linear" if isinstance(e.spec, LinearSpec) else "conv",
         "spec": dataclasses.asdict(e.spec), "pad": list(e.pad), "pad_mode": e.pad_mode}
        for e in entries
    ]
    record = {"format": FORMAT, "layers": layers, "folded": [list(pair) for pair in folded]}
    if stacks:
        record["expert_stacks"] = dict(stacks)
    return record


def expert_stacks(data: Any) -> dict[str, bool]:
    """The record's ``expert_stacks`` (none in a record without decomposed experts)."""
    stacks = data.get("expert_stacks", {}) if isinstance(data, dict) else {}
    if not isinstance(stacks, dict) or not all(isinstance(v, bool) for v in stacks.values()):
        raise InvalidInputError(f"config.json's {RECORD_KEY!r} has a malformed 'expert_stacks'; was it edited?")
    return stacks


def from_json(data: Any) -> tuple[list[KeptEntry], list[tuple[str, str]]]:
    """The entries and folded pairs of a record read from ``config.json``. Raises `InvalidInputError` if malformed."""
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise InvalidInputError(f"config.json's {RECORD_KEY!r} is not a {FORMAT} record; was it written by this fxdecomp?")
    entries = []
    try:
        for layer in data.get("layers", []):
            fields = {k: tuple(v) if isinstance(v, list) else v for k, v in layer["spec"].items()}
            spec = LinearSpec(**fields) if layer["spec_kind"] == "linear" else ConvSpec(**fields)
            entries.append(KeptEntry(layer["name"], layer["method"], tuple(layer["ranks"]), spec, tuple(layer.get("pad", ())),
                                     layer.get("pad_mode", "zeros")))
        folded = [(str(layer), str(norm)) for layer, norm in data.get("folded", [])]
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidInputError(f"config.json's {RECORD_KEY!r} is malformed ({type(exc).__name__}: {exc}); was it edited?") from exc
    return entries, folded


def merged(
    previous: Any, entries: list[KeptEntry], folded: list[tuple[str, str]], present: Callable[[str], bool],
    stacks: dict[str, bool] | None = None,
) -> dict[str, Any]:
    """The record of ``entries`` after the ``previous`` record's entries still ``present`` (a model loaded by
    load_compressed and compressed again: its earlier layers stay decomposed, its new candidates are their factors),
    outer layers before the factors inside them, as `rebuild` order needs."""
    before, before_folded = from_json(previous) if previous else ([], [])
    layers = sorted([e for e in before if present(e.name)] + list(entries), key=lambda e: e.name.count("."))
    return to_json(layers, [*before_folded, *folded], {**(expert_stacks(previous) if previous else {}), **(stacks or {})})


def config_of(model: Any) -> Any:
    """``model.config`` when it is a transformers config (what ``save_pretrained`` writes), else None."""
    config = getattr(model, "config", None)
    return config if hasattr(config, "to_json_file") else None


def write(model: Any, record: dict[str, Any] | None) -> bool:
    """Set the record (None: none) on ``model``'s transformers config; returns whether the model has one."""
    config = config_of(model)
    if config is None:
        return False
    setattr(config, RECORD_KEY, record)
    return True


__all__ = ["FORMAT", "KeptEntry", "RECORD_KEY", "config_of", "expert_stacks", "from_json", "merged", "to_json", "write"]
