"""The evaluation text: the bundled held-out text, a local file, or a locally cached dataset."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from solar_quant.errors import DependencyError, InputError


@dataclass(frozen=True)
class EvalText:
    source: str  # file path or hf:NAME:CONFIG:SPLIT
    text: str
    sha256: str
    bundled: bool = False

    @property
    def label(self) -> str:
        """How reports name the text: no local path (the sha256 beside it identifies the bytes)."""
        if self.bundled:
            return f"bundled:{Path(self.source).name}"
        return self.source if self.source.startswith("hf:") else Path(self.source).name


def _bundled() -> Path:
    try:
        from solar_quant.calibration.bundled import default_eval_text
    except ImportError:
        raise InputError("no --text given and this install has no bundled held-out text; pass --text FILE") from None
    return Path(default_eval_text())


def _from_dataset(spec: str) -> str:
    """hf:NAME[:CONFIG[:SPLIT]] from the local datasets cache (never downloads)."""
    parts = spec[3:].split(":")
    name, config, split = parts[0], (parts[1] if len(parts) > 1 and parts[1] else None), (parts[2] if len(parts) > 2 else "test")
    try:
        import datasets
    except ImportError:
        raise DependencyError(f"--text {spec}: reading a dataset needs the `datasets` package; pip install datasets, "
                              "or pass --text FILE") from None
    try:
        ds = datasets.load_dataset(name, config, split=split, download_mode="reuse_cache_if_exists")
    except Exception as e:  # datasets raises many types for a missing local copy
        raise InputError(f"--text {spec}: cannot load it from the local cache ({str(e).splitlines()[0]})") from None
    column = "text" if "text" in ds.column_names else ds.column_names[0]
    return "\n\n".join(str(t) for t in ds[column])


def read_text(spec: str | None) -> EvalText:
    if spec is not None and spec.startswith("hf:"):
        text = _from_dataset(spec)
        source = spec
    else:
        path = _bundled() if spec is None else Path(spec)
        if not path.is_file():
            raise InputError(f"--text {path}: no such file; pass a UTF-8 text file")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise InputError(f"--text {path}: not UTF-8 text") from None
        source = str(path.resolve())
    if not text.strip():
        raise InputError(f"--text {source}: the text is empty")
    return EvalText(source, text, hashlib.sha256(text.encode()).hexdigest(), bundled=spec is None)
