"""Write a checkpoint folder that appears under its final name only when complete.

`StagedFolder` builds the output in a hidden sibling folder (`.NAME.partial`) and renames
it into place after writing `manifest.json` and re-reading what was staged
(`checkpoint.integrity`). It holds OUT's lock (`checkpoint.lock`) from the start until it
is committed or abandoned, so one writer at a time stages OUT. `ShardedWriter` streams tensors into
safetensors shards: each tensor's bytes go straight to a data file on disk, so memory
holds one tensor at a time; when a shard fills, its header and data are joined under a
temporary name and renamed. Its state is a plain dict, so a resumable job can save it
and continue after a crash.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from solar_quant.checkpoint import integrity
from solar_quant.checkpoint.atomic import atomic_write_bytes
from solar_quant.checkpoint.atomic import os_error as _os_error
from solar_quant.checkpoint.hooks import boundary
from solar_quant.checkpoint.lock import OutputLock
from solar_quant.checkpoint.manifest import write_manifest
from solar_quant.errors import IntegrityError, OutputError

DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

__all__ = ["StagedFolder", "ShardedWriter", "atomic_write_bytes", "tensor_bytes", "encode_header",
           "write_single_tensor", "DTYPE_NAMES", "INDEX_NAME"]


def working_name(number: int) -> str:
    """A finished shard before `close()` gives it its final name."""
    return f"shard-{number:05d}.safetensors"


def data_name(number: int) -> str:
    """The open shard's data file (tensor bytes only; the header is joined on flush)."""
    return f".shard-{number:05d}.data"


def final_name(number: int, total: int) -> str:
    return SINGLE_NAME if total == 1 else f"model-{number:05d}-of-{total:05d}.safetensors"


def encode_header(metadata: dict, entries: dict[str, list]) -> bytes:
    """The safetensors header of `entries` ({name: [dtype, shape, begin, end]}): its 8-byte
    length, then the JSON padded with spaces to a multiple of 8."""
    header = {"__metadata__": metadata}
    header.update({n: {"dtype": d, "shape": s, "data_offsets": [b, e]} for n, (d, s, b, e) in entries.items()})
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


