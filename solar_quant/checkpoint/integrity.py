"""The last check before a staged folder takes its final name: re-read what is on disk and
compare it with what was written, so a success exit never leaves a folder `verify` rejects.

Read back from disk (headers only, no tensor data): manifest.json parses and lists exactly
the files present, each with its size on disk; every `.safetensors` file's header is valid,
its tensors cover the data section exactly (what safetensors' loaders demand) and the file
ends where the header says; each shard a `ShardedWriter` wrote (registered here by
`expect_shard`) has exactly the header entries and metadata it wrote; the index's weight map
names each tensor in the shard that holds it. A concurrent writer, a full disk or a lying
filesystem shows up here as a finding, before the rename.
"""

from __future__ import annotations

import json
from pathlib import Path

from solar_quant.checkpoint.headers import read_header
from solar_quant.checkpoint.manifest import MANIFEST_NAME
from solar_quant.errors import CheckpointError

INDEX_NAME = "model.safetensors.index.json"

_expected: dict[str, dict[str, tuple[dict, dict]]] = {}  # staging folder -> {shard: (entries, metadata)}


def expect_shard(folder: Path, file: str, entries: dict[str, list], metadata: dict[str, str]) -> None:
    """Record what a writer put in `folder/file`: {name: [dtype, shape, begin, end]} and its metadata."""
    _expected.setdefault(str(Path(folder).resolve()), {})[file] = (dict(entries), dict(metadata))


def forget(folder: Path) -> None:
    _expected.pop(str(Path(folder).resolve()), None)


def staged_findings(folder: Path, exclude: tuple[str, ...] = ()) -> list[str]:
    """Problems with the staged `folder` (empty when it is a verified whole)."""
    folder = Path(folder)
    findings, listed = _manifest_findings(folder, exclude)
    headers: dict[str, dict] = {}
    for name in sorted(listed):
        if name.endswith(".safetensors") and (folder / name).is_file():
            entries, finding = _shard_entries(folder / name)
            if finding:
                findings.append(finding)
            else:
                headers[name] = entries
    findings += _expectation_findings(folder, headers)
    findings += _index_findings(folder, headers)
    return findings


def _manifest_findings(folder: Path, exclude: tuple[str, ...]) -> tuple[list[str], dict]:
    path = folder / MANIFEST_NAME
    try:
        listed = json.loads(path.read_text())["files"]
        if not isinstance(listed, dict):
            raise TypeError
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        return [f"{path}: missing or not a valid manifest"], {}
    present = {str(p.relative_to(folder)): p for p in folder.rglob("*")
               if p.is_file() and p.name != MANIFEST_NAME and p.relative_to(folder).parts[0] not in exclude}
    findings = [f"{folder / n}: listed in manifest.json but missing" for n in listed if n not in present]
    findings += [f"{folder / n}: present but not listed in manifest.json" for n in present if n not in listed]
    for n, p in present.items():
        recorded = listed[n].get("bytes") if isinstance(listed.get(n), dict) else None
        if n in listed and recorded != p.stat().st_size:
            findings.append(f"{p}: {p.stat().st_size} bytes on disk but manifest.json lists {recorded}")
    return findings, listed


def _shard_entries(path: Path) -> tuple[dict, str | None]:
    try:
        entries, metadata = read_header(str(path))
    except CheckpointError as e:
        return {}, str(e)
    with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
    data_bytes = path.stat().st_size - 8 - header_len
    end = 0
    for e in sorted(entries.values(), key=lambda e: (e.begin, e.end)):
        if e.begin != end:
            return {}, f"{path}: a gap before tensor {e.name!r} (bytes {end}..{e.begin} belong to no tensor); the shard is corrupt"
        end = e.end
    if end != data_bytes:
        return {}, f"{path}: its tensors cover {end} of {data_bytes} data bytes; the shard is corrupt"
    return {"entries": {n: [e.dtype, list(e.shape), e.begin, e.end] for n, e in entries.items()},
            "metadata": metadata}, None


def _expectation_findings(folder: Path, headers: dict[str, dict]) -> list[str]:
    expected = _expected.get(str(folder.resolve()), {})
    findings = [f"{folder / n}: a shard this run did not write" for n in sorted(headers)
                if expected and "/" not in n and n not in expected]
    for file, (entries, metadata) in expected.items():
        got = headers.get(file)
        if got is None:
            if not (folder / file).is_file():
                findings.append(f"{folder / file}: written but missing from the staged folder")
            continue
        if got["entries"] != entries:
            diff = sorted(set(got["entries"]) ^ set(entries)) or [n for n in entries if got["entries"].get(n) != entries[n]]
            findings.append(f"{folder / file}: its header differs from what was written (first: tensor {diff[0]!r})")
        elif got["metadata"] != metadata:
            findings.append(f"{folder / file}: its header metadata differs from what was written")
    return findings


def _index_findings(folder: Path, headers: dict[str, dict]) -> list[str]:
    path = folder / INDEX_NAME
    if not path.is_file():
        return []
    try:
        weight_map = json.loads(path.read_text())["weight_map"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        return [f"{path}: not a valid index"]
    holders = {n: file for file, h in headers.items() for n in h["entries"]}
    for name, file in weight_map.items():
        if holders.get(name) != file:
            return [f"{path}: maps {name!r} to {file}, which does not hold it"]
    missing = sorted(set(holders) - set(weight_map))
    return [f"{path}: does not list tensor {missing[0]!r}"] if missing else []
