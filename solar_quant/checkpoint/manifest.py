"""manifest.json: the sha256 and size of every file in an output folder."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from solar_quant.checkpoint.atomic import atomic_write_bytes
from solar_quant.checkpoint.hooks import boundary

MANIFEST_NAME = "manifest.json"


def sha256_file(path: Path, chunk: int = 16 * 1024 * 1024) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def build_manifest(folder: Path, exclude: tuple[str, ...] = ()) -> dict:
    """`exclude`: top-level names (files or folders) left out."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST_NAME
                   and p.relative_to(folder).parts[0] not in exclude)
    listed = {}
    for p in files:
        listed[str(p.relative_to(folder))] = {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        boundary("manifest-hash")
    return {"files": listed}


def write_manifest(folder: Path, exclude: tuple[str, ...] = ()) -> dict:
    doc = build_manifest(folder, exclude)
    atomic_write_bytes(folder / MANIFEST_NAME, (json.dumps(doc, indent=2) + "\n").encode())
    return doc


def check_manifest(folder: Path) -> list[str]:
    """Findings (empty when every listed file exists with its recorded hash and no file is unlisted)."""
    path = folder / MANIFEST_NAME
    if not path.is_file():
        return [f"{path}: missing"]
    try:
        listed = json.loads(path.read_text())["files"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return [f"{path}: not a valid manifest"]
    actual = build_manifest(folder)["files"]
    findings = [f"{folder / n}: listed in manifest.json but missing" for n in listed if n not in actual]
    findings += [f"{folder / n}: not listed in manifest.json" for n in actual if n not in listed]
    findings += [f"{folder / n}: sha256 differs from manifest.json" for n in listed
                 if n in actual and actual[n]["sha256"] != listed[n].get("sha256")]
    return findings
