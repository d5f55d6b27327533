"""One writer per output: an exclusive OS lock on `.NAME.lock`, beside OUT and its staging folder.

The lock is `flock(2)` on an open file, so the kernel drops it when its process ends, by
SIGKILL too: a killed run never leaves a lock that blocks `--resume`. The holder writes its
pid, host, start time and command into the file, so a refused writer can name it. The file
is removed on release (a writer that opened it just before re-checks that it locked the
file still at the path); a killed holder's file stays and is reused. flock may not be
enforced between machines on network filesystems: see docs/reliability.md.

Within one process the lock is re-entrant (a run's nested steps may take it again).
"""

from __future__ import annotations

import atexit
import datetime
import errno
import fcntl
import json
import os
import socket
import sys
from pathlib import Path

from solar_quant.checkpoint.hooks import boundary
from solar_quant.errors import OutputError

_held: dict[str, list] = {}  # lock file -> [fd, holders in this process]


def lock_path(target: str | Path) -> Path:
    target = Path(target)
    return target.parent.resolve() / f".{target.name}.lock"


def describe_holder(info: dict | None) -> str:
    if not info or "pid" not in info:
        return "a process that has not recorded itself yet"
    return f"pid {info['pid']} on host {info.get('host', '?')}, started {info.get('started', '?')}"


class OutputLock:
    """`with OutputLock(out):` — or `acquire()` / `release()` — held while OUT is written."""

    def __init__(self, target: str | Path, shown: str | Path | None = None):
        """`shown`: the path a failure to create the lock file names (default: `target`)."""
        self.target = Path(target)
        self.shown = Path(shown or target)
        self.path = lock_path(self.target)
        self._mine = False

    def acquire(self) -> "OutputLock":
        if self._mine:
            return self
        key = str(self.path)
        if key in _held:
            _held[key][1] += 1
        else:
            if not _held:
                atexit.unregister(_release_all)
                atexit.register(_release_all)
            _held[key] = [self._lock_file(), 1]
            boundary("lock")
        self._mine = True
        return self

    def release(self) -> None:
        if not self._mine:
            return
        self._mine = False
        key = str(self.path)
        entry = _held.get(key)
        if entry is None:  # released at exit already
            return
        entry[1] -= 1
        if entry[1]:
            return
        del _held[key]
        try:  # unlinked while still locked: a writer that opened it meanwhile sees a stale file and retries
            self.path.unlink()
        except OSError:
            pass
        os.close(entry[0])

    def __del__(self) -> None:  # a writer dropped without commit or abandon (e.g. after an error)
        try:
            self.release()
        except Exception:  # noqa: BLE001 - interpreter shutdown: the OS drops the lock anyway
            pass

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def _lock_file(self) -> int:
        while True:
            try:
                if not self.path.parent.exists():  # (a file in its place fails at open, "Not a directory")
                    self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as e:
                raise OutputError(f"{self.shown}: cannot write ({e.strerror}); free disk space or choose another "
                                  "output folder") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = _read_holder(fd)
                os.close(fd)
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise OutputError(f"{self.target}: another solar-quant command is writing it ({describe_holder(holder)}); "
                                      "wait for it to finish or choose another output folder") from None
                raise OutputError(f"{self.target}: cannot lock {self.path.name} ({e.strerror}); this filesystem does not "
                                  "support file locks: write to a local disk") from None
            if _same_file(fd, self.path):
                break
            os.close(fd)  # its previous holder removed it between our open and our lock
        _write_holder(fd)
        return fd


def _release_all() -> None:
    """At exit, remove the lock files this process still holds (the OS would drop the locks anyway)."""
    for key, (fd, _) in list(_held.items()):
        del _held[key]
        try:
            os.unlink(key)
        except OSError:
            pass
        os.close(fd)


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


def _read_holder(fd: int) -> dict | None:
    try:
        raw = os.pread(fd, 4096, 0)
        info = json.loads(raw.decode())
        return info if isinstance(info, dict) else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def _write_holder(fd: int) -> None:
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    info = {"pid": os.getpid(), "host": socket.gethostname(), "started": started,
            "command": " ".join(["solar-quant", *sys.argv[1:]])[:500]}
    data = (json.dumps(info) + "\n").encode()
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
    except OSError:
        pass  # the lock holds without the note; a refused writer then says the holder is unrecorded
