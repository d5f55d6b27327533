"""Parse and validate a safetensors header without reading tensor data.

A header is 8 little-endian bytes of length N, then N bytes of JSON mapping tensor
names to {dtype, shape, data_offsets}. We check that every offset range lies inside the
file, matches dtype x shape, and that ranges do not overlap, so a lying header fails
here with the file named instead of deep inside a later read.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass

from solar_quant.errors import CheckpointError

DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
    "U8": 1, "U16": 2, "U32": 4, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}
MAX_HEADER_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class HeaderEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def read_header(path: str) -> tuple[dict[str, HeaderEntry], dict[str, str]]:
    """Return (entries by name, string metadata) of one .safetensors file."""
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file (no header); re-download or re-convert it")
            (n,) = struct.unpack("<Q", raw_len)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise CheckpointError(f"{path}: safetensors header length {n} exceeds the file ({size} bytes); the file is truncated or corrupt")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
    return parse_header(raw, size - 8 - n, path)


def parse_header(raw: bytes, data_bytes: int, path: str = "<header>") -> tuple[dict[str, HeaderEntry], dict[str, str]]:
    """Validate header JSON `raw` against a data section of `data_bytes` bytes."""
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: safetensors header is not valid JSON ({e}); the file is corrupt") from None
    except RecursionError:  # nesting deeper than the interpreter's stack: no real header looks like this
        raise CheckpointError(f"{path}: safetensors header nests too deeply to be a header; the file is corrupt") from None
    if not isinstance(doc, dict):
        raise CheckpointError(f"{path}: safetensors header is not a JSON object; the file is corrupt")
    metadata = doc.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: __metadata__ must map strings to strings")
    entries = {name: _entry(name, spec, path) for name, spec in doc.items()}
    _check_layout(entries, data_bytes, path)
    return entries, metadata


def _entry(name: str, spec: object, path: str) -> HeaderEntry:
    if not isinstance(spec, dict):
        raise CheckpointError(f"{path}: header entry {name!r} is not an object")
    dtype, shape, offsets = spec.get("dtype"), spec.get("shape"), spec.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPE_BYTES:
        raise CheckpointError(f"{path}: tensor {name!r} has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise CheckpointError(f"{path}: tensor {name!r} has an invalid shape {shape!r}")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)):
        raise CheckpointError(f"{path}: tensor {name!r} has invalid data_offsets {offsets!r}")
    entry = HeaderEntry(name, dtype, tuple(shape), offsets[0], offsets[1])
    if entry.end < entry.begin or entry.nbytes != entry.numel * DTYPE_BYTES[dtype]:
        raise CheckpointError(
            f"{path}: tensor {name!r} offsets {offsets} do not match {dtype} x {list(shape)}; the header lies, the file is corrupt")
    return entry


def _check_layout(entries: dict[str, HeaderEntry], data_bytes: int, path: str) -> None:
    last_end = 0
    for e in sorted(entries.values(), key=lambda e: (e.begin, e.end)):
        if e.begin < last_end:
            raise CheckpointError(f"{path}: tensor {e.name!r} overlaps the previous tensor; the header is corrupt")
        last_end = e.end
    if last_end > data_bytes:
        raise CheckpointError(
            f"{path}: header needs {last_end} data bytes but the file holds {data_bytes}; the file is truncated")
