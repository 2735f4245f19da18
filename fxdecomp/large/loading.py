"""Load a compressed transformers model back: `load_compressed`.

Two kinds of directory hold one:

- what `compress_sequential` writes with ``out=`` (a plan file beside config.json and the
  shards): the model's class is built on the meta device and every tensor is read from
  the shards one at a time (`LazyCheckpoint.materialize`), so a model larger than memory
  is never held twice;
- what ``save_pretrained`` writes of a kept model (`CompressionResult.apply_to`, or
  `compress_sequential`'s model in memory): its ``config.json`` holds the record of
  `fxdecomp.kept_record`. transformers' own ``from_pretrained`` loads everything it knows
  how to (renamed and fused keys, mixture-of-experts weights, buffers, ties, dtype), the
  decomposed layers' structures are then put in place of the dense layers it built
  (`fxdecomp.keep_model.rebuild_kept`) and their factors read from the checkpoint.

Either way every stored tensor must find its place and every parameter its tensor:
anything else raises `InvalidInputError` instead of leaving a layer random or a tensor unread.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from ..errors import InvalidInputError
from ..keep_model import rebuild_kept
from ..capture.experts import expert_of
from ..kept_experts import experts_path
from ..kept_attention import KeptAttention
from ..kept_record import RECORD_KEY, KeptEntry, expert_stacks, from_json, to_json
from .checkpoint import LazyCheckpoint, empty_model, model_class
from .layers import linear_spec

PLAN_FILE = "fxdecomp_plan.json"


def load_compressed(path: str | Path, dtype: torch.dtype | None = None) -> nn.Module:
    """A compressed model saved to ``path``, in its own transformers class, its decomposed layers `KeptLayer`s.

    ``path``: a directory written by `compress_sequential` (``out=``) or by ``save_pretrained`` of a
    kept model (see the module doc). ``dtype``: the floating dtype to load in (default: as stored).
    The class's own ``from_pretrained`` cannot load either: it builds the dense layers and leaves
    them random. Parameters are trainable (``requires_grad``), as ``from_pretrained`` leaves them.
    Raises `InvalidInputError` if the directory holds neither kind, or a tensor does not fit.
    """
    if dtype is not None and not isinstance(dtype, torch.dtype):
        raise InvalidInputError(f"dtype must be a torch.dtype (torch.bfloat16) or None, got {dtype!r}")
    path = Path(path)
    with LazyCheckpoint(path) as checkpoint:
        record = checkpoint.config.get(RECORD_KEY)
        if (path / PLAN_FILE).is_file():
            model = _streamed(checkpoint, json.loads((path / PLAN_FILE).read_text()), record, dtype)
        elif record is not None:
            model = _pretrained(checkpoint, record, dtype)
        elif RECORD_KEY in checkpoint.config:
            raise InvalidInputError(
                f"{path} holds a kept model whose decomposed layers could not be recorded when it was made (apply_to warned: "
                "their modules are not their method's structure); keep such a model with torch.save of the whole model"
            )
        else:
            raise InvalidInputError(
                f"{path} holds no {PLAN_FILE} and its config.json no {RECORD_KEY!r}: it was not written by fxdecomp "
                "(compress_sequential, or save_pretrained of a kept model)"
            )
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    return model.eval()


def _streamed(checkpoint: LazyCheckpoint, plan: dict, record: dict | None, dtype: torch.dtype | None) -> nn.Module:
    """compress_sequential's output: the class on the meta device, then every tensor read from the shards."""
    model = empty_model(checkpoint, dtype, class_name=plan.get("model_class"))
    if record is not None:  # every decomposed layer, those of an earlier compression included
        rebuild_kept(model, record)
    else:  # written before the record existed: the plan's decisions, svd of Linear layers, make one
        entries = [KeptEntry(d["name"], d["method"], tuple(d["ranks"]), linear_spec(model.get_submodule(d["name"])))
                   for d in plan["decisions"] if d["method"] != "keep"]
        rebuild_kept(model, to_json(entries))
    checkpoint.materialize(model, dtype=dtype)
    unused = checkpoint.unused(model)
    if unused:  # a tensor the rebuilt model does not hold would be lost without a word
        raise InvalidInputError(
            f"{len(unused)} tensor(s) of {checkpoint.path} have no place in the rebuilt {type(model).__name__} (e.g. "
            f"{', '.join(unused[:3])}): the directory was not written by this fxdecomp version, or was changed"
        )
    return model


