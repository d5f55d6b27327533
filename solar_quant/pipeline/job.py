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

from solar_quant.checkpoint.writer import ShardedWriter, StagedFolder, atomic_write_bytes, write_single_tensor
from solar_quant.errors import Interrupted, OptionError, OutputError

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
    world_size: int = 1         # processes of a torchrun job: its sample shards and Hessian sums depend on it

    @property
    def dir(self) -> Path:
        return self.folder / JOB_DIR

    def save(self) -> None:
        doc = {"version": JOB_VERSION, **self.spec, "layers_done": self.layers_done,
               "writer": self.writer_state, "hidden": self.hidden_file, "records": self.records,
               "world_size": self.world_size}
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
                       doc["writer"], doc["hidden"], doc["records"], int(doc.get("world_size", 1)))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
            raise OutputError(f"{path}: damaged job file; start again without --resume") from None

    def check_world_size(self, world_size: int) -> None:
        """A job continues with the number of processes that started it: each rank's samples and
        the order the Hessians are summed in depend on it (docs/distributed.md)."""
        if self.world_size != world_size:
            def procs(n):
                return f"{n} process{'es' if n != 1 else ''}"

            raise OptionError(f"--resume: the interrupted job in {self.folder} was run by {procs(self.world_size)} and "
                              f"this run has {procs(world_size)}; resume it with {procs(self.world_size)} "
                              "(torchrun --nproc-per-node/--nnodes), or drop --resume to start over")

    def check_matches(self, spec: dict, absent_means: dict | None = None) -> None:
        """Raise OptionError listing every option or input that differs from the saved job.

        `absent_means`: options added after some jobs were saved, with the value that reproduces what
        such a job did; a job saved without one of them matches that value."""
        from solar_quant.checkpoint.identity import changes

        old_files, new_files = self.spec.get("inputs", {}).get("source_files"), spec.get("inputs", {}).get("source_files")
        diffs = changes(old_files, new_files or {}, "source") if old_files != new_files else []  # naming each file
        for section in ("options", "inputs"):
            old, new = self.spec.get(section, {}), spec.get(section, {})
            later = (absent_means or {}) if section == "options" else {}
            for key in sorted((set(old) | set(new)) - {"source_files"}):
                if old.get(key, later.get(key)) != new.get(key, later.get(key)):
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
        return ShardedWriter.resume(self.folder, max_shard_bytes, self.writer_state, metadata=metadata)


def _short(value) -> str:
    text = json.dumps(value, sort_keys=True) if not isinstance(value, str) else value
    return text if len(text) <= 80 else text[:77] + "..."


def job_spec(options: dict, source_sha256: str, calibration_sha256: str | None, files: dict | None = None) -> dict:
    """What a resumed job must match: the recorded options and the identities of its inputs
    (`files`: `source_files(reader)`, each source file's identity)."""
    inputs = {"source": source_sha256, "calibration": calibration_sha256}
    if files is not None:
        inputs["source_files"] = files
    return {"options": options, "inputs": inputs}


def source_files(reader) -> dict:
    """Identities of the source files a job reads or copies (`checkpoint.identity`)."""
    from solar_quant.checkpoint.identity import source_identity
    from solar_quant.variant import SIDE_FILES

    return source_identity(reader.path, reader.shards, SIDE_FILES)


def open_job(staged: StagedFolder, spec: dict, resume: bool, log, world_size: int = 1,
             absent_means: dict | None = None) -> Job:
    """The job to run in `staged`: a new one, or with `resume` the interrupted one (its spec and
    number of processes checked; `absent_means` as in `Job.check_matches`)."""
    job = Job.load(staged.staging) if resume else None
    if job is None:
        if resume:
            log(f"--resume: no interrupted job in {staged.staging}; starting from the first layer")
            staged.reset()  # whatever a job-less staging folder holds is not ours to continue from
        return Job(staged.staging, spec, world_size=world_size)
    job.check_world_size(world_size)
    job.check_matches(spec, absent_means)
    log(f"resuming: {job.layers_done} layers already done in {staged.staging}")
    return job


def save_progress(job: Job, writer: ShardedWriter, hidden, layers_done: int) -> None:
    """A resume point: the states entering layer `layers_done` (if any), then job.json, then
    the previous states removed."""
    # states kept on a GPU are saved in their compute dtype (fp16: half the bytes, the same values)
    name = job.save_hidden(layers_done, hidden.cpu()) if hidden is not None else None
    job.layers_done, job.writer_state, job.hidden_file = layers_done, writer.state(), name
    job.save()
    job.drop_hidden_except(name)


def has_saved_job(staged: StagedFolder) -> bool:
    return (staged.staging / JOB_DIR / JOB_FILE).is_file()


def interrupted(staged: StagedFolder, job: Job, layers: int) -> Interrupted:
    """The one line an interrupted run ends with; a staging folder without a saved job is removed."""
    if not staged.staging.exists() and staged.final.is_dir():  # the signal came as the commit finished
        return Interrupted(f"interrupted after {staged.final} was complete; it is kept (check it with "
                           f"`solar-quant verify {staged.final}`)")
    if not (job.dir / JOB_FILE).is_file():
        staged.abandon()
        return Interrupted(f"interrupted before the first layer was saved; nothing was left under {staged.final}; "
                           "rerun the same command to start again")
    return Interrupted(f"interrupted; {job.layers_done}/{layers} layers are saved and the job is kept in "
                       f"{staged.staging}: rerun the same command with --resume to continue")
