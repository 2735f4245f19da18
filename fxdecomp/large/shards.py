"""Safetensors shards written tensor by tensor: what is written is on disk, not in memory.

safetensors' own writers (`safetensors.torch.save_file`) take every tensor of a
file at once, so a writer built on them holds a whole shard (1 GiB by default) in
memory before it writes it; on a 7B model that shard was a sixth of the peak. This
writer appends each tensor's bytes to a part file per dtype as it comes and, when
the shard is full, writes the file in safetensors' layout (the format written by
hand: safetensors has no incremental writer): an 8-byte little-endian header
length, the JSON header (tensor dtypes, shapes and ``data_offsets``, plus
``__metadata__``) padded with spaces to 8 bytes, then the data, grouped by dtype
from the widest element to the narrowest, so that every tensor starts at a
multiple of its element size, as safetensors itself lays them out. The files are
read back and checked by safetensors in the tests.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import sys
from pathlib import Path

import torch
from torch import nn

from ..errors import InvalidInputError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

SAFETENSORS_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2",
}


class _OpenShard:
    """One shard being written: a part file per dtype on disk, the header entries in memory."""

    def __init__(self, stem: Path):
        self.stem = stem
        self.parts: dict[torch.dtype, tuple[Path, object]] = {}  # dtype -> (path, open file)
        self.entries: dict[str, tuple[torch.dtype, list[int], int, int]] = {}  # name -> (dtype, shape, start, end) in its part
        self.bytes = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append ``tensor``'s bytes to its dtype's part file (`ShardWriter.add` checked the dtype)."""
        if tensor.dtype not in self.parts:
            path = self.stem.with_name(f"{self.stem.name}.{SAFETENSORS_DTYPES[tensor.dtype]}.part")
            self.parts[tensor.dtype] = (path, path.open("wb", buffering=0))  # unbuffered: written when add returns
        handle = self.parts[tensor.dtype][1]
        start = handle.tell()
        if tensor.numel():
            data = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())  # the tensor's own bytes, no copy
            while data:  # a raw write may be partial (Linux writes at most 2 GiB per call)
                data = data[handle.write(data) :]
        self.entries[name] = (tensor.dtype, list(tensor.shape), start, handle.tell())
        self.bytes += handle.tell() - start

    def finish(self, path: Path, metadata: dict[str, str]) -> list[str]:
        """Write the shard to ``path`` (header, then the parts widest dtype first); returns its tensor names."""
        order = sorted(self.parts, key=lambda d: (-d.itemsize, SAFETENSORS_DTYPES[d]))
        base, bases = 0, {}
        for dtype in order:
            bases[dtype] = base
            base += self.parts[dtype][1].tell()
        header: dict[str, object] = {"__metadata__": metadata}
        for name, (dtype, shape, start, end) in self.entries.items():
            header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": shape, "data_offsets": [bases[dtype] + start, bases[dtype] + end]}
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        with path.open("wb") as out:
            out.write(struct.pack("<Q", len(text)))
            out.write(text)
            for dtype in order:
                part, handle = self.parts[dtype]
                handle.close()
                with part.open("rb") as source:
                    shutil.copyfileobj(source, out, 16 << 20)
                part.unlink()
        return list(self.entries)


class ShardWriter:
    """Writes tensors into safetensors shards of at most ``max_shard_bytes`` and the index beside them.

    A tensor goes to disk when it is added (see the module docstring): the writer
    holds no tensor, whatever the shard size. ``close`` finishes the last shard and
    writes ``model.safetensors.index.json`` (or a single ``model.safetensors`` when
    everything fit in one shard), in the layout ``from_pretrained`` reads.

    Raises:
        InvalidInputError: a tensor whose dtype safetensors cannot store, a name added twice, or
            metadata that is not strings.
    """

    def __init__(self, path: str | os.PathLike, max_shard_bytes: int = 2 * 1024**3, metadata: dict[str, str] | None = None):
        if sys.byteorder != "little":
            raise InvalidInputError("ShardWriter writes little-endian safetensors files; this machine is big-endian")
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.max_shard_bytes = max_shard_bytes
        self.metadata = {"format": "pt", **(metadata or {})}
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in self.metadata.items()):
            raise InvalidInputError(f"safetensors metadata maps strings to strings; got {self.metadata!r}")
        self._open: _OpenShard | None = None
        self._shards: list[list[str]] = []
        self._names: set[str] = set()
        self._total = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self._names:
            raise InvalidInputError(f"{name} was already written to this checkpoint")
        if tensor.dtype not in SAFETENSORS_DTYPES:
            raise InvalidInputError(f"{name}: dtype {tensor.dtype} has no safetensors name; cast it to a supported dtype first")
        tensor = tensor.detach().contiguous().cpu()
        size = tensor.numel() * tensor.element_size()
        if self._open is not None and self._open.entries and self._open.bytes + size > self.max_shard_bytes:
            self._flush()
        if self._open is None:
            self._open = _OpenShard(self._stem(len(self._shards)))
        self._open.write(name, tensor)
        self._names.add(name)
        self._total += size

    def add_module(self, module: nn.Module, prefix: str) -> None:
        """Every parameter and persistent buffer of ``module`` under ``prefix.`` (shared tensors once)."""
        for name, tensor in module.state_dict(prefix=f"{prefix}." if prefix else "", keep_vars=False).items():
            self.add(name, tensor)

    def _stem(self, index: int) -> Path:
        """Where shard ``index`` is written before `close` names it: its part files and ``.safetensors.tmp``."""
        return self.path / f"shard-{index:05d}"

    def _finished(self, index: int) -> Path:
        return self.path / f"{self._stem(index).name}.safetensors.tmp"

    def _flush(self) -> None:
        shard = self._open or _OpenShard(self._stem(len(self._shards)))
        self._shards.append(shard.finish(self._finished(len(self._shards)), self.metadata))
        self._open = None

    def abort(self) -> None:
        """Delete what an unfinished write left (part files, finished shards not yet renamed); for error paths."""
        if self._open is not None:
            for part, handle in self._open.parts.values():
                handle.close()
                part.unlink(missing_ok=True)
            self._open = None
        for i in range(len(self._shards)):
            self._finished(i).unlink(missing_ok=True)
        self._shards = []

    def close(self) -> list[Path]:
        """Finish the files; returns the shard paths."""
        if self._open is not None or not self._shards:
            self._flush()
        count = len(self._shards)
        if count == 1:
            os.replace(self._finished(0), self.path / SINGLE_FILE)
            return [self.path / SINGLE_FILE]
        names = [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        weight_map = {}
        for i, (name, keys) in enumerate(zip(names, self._shards)):
            os.replace(self._finished(i), self.path / name)
            weight_map.update({key: name for key in keys})
        index = {"metadata": {"total_size": self._total}, "weight_map": weight_map}
        (self.path / INDEX_FILE).write_text(json.dumps(index, indent=2))
        return [self.path / name for name in names]
