"""Named points in a write (a lock taken, a shard renamed, the manifest written...), where tests
stop or kill the process to prove what an interruption there leaves behind.

`boundary(name)` does nothing unless one of these is set:
  SOLAR_QUANT_TEST_TRACE=FILE      append each point's name to FILE (to list a run's points)
  SOLAR_QUANT_TEST_KILL_AT=NAME:N  SIGKILL this process at the N-th time it reaches NAME
  SOLAR_QUANT_TEST_PAUSE=NAME:DIR  at NAME, create DIR/paused-PID and wait until DIR/go exists
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

TRACE_ENV = "SOLAR_QUANT_TEST_TRACE"
KILL_ENV = "SOLAR_QUANT_TEST_KILL_AT"
PAUSE_ENV = "SOLAR_QUANT_TEST_PAUSE"
PAUSE_LIMIT_S = 600.0

_seen: dict[str, int] = {}


def boundary(name: str) -> None:
    if not (os.environ.get(TRACE_ENV) or os.environ.get(KILL_ENV) or os.environ.get(PAUSE_ENV)):
        return
    _seen[name] = _seen.get(name, 0) + 1
    if trace := os.environ.get(TRACE_ENV):
        with open(trace, "a") as f:
            f.write(name + "\n")
    point, _, count = os.environ.get(KILL_ENV, "").rpartition(":")
    if point == name and count.isdigit() and int(count) == _seen[name]:
        os.kill(os.getpid(), signal.SIGKILL)
    point, _, folder = os.environ.get(PAUSE_ENV, "").partition(":")
    if point == name and folder:
        _pause(Path(folder))


def _pause(folder: Path) -> None:
    (folder / f"paused-{os.getpid()}").touch()
    deadline = time.monotonic() + PAUSE_LIMIT_S
    while not (folder / "go").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
