"""Loading what the user names on the command line: the model, example inputs, calibration data, a budget.

Every failure is a `UsageError` (exit 2) naming the file and what it should hold.

Example::

    model = load_model("mypkg.models:resnet18", weights="r18.pt")
    inputs = load_inputs(["1,3,224,224"], None)     # seeded random float32
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import UsageError


def load_model(spec: str, weights: str | None = None):
    """An nn.Module from 'package.module:factory' or a torch.save'd model file; ``weights`` a state_dict file."""
    torch = use_torch()
    from torch import nn

    if os.path.isfile(spec):
        _import_from_working_directory()  # the model's class may live in a module beside the file, as `python` finds it
        try:
            model = torch.load(spec, map_location="cpu", weights_only=False)
        except ModuleNotFoundError as exc:
            raise UsageError(
                f"cannot load {spec!r} with torch.load: {exc}",
                f"run from the directory that holds module {exc.name!r} (the model's class), or install it",
            ) from exc
        except Exception as exc:
            raise UsageError(f"cannot load {spec!r} with torch.load: {exc}", "give a file written by torch.save(model)") from exc
        if isinstance(model, dict):
            raise UsageError(
                f"{spec!r} holds a dict (a state_dict?), not a model",
                "give the model as package.module:factory and the state_dict with --weights FILE",
            )
    elif ":" in spec:
        model = _from_factory(spec)
    else:
        raise UsageError(
            f"no model file {spec!r}, and it is not of the form package.module:factory",
            "MODEL is package.module:factory (importable from the current directory) or a file saved with torch.save(model)",
        )
    if not isinstance(model, nn.Module):
        raise UsageError(f"{spec!r} gave a {type(model).__name__}, not a torch.nn.Module")
    if weights:
        state = torch_load(weights, "--weights")
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise UsageError(f"--weights {weights!r} holds a {type(state).__name__}, not a state_dict")
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            raise UsageError(f"the weights in {weights!r} do not fit the model: {exc}") from exc
    return model.eval()


def _import_from_working_directory() -> None:
    if str(Path.cwd()) not in sys.path and "" not in sys.path:
        sys.path.insert(0, str(Path.cwd()))  # the console script does not put the working directory on sys.path


def _from_factory(spec: str):
    module_name, _, attr = spec.partition(":")
    _import_from_working_directory()
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise UsageError(
            f"cannot import module {module_name!r} of {spec!r}: {exc}",
            "MODEL is package.module:factory, importable from the current directory (or installed)",
        ) from exc
    target: Any = module
    for part in attr.split("."):
        if not part or not hasattr(target, part):
            raise UsageError(f"module {module_name!r} has no {attr!r}", f"name a function or class defined in {module_name}")
        target = getattr(target, part)
    if not callable(target):
        return target
    try:
        return target()
    except Exception as exc:
        raise RuntimeError(f"the factory {spec} raised {type(exc).__name__}: {exc}") from exc


def load_inputs(shapes: Sequence[str] | None, path: str | None) -> tuple:
    """Example inputs from ``--input-shape`` strings (seeded random float32) or a torch.save'd file."""
    torch = use_torch()
    if path:
        value = torch_load(path, "--inputs")
        items = (value,) if isinstance(value, torch.Tensor) else value
        if not isinstance(items, (tuple, list)) or not items or not all(isinstance(x, torch.Tensor) for x in items):
            raise UsageError(f"--inputs {path!r} must hold a tensor or a tuple of tensors, got {type(value).__name__}")
        return tuple(items)
    generator = torch.Generator().manual_seed(0)
    return tuple(torch.randn(parse_shape(s), generator=generator) for s in shapes or ())


def load_model_and_inputs(args, progress) -> tuple[Any, tuple]:
    """The model (``--model``, ``--weights``) and its example inputs (``--input-shape``, ``--inputs``), as one progress stage."""
    with progress.stage("loading the model"):
        return load_model(args.model, args.weights), load_inputs(args.input_shape, args.inputs)


def parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(part) for part in text.replace("x", ",").split(","))
    except ValueError:
        shape = ()
    if not shape or any(d < 1 for d in shape):
        raise UsageError(f"bad --input-shape {text!r}", "give positive integers separated by commas, e.g. --input-shape 1,3,224,224")
    return shape


def parse_budget(text: str):
    """'0.5' -> a FLOP fraction; 'params:0.3' / 'flops:0.5' / 'latency:0.7' -> that Budget."""
    from ..budget import Budget
    from ..errors import BudgetError

    metric, _, value = str(text).rpartition(":")
    metric = metric.strip().lower() or "flops"
    if metric not in ("flops", "params", "latency"):
        raise BudgetError(f"unknown budget metric {metric!r} in --budget {text!r}; use flops:F, params:F or a plain fraction")
    try:
        fraction = float(value)
    except ValueError:
        raise BudgetError(f"--budget {text!r} is not a fraction; give e.g. 0.5, params:0.3 or flops:0.5") from None
    return Budget(**{metric: fraction})


def load_calibration(path: str) -> list[tuple]:
    torch = use_torch()
    value = torch_load(path, "--calibration")
    if isinstance(value, torch.Tensor) or not isinstance(value, (list, tuple)) or not value:
        raise UsageError(
            f"--calibration {path!r} must hold a non-empty list of input tuples, got {type(value).__name__}",
            "save it with torch.save([(x1,), (x2,), ...], 'calibration.pt')",
        )
    batches = []
    for item in value:
        batch = (item,) if isinstance(item, torch.Tensor) else tuple(item) if isinstance(item, (list, tuple)) else None
        if not batch or not all(isinstance(x, torch.Tensor) for x in batch):
            raise UsageError(f"--calibration {path!r}: every entry must be a tensor or a tuple of tensors")
        batches.append(batch)
    return batches


def torch_load(path: str, flag: str):
    torch = use_torch()
    if not os.path.isfile(path):
        raise UsageError(f"{flag}: no file {path!r}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise UsageError(f"{flag}: cannot load {path!r} (torch.load, weights_only=True): {exc}") from exc


def read_json(path: str, what: str):
    if not os.path.isfile(path):
        raise UsageError(f"no {what} file {path!r}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UsageError(f"cannot read {what} {path!r} as JSON: {exc}") from exc


def use_torch(threads: int | None = None):
    """torch, imported on first use (``--help`` stays fast), with its CPU threads set when given."""
    import torch

    if threads is not None:
        torch.set_num_threads(threads)
    return torch


def split_list(text: str | None) -> list[str] | None:
    """'svd, tucker2' -> ['svd', 'tucker2']; None or '' -> None."""
    return [m.strip() for m in text.split(",") if m.strip()] if text else None