def _pretrained(checkpoint: LazyCheckpoint, record: dict, dtype: torch.dtype | None) -> nn.Module:
    """A saved kept model: transformers loads what it knows, then the recorded factors take the dense layers' place.

    Peak memory is about the dense model's: from_pretrained builds the layers that are then swapped. Building the
    recorded structures inside its __init__ instead would avoid that, but transformers 5 then renames the factors'
    keys on save and not on load (ViT's ``attention.key.0.weight``) and refuses a tie into a decomposed head.
    """
    from transformers.utils import logging as transformers_logging

    cls = model_class(SimpleNamespace(**checkpoint.config))  # the class reads its own config (its config_class)
    if cls is None:
        raise InvalidInputError(f"{checkpoint.path / 'config.json'} names no model class (architectures); save the model with save_pretrained")
    # The dense layers the class builds in place of the decomposed ones are reported missing and the factors
    # unexpected: both are checked below, so transformers' report is silenced.
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()
    try:
        # It initializes the dense layers it builds in place of the decomposed ones: from the global generator, which
        # the caller's random draws must not feel.
        with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
            warnings.simplefilter("ignore")
            model, info = cls.from_pretrained(checkpoint.path, output_loading_info=True, **({"dtype": dtype} if dtype else {}))
    finally:
        transformers_logging.set_verbosity(verbosity)
    rebuild_kept(model, record)
    # Everything a rebuilt module holds is read from the checkpoint: its factors (built on the meta device), and what
    # it took from the dense layer from_pretrained built (a KeptAttention's undecomposed projection, a folded bias).
    for path in _rebuilt(model, record):
        model.get_submodule(path).to("meta")
    checkpoint.follow_renames(model)
    factors = {name for name, p in model.named_parameters() if p.is_meta}
    # Each in the dtype from_pretrained gave the dense layer it replaces (T5's wo stays float32 in a float16 model);
    # transformers loaded the buffers.
    checkpoint.materialize(model, buffers=False, placed_dtype=True)
    state = model.state_dict()
    missing = sorted(k for k in info.get("missing_keys", ()) if k in state and k not in factors)
    unread = sorted(k for k in info.get("unexpected_keys", ()) if k not in factors)
    mismatched = [k for k, *_ in info.get("mismatched_keys", ())]
    if missing or unread or mismatched:
        raise InvalidInputError(
            f"{checkpoint.path} does not load into {cls.__name__} with its recorded decomposed layers: "
            + "; ".join(f"{what}: {', '.join(keys[:3])}" for what, keys in
                        (("missing", missing), ("not read", unread), ("of another shape", mismatched)) if keys)
            + (". The class built from config.json has tensors the saved model lacked: a constructor argument the config "
               "does not record (BertModel(add_pooling_layer=False))?" if missing and not unread else "")
        )
    logging.getLogger(__name__).info("loaded %s with %d decomposed layers", cls.__name__, len(record.get("layers", ())))
    return model


def _rebuilt(model: nn.Module, record: dict) -> list[str]:
    """The paths of the modules `rebuild_kept` put in place: each decomposed layer (a `KeptAttention`'s projections: the
    attention) and each layer a BatchNorm was folded into."""
    entries, folded = from_json(record)
    paths = set()
    stacks = expert_stacks(record)
    for entry in entries:
        if expert_of(stacks, entry.name):  # its stack's KeptExperts: the factors and the experts kept dense
            paths.add(experts_path(entry.name))
            continue
        owner = entry.name.rpartition(".")[0]
        paths.add(owner if owner and isinstance(model.get_submodule(owner), KeptAttention) else entry.name)
    paths |= {layer for layer, _ in folded}
    return sorted(p for p in paths if not any(p.startswith(q + ".") for q in paths))  # an outer module covers its factors
