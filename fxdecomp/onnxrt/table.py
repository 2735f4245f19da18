"""Latency tables: per-layer timings measured on the target device, read by the planner instead of timing here.

``fxdecomp latency-pack`` (`fxdecomp.latency_pack`) writes a folder of ONNX files,
one per structure the planner may pick, with ``manifest.json``; the standalone
``device_bench.py`` times them on the device and writes the table; the plan pass
reads it with ``latency_table = "table.json"``.

Table format (JSON)::

    {"format": "fxdecomp-latency-table", "version": 1,
     "device": {"platform": ..., "machine": ..., "processor": ..., "onnxruntime": ...},
     "provider": "CPUExecutionProvider", "provider_options": {}, "threads": 1,
     "onnxruntime": "1.32.0", "protocol": {"warmup": 1, "runs": 5, "min_seconds": 0.05, "max_runs": 10000},
     "entries": [{"key": "<structure key, canonical JSON>", "file": "layers/0001.onnx",
                  "what": {"layers": [...], "method": "svd", "ranks": [8], "input": [1, 64, 28, 28]},
                  "median_ms": ..., "p10_ms": ..., "p90_ms": ..., "mean_ms": ..., "min_ms": ..., "runs": ...}]}

An entry's ``key`` is `fxdecomp.onnxrt.layer_cache.structure_key` as canonical JSON
(what is timed: layer spec, input shape, method, ranks, options), or `model_key`
for the whole model. Times are milliseconds per ``session.run``.

Example::

    table = LatencyTable("table.json")
    table.layer_ms(spec, (1, 64, 28, 28), "svd", (8,))
    table.model_ms()   # the whole model, as packed
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import InvalidInputError
from .layer_cache import STATISTICS, LayerTimer, Spec, canonical, check_shape, structure_key

__all__ = ["MANIFEST_FORMAT", "TABLE_FORMAT", "LatencyTable", "LatencyTableError", "model_key"]

TABLE_FORMAT = "fxdecomp-latency-table"
MANIFEST_FORMAT = "fxdecomp-latency-pack"
VERSION = 1


class LatencyTableError(InvalidInputError):
    """A latency table is unreadable, or lacks an entry the plan needs (the message names it)."""


def model_key(input_shapes: Sequence[Sequence[int]]) -> str:
    """The table key of the whole model packed at these input shapes."""
    return canonical({"kind": "model", "inputs": [[int(d) for d in s] for s in input_shapes]})


def describe(spec: Spec, input_shape: Sequence[int], method: str | None, ranks: Sequence[int]) -> str:
    layer = (
        f"Linear({spec.in_features}->{spec.out_features})"
        if spec.kind == "linear"
        else f"Conv2d({spec.in_channels}->{spec.out_channels}, {spec.kernel_size[0]}x{spec.kernel_size[1]})"
    )
    what = "the layer itself" if method is None else f"method {method} at ranks {tuple(int(r) for r in ranks)}"
    return f"{layer} at input {tuple(int(d) for d in input_shape)}: {what}"


class LatencyTable(LayerTimer):
    """A latency table read from ``path``; answers `layer_ms` / `sites_ms` like `LayerLatency`, without timing.

    ``statistic``: "median" (default), "p10" or "min". Raises LatencyTableError for a
    missing or malformed file, and for a lookup the table does not hold.
    """

    is_table = True

    def __init__(self, path: str | os.PathLike, statistic: str = "median"):
        if statistic not in STATISTICS:
            raise InvalidInputError(f"statistic must be one of {STATISTICS}, got {statistic!r}")
        self.path, self.statistic = Path(path), statistic
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise LatencyTableError(
                f"cannot read the latency table {str(path)!r}: {exc}; write one with device_bench.py on the device"
            ) from exc
        if not isinstance(data, dict) or data.get("format") != TABLE_FORMAT or data.get("version") != VERSION:
            raise LatencyTableError(
                f"{str(path)!r} is not a latency table (format {TABLE_FORMAT!r}, version {VERSION}); "
                "write one with: python device_bench.py PACK_DIR --out table.json"
            )
        self.data = data
        self.provider: str = data.get("provider", "")
        self.provider_options: dict[str, str] = dict(data.get("provider_options", {}))
        self.threads: int = int(data.get("threads", 1))
        self.device: dict[str, Any] = dict(data.get("device", {}))
        self._entries: dict[str, dict[str, Any]] = {e["key"]: e for e in data.get("entries", []) if isinstance(e, dict) and "key" in e}

    def __repr__(self) -> str:
        return f"LatencyTable({str(self.path)!r}, {len(self._entries)} entries, {self.provider}, {self.device.get('processor', '?')})"

    def layer_ms(
        self,
        spec: Spec,
        input_shape: Sequence[int],
        method: str | None = None,
        ranks: Sequence[int] = (),
        options: Mapping[str, Any] | None = None,
    ) -> float:
        """The table's time (ms) of the layer (``method=None``) or of ``method``'s structure at ``ranks``."""
        shape = check_shape(spec, input_shape)
        entry = self._entries.get(canonical(structure_key(spec, shape, method, ranks, options)))
        if entry is None:
            raise LatencyTableError(
                f"the latency table {str(self.path)!r} has no entry for {describe(spec, shape, method, ranks)}"
                + (f", options {dict(options)}" if options else "")
                + "; make the pack with the plan's options (fxdecomp latency-pack with the same recipe and methods) and time it again"
            )
        return float(entry[f"{self.statistic}_ms"])

    def model_ms(self, input_shapes: Sequence[Sequence[int]]) -> float:
        """The table's time (ms) of the whole packed model at these input shapes."""
        entry = self._entries.get(model_key(input_shapes))
        if entry is None:
            raise LatencyTableError(
                f"the latency table {str(self.path)!r} has no whole-model entry at input shapes "
                f"{[list(s) for s in input_shapes]}; pack the model with the same example inputs"
            )
        return float(entry[f"{self.statistic}_ms"])

    def check_setup(self, provider: str | None, provider_options: Mapping[str, Any] | None, threads: int | None) -> None:
        """Refuse a plan that asks for another provider, provider options or thread count than the table was measured with."""
        asked = {
            "provider": provider,
            "provider_options": None if provider_options is None else {str(k): str(v) for k, v in provider_options.items()},
            "threads": threads,
        }
        have = {"provider": self.provider, "provider_options": self.provider_options, "threads": self.threads}
        wrong = {k: v for k, v in asked.items() if v is not None and v != have[k]}
        if wrong:
            raise LatencyTableError(
                f"the latency table {str(self.path)!r} was measured with {have}, the plan asks for {wrong}; "
                "drop those plan options or time the pack again with them (device_bench.py --provider/--provider-option/--threads)"
            )
