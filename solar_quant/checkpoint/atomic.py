"""Whole-file writes: a file appears under its name complete, or not at all."""

from __future__ import annotations

import os
from pathlib import Path

from solar_quant.checkpoint.hooks import boundary
from solar_quant.errors import OutputError


def os_error(path: Path, e: OSError) -> OutputError:
    return OutputError(f"{path}: cannot write ({e.strerror}); free disk space or choose another output folder")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        boundary("atomic-write")
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise os_error(path, e) from None
    except BaseException:  # interrupted: leave no stray .tmp in a folder a resumed job will hash
        tmp.unlink(missing_ok=True)
        raise
