"""Checkpoint reader and writer: bit-exact round trips, header validation, atomic output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from solar_quant.checkpoint.headers import read_header
from solar_quant.checkpoint.manifest import check_manifest
from solar_quant.checkpoint.reader import CheckpointReader
from solar_quant.checkpoint.writer import ShardedWriter, StagedFolder
from solar_quant.errors import CheckpointError, OutputError
from solar_quant.models.synthetic import SOLAR_70B_CONFIG, llama_config, write_sparse_llama
from tests.conftest import tree_digest


def _tensors():
    g = torch.Generator().manual_seed(1)
    return {
        "a.f16": torch.randn(33, 17, generator=g).half(),
        "b.bf16": torch.randn(5, generator=g).bfloat16(),
        "c.f32": torch.randn(4, 4, 2, generator=g),
        "d.i32": torch.randint(-2**31, 2**31 - 1, (7, 3), generator=g, dtype=torch.int32),
        "e.u8": torch.randint(0, 255, (100,), generator=g, dtype=torch.uint8),
        "f.scalar": torch.tensor(0, dtype=torch.uint8),
        "g.i8": torch.randint(-128, 127, (9, 9), generator=g, dtype=torch.int8),
    }


def test_writer_round_trip_is_bit_exact_across_shards(tmp_path):
    tensors = _tensors()
    staged = StagedFolder(tmp_path / "out")
    writer = ShardedWriter(staged.staging, max_shard_bytes=1000)
    for name, t in tensors.items():
        writer.add(name, t)
    wmap = writer.close()
    (staged.staging / "config.json").write_text(json.dumps(llama_config()))
    out = staged.commit()
    assert len(set(wmap.values())) > 1
    reader = CheckpointReader(out)
    assert set(reader.tensors) == set(tensors)
    for name, t in tensors.items():
        got = reader.get(name)
        assert got.dtype == t.dtype and got.shape == t.shape
        assert torch.equal(got.view(-1).view(torch.uint8), t.reshape(-1).view(torch.uint8))
    assert check_manifest(out) == []


def test_writer_output_is_readable_by_safetensors_itself(tmp_path):
    from safetensors.torch import load_file

    writer = ShardedWriter(tmp_path, max_shard_bytes=10**9)
    for name, t in _tensors().items():
        writer.add(name, t)
    writer.close()
    loaded = load_file(tmp_path / "model.safetensors")
    assert all(torch.equal(loaded[n], t) for n, t in _tensors().items())


def test_resumed_writer_state_gives_identical_bytes(tmp_path):
    tensors = list(_tensors().items())
    a = ShardedWriter(tmp_path / "a", 1000) if (tmp_path / "a").mkdir() is None else None
    for n, t in tensors:
        a.add(n, t)
    a.close()
    (tmp_path / "b").mkdir()
    b = ShardedWriter(tmp_path / "b", 1000)
    for n, t in tensors[:4]:
        b.add(n, t)
    saved = json.loads(json.dumps(b.state()))
    b.add(*tensors[4])  # written after the snapshot, then "crash"
    b2 = ShardedWriter(tmp_path / "b", 1000, state=saved)
    for n, t in tensors[4:]:
        b2.add(n, t)
    b2.close()
    for f in sorted(p.name for p in (tmp_path / "a").iterdir()):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f


def test_staged_folder_is_invisible_until_commit_and_refuses_existing(tmp_path):
    staged = StagedFolder(tmp_path / "out")
    staged.write_text("x.txt", "hello")
    assert not (tmp_path / "out").exists()
    staged.commit()
    assert (tmp_path / "out" / "x.txt").read_text() == "hello"
    with pytest.raises(OutputError, match="--overwrite"):
        StagedFolder(tmp_path / "out")


def test_reader_matches_transformers_state_dict(tiny_llama):
    from transformers import AutoModelForCausalLM

    before = tree_digest(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float16)
    reader = CheckpointReader(tiny_llama)
    assert len(reader.shards) > 1
    sd = model.state_dict()
    for name, info in reader.tensors.items():
        assert tuple(sd[name].shape) == info.shape
        assert torch.equal(reader.get(name), sd[name])
    assert tree_digest(tiny_llama) == before


def _corrupt_copy(tiny_llama, tmp_path, mutate):
    import shutil

    dst = tmp_path / "bad"
    shutil.copytree(tiny_llama, dst)
    wmap = json.loads((dst / "model.safetensors.index.json").read_text())["weight_map"]
    shard = dst / max(sorted(set(wmap.values())), key=list(wmap.values()).count)  # the shard with most tensors
    mutate(shard)
    return dst, shard


@pytest.mark.parametrize("case", ["truncated", "header_lies", "garbage_header", "overlap"])
def test_corrupt_shards_are_named(tiny_llama, tmp_path, case):
    def mutate(shard):
        raw = shard.read_bytes()
        n = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8:8 + n])
        if case == "truncated":
            shard.write_bytes(raw[: len(raw) - 100])
            return
        if case == "garbage_header":
            shard.write_bytes(raw[:8] + b"{" * n + raw[8 + n:])
            return
        name = next(k for k in header if k != "__metadata__")
        if case == "header_lies":
            header[name]["shape"] = [header[name]["shape"][0] + 1] + header[name]["shape"][1:]
        else:
            other = [k for k in header if k not in ("__metadata__", name)]
            header[other[0]]["data_offsets"] = header[name]["data_offsets"]
        new = json.dumps(header).encode()
        new += b" " * (n - len(new)) if len(new) <= n else b""
        shard.write_bytes(len(new).to_bytes(8, "little") + new + raw[8 + n:])

    bad, shard = _corrupt_copy(tiny_llama, tmp_path, mutate)
    with pytest.raises(CheckpointError, match=shard.name):
        CheckpointReader(bad).tensors


def test_index_naming_missing_shard(tiny_llama, tmp_path):
    bad, shard = _corrupt_copy(tiny_llama, tmp_path, lambda s: s.unlink())
    with pytest.raises(CheckpointError, match=f"names shard '{shard.name}'"):
        CheckpointReader(bad).weight_map


def test_headers_of_a_140gb_checkpoint_are_read_without_its_data(tmp_path, monkeypatch):
    import mmap

    import safetensors

    from solar_quant.inspect import inspect_checkpoint

    path = write_sparse_llama(tmp_path / "solar70b", SOLAR_70B_CONFIG)

    def refuse(*_a, **_k):
        raise AssertionError("inspect mapped tensor data")

    monkeypatch.setattr(safetensors, "safe_open", refuse)
    monkeypatch.setattr(mmap, "mmap", refuse)
    before = _bytes_read()
    info = inspect_checkpoint(str(path))
    read = _bytes_read() - before
    assert info["parameters"] == 68_976_648_192
    assert info["file_bytes"] > 137e9 and len(info["shards"]) > 20
    # headers and config only: a few MB at most, where one tensor (the embedding) is 524 MB
    assert read < 32 * 2**20, read


def _bytes_read() -> int:
    """Bytes this process has read through read() calls so far (Linux /proc accounting; not a timing)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise AssertionError("/proc/self/io has no rchar line")


def test_header_parser_rejects_length_beyond_file(tmp_path):
    p = tmp_path / "x.safetensors"
    p.write_bytes((10**6).to_bytes(8, "little") + b"{}")
    with pytest.raises(CheckpointError, match="exceeds the file"):
        read_header(str(p))
