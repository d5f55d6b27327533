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
from dataclasses import dataclass, field
from pathlib import Path

import torch

from solar_quant.checkpoint.writer import ShardedWriter, atomic_write_bytes, write_single_tensor
from solar_quant.errors import OptionError, OutputError

JOB_DIR = ".job"
JOB_FILE = "job.json"
JOB_VERSION = 1


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
        diffs = []
        for section in ("options", "inputs"):
            old, new = self.spec.get(section, {}), spec.get(section, {})
            for key in sorted(set(old) | set(new)):
                if old.get(key) != new.get(key):
                    diffs.append(f"{key} {_short(old.get(key))} -> {_short(new.get(key))}")
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
        return ShardedWriter.resume(self.folder, max_shard_bytes, self.writer_state, metadata=metadata)


def _short(value) -> str:
    text = json.dumps(value, sort_keys=True) if not isinstance(value, str) else value
    return text if len(text) <= 80 else text[:77] + "..."
