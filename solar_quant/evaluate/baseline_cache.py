"""On-disk cache of the baseline's per-token results, so several variants reuse one baseline pass.

Each scoring section (the short-context windows, or one long context) is one safetensors
file named by the sha256 of everything that determines it: the baseline's identity, the
token stream, the windows, k, dtype, device type and rope settings. The passkey results are
a small JSON file keyed the same way. Files are written under a temporary name and renamed.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

CACHE_FORMAT = 1


def cache_key(doc: dict) -> str:
    return hashlib.sha256(json.dumps({"format": CACHE_FORMAT, **doc}, sort_keys=True).encode()).hexdigest()


class BaselineCache:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def _path(self, kind: str, key: str, ext: str) -> Path:
        return self.root / f"{kind}-{key[:20]}.{ext}"

    def load_tensors(self, kind: str, key: str) -> dict[str, torch.Tensor] | None:
        from safetensors import safe_open
        from safetensors.torch import load_file

        path = self._path(kind, key, "safetensors")
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt") as f:
                if (f.metadata() or {}).get("key") != key:
                    return None
            return load_file(str(path))
        except Exception:  # a damaged cache entry is recomputed, never trusted
            return None

    def save_tensors(self, kind: str, key: str, tensors: dict[str, torch.Tensor], protocol: dict) -> Path:
        from safetensors.torch import save_file

        path = self._path(kind, key, "safetensors")
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        save_file(tensors, str(tmp), metadata={"key": key, "protocol": json.dumps(protocol, sort_keys=True)})
        os.replace(tmp, path)
        return path

    def load_json(self, kind: str, key: str) -> dict | None:
        path = self._path(kind, key, "json")
        try:
            doc = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            return None
        return doc.get("value") if doc.get("key") == key else None

    def save_json(self, kind: str, key: str, value) -> Path:
        path = self._path(kind, key, "json")
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps({"key": key, "value": value}, indent=1))
        os.replace(tmp, path)
        return path
