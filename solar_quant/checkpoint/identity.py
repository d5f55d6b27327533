"""File identities a resumable job records, so `--resume` refuses a source that changed since.

A 70B source is ~140 GB: hashing it whole on every resume would cost minutes of disk reads.
What each file gets instead:
  - its size;
  - a `.safetensors` shard: the sha256 of its header (every tensor's name, dtype, shape and
    offsets) and the sha256 of SAMPLES blocks of SAMPLE_BYTES at fixed offsets spread evenly
    through its data section (1 MiB read per shard, whatever its size);
  - any file of at most FULL_HASH_BYTES (config.json, tokenizer files, a small shard): the
    sha256 of all of it.
This catches another checkpoint, another revision, a re-conversion, a truncation or a
replaced shard; it can miss an edit in place of a few bytes that no sample covers in a
large shard (docs/reliability.md). The calibration set is identified by the sha256 of its
token ids (they are small), the options by their values.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

SAMPLES = 16
SAMPLE_BYTES = 64 * 1024
FULL_HASH_BYTES = 64 * 1024 * 1024


def file_identity(path: Path, samples: int = SAMPLES, sample_bytes: int = SAMPLE_BYTES,
                  full_hash_bytes: int = FULL_HASH_BYTES) -> dict:
    size = path.stat().st_size
    with open(path, "rb") as f:
        if size <= full_hash_bytes:
            return {"bytes": size, "sha256": hashlib.file_digest(f, "sha256").hexdigest()}
        out = {"bytes": size}
        start = 0
        if path.suffix == ".safetensors":
            n = int.from_bytes(f.read(8), "little")
            out["header_sha256"] = hashlib.sha256(f.read(n)).hexdigest()
            start = 8 + n
        h = hashlib.sha256()
        span = max(0, size - start - sample_bytes)
        for i in range(samples):
            f.seek(start + span * i // max(1, samples - 1))
            h.update(f.read(sample_bytes))
        out["sampled_sha256"] = h.hexdigest()
        out["samples"] = [samples, sample_bytes]
        return out


def source_identity(folder: Path, shards: list[str], side_files: tuple[str, ...] = ()) -> dict[str, dict]:
    """{file name: identity} for config.json, the shards and whichever `side_files` exist."""
    names = ["config.json", *shards, *(n for n in side_files if (folder / n).is_file())]
    return {name: file_identity(folder / name) for name in dict.fromkeys(names)}


def changes(old: dict | None, new: dict, what: str) -> list[str]:
    """One phrase per file that differs between two `source_identity` results (`what`: 'source')."""
    if not isinstance(old, dict):
        return [f"{what} file identities were not recorded by the job (an older version made it)"]
    out = []
    for name in sorted(set(old) | set(new)):
        a, b = old.get(name), new.get(name)
        if a == b:
            continue
        if a is None:
            out.append(f"{what} file {name} appeared")
        elif b is None:
            out.append(f"{what} file {name} is gone")
        elif a.get("bytes") != b.get("bytes"):
            out.append(f"{what} file {name} changed size ({a.get('bytes')} -> {b.get('bytes')} bytes)")
        elif a.get("header_sha256") != b.get("header_sha256"):
            out.append(f"{what} file {name} has another safetensors header")
        else:
            out.append(f"{what} file {name} changed content")
    return out
