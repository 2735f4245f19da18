"""fxdecomp.large.shards: safetensors shards written tensor by tensor, read back by safetensors itself."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from fxdecomp.errors import InvalidInputError
from fxdecomp.large import ShardWriter
from fxdecomp.large.shards import INDEX_FILE, SINGLE_FILE


def _tensors() -> dict[str, torch.Tensor]:
    """Every width of element, odd sizes (so a naive layout would misalign the wider dtypes), a scalar and an empty one."""
    g = torch.Generator().manual_seed(0)
    return {
        "a.bf16": torch.randn(3, 5, generator=g).to(torch.bfloat16),
        "b.u8": torch.randint(0, 255, (7,), generator=g).to(torch.uint8),
        "c.f32": torch.randn(4, 3, generator=g),
        "d.bool": torch.rand(5, generator=g) > 0.5,
        "e.i64": torch.randint(-9, 9, (3,), generator=g),
        "f.f64": torch.randn(2, 2, generator=g, dtype=torch.float64),
        "g.f16": torch.randn(3, generator=g).half(),
        "h.scalar": torch.tensor(2.5),
        "i.empty": torch.zeros(0, 4),
        "j.view": torch.arange(20.0).reshape(4, 5)[:, 1],  # a non-contiguous view: its own values are written
    }


def test_a_single_file_reads_back_exactly_with_aligned_offsets(tmp_path):
    tensors = _tensors()
    writer = ShardWriter(tmp_path, metadata={"note": "x"})
    for name, tensor in tensors.items():
        writer.add(name, tensor)
    assert writer.close() == [tmp_path / SINGLE_FILE]
    loaded = load_file(tmp_path / SINGLE_FILE)
    assert loaded.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name
    with safe_open(tmp_path / SINGLE_FILE, framework="pt") as handle:
        assert handle.metadata() == {"format": "pt", "note": "x"}
    raw = (tmp_path / SINGLE_FILE).read_bytes()
    length = int.from_bytes(raw[:8], "little")
    assert length % 8 == 0
    header = json.loads(raw[8 : 8 + length])
    for name, tensor in tensors.items():
        start, end = header[name]["data_offsets"]
        assert start % tensor.element_size() == 0 and end - start == tensor.numel() * tensor.element_size(), name


def test_shards_are_bounded_and_indexed(tmp_path):
    tensors = {f"layer.{i}.weight": torch.full((64,), float(i)) for i in range(10)}  # 256 bytes each
    writer = ShardWriter(tmp_path, max_shard_bytes=600)
    for name, tensor in tensors.items():
        writer.add(name, tensor)
    paths = writer.close()
    assert len(paths) == 5 and not list(tmp_path.glob("*.part")) and not list(tmp_path.glob("*.tmp"))
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    assert index["metadata"]["total_size"] == 10 * 256
    for name, tensor in tensors.items():
        assert torch.equal(load_file(tmp_path / index["weight_map"][name])[name], tensor)
    assert all(len(load_file(p)) == 2 for p in paths)


def test_a_tensor_is_on_disk_when_add_returns(tmp_path):
    writer = ShardWriter(tmp_path, max_shard_bytes=1 << 30)
    writer.add("t", torch.randn(1000))
    writer.add("u", torch.randn(10).to(torch.bfloat16))
    parts = {p.name: p.stat().st_size for p in tmp_path.glob("*.part")}
    assert parts == {"shard-00000.F32.part": 4000, "shard-00000.BF16.part": 20}  # nothing of a shard waits in memory
    writer.close()
    assert not list(tmp_path.glob("*.part"))


def test_abort_leaves_nothing_behind(tmp_path):
    writer = ShardWriter(tmp_path, max_shard_bytes=100)
    for i in range(3):
        writer.add(f"t{i}", torch.randn(20))  # 80 bytes: a finished shard each
    writer.abort()
    assert list(tmp_path.iterdir()) == []


def test_bad_tensors_are_named(tmp_path):
    writer = ShardWriter(tmp_path)
    writer.add("t", torch.ones(2))
    with pytest.raises(InvalidInputError, match="t was already written"):
        writer.add("t", torch.ones(2))
    with pytest.raises(InvalidInputError, match="complex64"):
        writer.add("c", torch.ones(2, dtype=torch.complex64))
    with pytest.raises(InvalidInputError, match="strings to strings"):
        ShardWriter(tmp_path / "m", metadata={"layers": 3})


def test_a_refused_tensor_when_a_shard_is_full_leaves_no_empty_shard(tmp_path):
    writer = ShardWriter(tmp_path, max_shard_bytes=10)
    writer.add("a", torch.ones(2))
    with pytest.raises(InvalidInputError):
        writer.add("c", torch.ones(4, dtype=torch.complex64))
    writer.add("b", torch.ones(2))
    assert len(writer.close()) == 2  # a and b, no empty shard between them
