"""A resumable layer-by-layer job: `job.json` and the hidden states entering the next layer,
kept in the output's staging folder under `.job/`.

After each layer the pipeline writes the layer's tensors, saves the hidden states entering
the next layer, then saves `job.json` (options, input identities, layers done, writer
state) atomically, then deletes the previous hidden states. A process killed at any point
resumes from the last saved `job.json`: the writer drops bytes written after its saved
state, so the output is byte-identical to an uninterrupted run.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from solar_quant.checkpoint.writer import DTYPE_NAMES, ShardedWriter, atomic_write_bytes, tensor_bytes
from solar_quant.errors import OptionError, OutputError

JOB_DIR = ".job"
JOB_FILE = "job.json"
JOB_VERSION = 1
INPUT_NAMES = {"source": "source checkpoint identity", "calibration": "calibration token ids sha256"}


@dataclass
class Job:
    """What a run needs to continue: `spec` must match on resume; the rest is progress."""

    folder: Path                # the staging folder
    spec: dict                  # {"options": {...}, "inputs": {...}}
    layers_done: int = 0
    writer_state: dict | None = None
    hidden_file: str | None = None   # relative to folder/.job
    records: list = field(default_factory=list)  # per-layer quantization records

    @property
    def dir(self) -> Path:
        return self.folder / JOB_DIR

    def save(self) -> None:
        doc = {"version": JOB_VERSION, **self.spec, "layers_done": self.layers_done,
               "writer": self.writer_state, "hidden": self.hidden_file, "records": self.records}
        self.dir.mkdir(exist_ok=True)
        atomic_write_bytes(self.dir / JOB_FILE, (json.dumps(doc, indent=1) + "\n").encode())

    @classmethod
    def load(cls, folder: Path) -> "Job | None":
        path = folder / JOB_DIR / JOB_FILE
        if not path.is_file():
            return None
        try:
            doc = json.loads(path.read_text())
            return cls(folder, {"options": doc["options"], "inputs": doc["inputs"]}, doc["layers_done"],
                       doc["writer"], doc["hidden"], doc["records"])
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
            raise OutputError(f"{path}: damaged job file; start again without --resume") from None

    def check_matches(self, spec: dict) -> None:
        """Raise OptionError listing every option or input that differs from the saved job."""
        from solar_quant.checkpoint.identity import changes

        old_files, new_files = self.spec.get("inputs", {}).get("source_files"), spec.get("inputs", {}).get("source_files")
        diffs = changes(old_files, new_files or {}, "source") if old_files != new_files else []  # naming each file
        for section in ("options", "inputs"):
            old, new = self.spec.get(section, {}), spec.get(section, {})
            for key in sorted((set(old) | set(new)) - {"source_files"}):
                if old.get(key) != new.get(key):
                    diffs.append(f"{INPUT_NAMES.get(key, key)} {_short(old.get(key))} -> {_short(new.get(key))}")
        if diffs:
            raise OptionError(f"--resume: the interrupted job in {self.folder} was started with different "
                              f"options or inputs ({'; '.join(diffs)}); rerun with the job's options, or drop --resume to start over")

    # -- hidden states ------------------------------------------------------------------
    def save_hidden(self, layer: int, hidden: torch.Tensor) -> str:
        """Write the states entering `layer` to .job/hidden-LLLLL.safetensors (temp name, then rename)."""
        self.dir.mkdir(exist_ok=True)
        name = f"hidden-{layer:05d}.safetensors"
        write_single_tensor(self.dir / name, "hidden", hidden)
        return name

    def load_hidden(self) -> torch.Tensor:
        from safetensors import safe_open

        path = self.dir / (self.hidden_file or "")
        if not self.hidden_file or not path.is_file():
            raise OutputError(f"{path}: hidden states of the interrupted job are missing; start again without --resume")
        with safe_open(str(path), framework="pt") as f:
            return f.get_tensor("hidden").clone()

    def drop_hidden_except(self, keep: str | None) -> None:
        for p in self.dir.glob("hidden-*.safetensors*"):
            if p.name != keep:
                p.unlink()

    # -- writer -------------------------------------------------------------------------
    def restore_writer(self, max_shard_bytes: int, metadata: dict | None = None) -> ShardedWriter:
        """A ShardedWriter continuing from the saved state, after removing shards written later."""
        state = self.writer_state or {"done": [], "open": {}, "open_bytes": 0}
        n_done = len(state["done"])
        _unname_closed_shards(self.folder, n_done)  # killed while the writer was closing
        open_shard = self.folder / f"shard-{n_done + 1:05d}.safetensors"
        open_data = self.folder / f".shard-{n_done + 1:05d}.data"
        if state["open_bytes"] and not open_data.exists() and open_shard.exists():
            _shard_data_back(open_shard, open_data, state["open_bytes"])  # killed just after a flush
        for p in list(self.folder.glob("shard-*.safetensors*")) + list(self.folder.glob(".shard-*.data")):
            number = int(p.name.split("-")[1].split(".")[0])
            if p.name.endswith(".tmp") or number > n_done + (1 if p.name.startswith(".") else 0):
                p.unlink()
        return ShardedWriter(self.folder, max_shard_bytes, metadata=metadata, state=state)


def _short(value) -> str:
    text = json.dumps(value, sort_keys=True) if not isinstance(value, str) else value
    return text if len(text) <= 80 else text[:77] + "..."


def _unname_closed_shards(folder: Path, n_done: int) -> None:
    """Give shards renamed by `ShardedWriter.close()` their working names back: the saved state's
    done shards and the one open then (flushed by the close), so it is recovered like any flushed
    shard; the shards after it are removed by the caller."""
    finals = {int(p.name.split("-")[1]): p for p in folder.glob("model-*-of-*.safetensors")}
    if (folder / "model.safetensors").exists():
        finals.setdefault(1, folder / "model.safetensors")
    for i, final in sorted(finals.items()):
        working = folder / f"shard-{i:05d}.safetensors"
        if i <= n_done + 1 and not working.exists():
            final.rename(working)
        else:
            final.unlink()
    (folder / "model.safetensors.index.json").unlink(missing_ok=True)


def _shard_data_back(shard: Path, data: Path, nbytes: int) -> None:
    """Recreate a flushed shard's open data file from the shard (its data section's first bytes)."""
    with open(shard, "rb") as src, open(data, "wb") as dst:
        header_len = int.from_bytes(src.read(8), "little")
        src.seek(8 + header_len)
        dst.write(src.read(nbytes))
    shard.unlink()


def write_single_tensor(path: Path, name: str, tensor: torch.Tensor) -> None:
    """A safetensors file holding one tensor, written without an in-memory copy of its bytes."""
    data = tensor_bytes(tensor)
    header = {"__metadata__": {"format": "pt"},
              name: {"dtype": DTYPE_NAMES[tensor.dtype], "shape": list(tensor.shape), "data_offsets": [0, data.nbytes]}}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(len(raw).to_bytes(8, "little"))
            f.write(raw)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"{path}: cannot write ({e.strerror}); free disk space or choose another output folder") from None