class StagedFolder:
    """An output folder staged beside its final name and moved into place when complete."""

    def __init__(self, final: str | Path, overwrite: bool = False, resume: bool = False):
        self.final = Path(final)
        self.staging = self.final.parent / f".{self.final.name}.partial"
        self.lock = OutputLock(self.final, shown=self.staging).acquire()  # a second writer is refused here
        try:
            self._recover_swap()
            if self.final.exists() and not overwrite:
                raise OutputError(f"{self.final}: already exists; pass --overwrite to replace it or choose another output path")
            if self.staging.exists() and not resume:
                shutil.rmtree(self.staging)
            self.staging.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            self.lock.release()
            raise _os_error(self.staging, e) from None
        except BaseException:
            self.lock.release()
            raise

    def _recover_swap(self) -> None:
        """A commit over an older OUT killed between its two renames left OUT at `.NAME.old`: put it back."""
        old = self.final.parent / f".{self.final.name}.old"
        if old.is_dir() and not self.final.exists():
            old.rename(self.final)
        elif old.is_dir():
            shutil.rmtree(old)

    def path(self, name: str) -> Path:
        return self.staging / name

    def write_text(self, name: str, text: str) -> None:
        atomic_write_bytes(self.staging / name, text.encode())

    def write_json(self, name: str, doc: object) -> None:
        self.write_text(name, json.dumps(doc, indent=2, sort_keys=False) + "\n")

    def commit(self, exclude: tuple[str, ...] = ()) -> Path:
        """Write manifest.json, then move the staged folder to its final name.

        `exclude` (e.g. a resumable job's files) is left out of the manifest and removed only
        after hashing, so an interruption while a large folder is hashed keeps the job; the
        removal and the renames run with SIGINT/SIGTERM held, so they are never split."""
        from solar_quant.signals import deferred

        boundary("commit")
        try:
            write_manifest(self.staging, exclude=exclude)
            self._check(exclude)
            with deferred():
                for name in exclude:
                    p = self.staging / name
                    if p.is_dir():
                        shutil.rmtree(p)
                    elif p.exists():
                        p.unlink()
                boundary("commit-excluded")
                old = None
                if self.final.exists():
                    old = self.final.parent / f".{self.final.name}.old"
                    if old.exists():
                        shutil.rmtree(old)
                    self.final.rename(old)
                    boundary("commit-old-moved")
                self.staging.rename(self.final)
                boundary("commit-renamed")
                if old is not None:
                    shutil.rmtree(old)
        except OSError as e:
            raise _os_error(self.final, e) from None
        integrity.forget(self.staging)
        self.lock.release()
        return self.final

    def _check(self, exclude: tuple[str, ...]) -> None:
        """Re-read the staged folder against what was written; a finding abandons it, OUT untouched."""
        findings = integrity.staged_findings(self.staging, exclude)
        if findings:
            self.abandon()
            more = f" (and {len(findings) - 1} more)" if len(findings) > 1 else ""
            raise IntegrityError(f"{self.final}: the staged output failed its final check: {findings[0]}{more}; "
                                 f"nothing was moved under {self.final}; rerun the command")
        boundary("commit-checked")

    def reset(self) -> None:
        """Empty the staging folder and keep writing (and holding the lock)."""
        shutil.rmtree(self.staging, ignore_errors=True)
        integrity.forget(self.staging)
        try:
            self.staging.mkdir(parents=True)
        except OSError as e:
            raise _os_error(self.staging, e) from None

    def abandon(self) -> None:
        """Remove the staging folder and release OUT's lock: this writer is done."""
        shutil.rmtree(self.staging, ignore_errors=True)
        integrity.forget(self.staging)
        self.lock.release()


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a tensor, as safetensors stores them."""
    flat = t.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


class ShardedWriter:
    """Stream tensors into `model-XXXXX-of-YYYYY.safetensors` shards of at most `max_shard_bytes`."""

    def __init__(self, folder: str | Path, max_shard_bytes: int = 2 * 1024**3, metadata: dict[str, str] | None = None,
                 state: dict | None = None):
        self.folder = Path(folder)
        self.max_shard_bytes = max_shard_bytes
        self.metadata = dict(metadata or {"format": "pt"})
        state = state or {"done": [], "open": {}, "open_bytes": 0}
        self.done: list[dict] = state["done"]           # [{"file": ..., "entries": {name: [dtype, shape, begin, end]}}]
        self.open_entries: dict[str, list] = dict(state["open"])
        self.open_bytes: int = state["open_bytes"]
        data = self._data_path()
        if data.exists():
            os.truncate(data, self.open_bytes)  # drop anything written after the saved state
        elif self.open_bytes:
            raise OutputError(f"{data}: missing; the resumable job is damaged, start again without --resume")

    def _data_path(self) -> Path:
        return self.folder / data_name(len(self.done) + 1)

    @classmethod
    def resume(cls, folder: str | Path, max_shard_bytes: int, state: dict | None,
               metadata: dict[str, str] | None = None) -> "ShardedWriter":
        """A writer continuing from a saved `state()` in `folder`, after a process was killed
        at any point since: shards renamed by `close()` get their working names back, an open
        shard flushed after the save gets its data file back, and files written later are removed."""
        state = state or {"done": [], "open": {}, "open_bytes": 0}
        folder = Path(folder)
        n_done = len(state["done"])
        _unname_closed_shards(folder, n_done)  # killed while the writer was closing
        open_shard, open_data = folder / working_name(n_done + 1), folder / data_name(n_done + 1)
        if state["open_bytes"] and not open_data.exists() and open_shard.exists():
            _shard_data_back(open_shard, open_data, state["open_bytes"])  # killed just after a flush
        for p in list(folder.glob("shard-*.safetensors*")) + list(folder.glob(".shard-*.data")):
            number = int(p.name.split("-")[1].split(".")[0])
            if p.name.endswith(".tmp") or number > n_done + (1 if p.name.startswith(".") else 0):
                p.unlink()
        return cls(folder, max_shard_bytes, metadata=metadata, state=state)

    def state(self) -> dict:
        """A JSON-able snapshot; pass it back as `state=` to continue after a crash."""
        return {"done": self.done, "open": dict(self.open_entries), "open_bytes": self.open_bytes}

    def names(self) -> set[str]:
        return set(self.open_entries) | {n for s in self.done for n in s["entries"]}

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if name in self.names():
            raise ValueError(f"tensor {name} written twice")
        if tensor.dtype not in DTYPE_NAMES:
            raise ValueError(f"tensor {name}: unsupported dtype {tensor.dtype}")
        data = tensor_bytes(tensor)
        if self.open_entries and self.open_bytes + data.nbytes > self.max_shard_bytes:
            self.flush()
        path = self._data_path()
        try:
            with open(path, "ab") as f:
                f.write(data)
        except OSError as e:
            raise _os_error(path, e) from None
        begin = self.open_bytes
        self.open_bytes += data.nbytes
        self.open_entries[name] = [DTYPE_NAMES[tensor.dtype], list(tensor.shape), begin, self.open_bytes]
        boundary("tensor")

    def flush(self) -> None:
        """Finish the open shard: header + data under a temporary name, then rename."""
        if not self.open_entries:
            return
        number = len(self.done) + 1
        final = self.folder / working_name(number)
        data_path = self._data_path()
        header = encode_header(self.metadata, self.open_entries)
        tmp = final.with_name(final.name + ".tmp")
        try:
            with open(tmp, "wb") as out, open(data_path, "rb") as src:
                out.write(header)
                shutil.copyfileobj(src, out, 16 * 1024 * 1024)
                out.flush()
                os.fsync(out.fileno())
            boundary("shard-tmp")
            os.replace(tmp, final)
            data_path.unlink()
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise _os_error(final, e) from None
        self.done.append({"file": final.name, "entries": self.open_entries})
        self.open_entries, self.open_bytes = {}, 0

    def close(self) -> dict[str, str]:
        """Flush, give shards their final `-of-N` names, write the index; return the weight map."""
        self.flush()
        total = len(self.done)
        weight_map: dict[str, str] = {}
        total_size = 0
        for i, shard in enumerate(self.done, 1):
            name = final_name(i, total)
            src = self.folder / shard["file"]
            if src.exists():
                src.rename(self.folder / name)
                boundary("shard-named")
            shard["file"] = name
            integrity.expect_shard(self.folder, name, shard["entries"], self.metadata)
            for n, (_, _, b, e) in shard["entries"].items():
                weight_map[n] = name
                total_size += e - b
        if total > 1:
            index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
            atomic_write_bytes(self.folder / INDEX_NAME, (json.dumps(index, indent=2) + "\n").encode())
        return weight_map


def _unname_closed_shards(folder: Path, n_done: int) -> None:
    """Give shards renamed by `ShardedWriter.close()` their working names back: the saved state's
    done shards and the one open then (flushed by the close), so it is recovered like any flushed
    shard; the shards after it are removed by the caller."""
    finals = {int(p.name.split("-")[1]): p for p in folder.glob("model-*-of-*.safetensors")}
    if (folder / SINGLE_NAME).exists():
        finals.setdefault(1, folder / SINGLE_NAME)
    for i, final in sorted(finals.items()):
        working = folder / working_name(i)
        if i <= n_done + 1 and not working.exists():
            final.rename(working)
        else:
            final.unlink()
    (folder / INDEX_NAME).unlink(missing_ok=True)


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
    header = encode_header({"format": "pt"}, {name: [DTYPE_NAMES[tensor.dtype], list(tensor.shape), 0, data.nbytes]})
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(header)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise _os_error(path, e) from None
