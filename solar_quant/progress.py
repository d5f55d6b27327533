"""Progress lines on stderr with elapsed time and ETA; quiet when SOLAR_QUANT_QUIET=1."""

from __future__ import annotations

import os
import sys
import time


def log(message: str) -> None:
    if os.environ.get("SOLAR_QUANT_QUIET") != "1":
        print(message, file=sys.stderr, flush=True)


def _fmt(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """`step()` after each unit of work; prints `label i/total detail (elapsed, ETA)`."""

    def __init__(self, total: int, label: str, done: int = 0, min_interval: float = 0.0):
        self.total, self.label, self.done = total, label, done
        self.start_done = done
        self.start = time.monotonic()
        self.min_interval = min_interval
        self._last = 0.0

    def step(self, detail: str = "", n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if now - self._last < self.min_interval and self.done < self.total:
            return
        self._last = now
        elapsed = now - self.start
        rate = (self.done - self.start_done) / elapsed if elapsed > 0 else 0
        eta = (self.total - self.done) / rate if rate > 0 else 0
        log(f"{self.label} {self.done}/{self.total} {detail} (elapsed {_fmt(elapsed)}, ETA {_fmt(eta)})".replace("  ", " "))
