"""Progress on stderr: a live bar with ETA on a terminal (tqdm), sparse plain lines otherwise.

`--quiet` (or SOLAR_QUANT_QUIET=1) silences both the bars and `log()`'s informational lines;
errors are printed by the CLI regardless. Output goes to the real stderr even while a command's
third-party chatter is held back (`solar_quant.console`).
"""

from __future__ import annotations

import math
import os
import time

from solar_quant import console
from solar_quant.errors import OptionError

PLAIN_INTERVAL_S = 15.0  # at most one plain progress line per bar this often (plus the last)
INTERVAL_ENV = "SOLAR_QUANT_PROGRESS_INTERVAL"  # seconds between plain lines; 0: every update

_live: list = []  # the tqdm bars on screen, so log lines print above them


def log(message: str) -> None:
    if console.quiet():
        return
    if _live:
        from tqdm import tqdm

        tqdm.write(message, file=console.stderr())
        return
    stream = console.stderr()
    stream.write(message + "\n")
    stream.flush()


def _fmt(seconds: float) -> str:
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _tty() -> bool:
    isatty = getattr(console.stderr(), "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


class Progress:
    """`step()` after each unit of work. On a terminal a tqdm bar (elapsed, ETA, the latest
    detail); otherwise `label i/total detail (elapsed, ETA)` lines, the first, then at most one
    per `min_interval` seconds (default PLAIN_INTERVAL_S), and the last."""

    def __init__(self, total: int, label: str, done: int = 0, min_interval: float | None = None):
        self.total, self.label, self.done = total, label, done
        self.start_done = done
        self.start = time.monotonic()
        floor = plain_interval()
        self.min_interval = floor if min_interval is None else max(min_interval, floor)
        self._last: float | None = None
        self._bar = None
        if not console.quiet() and _tty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=done, desc=label, file=console.stderr(), leave=False,
                             dynamic_ncols=True, mininterval=0.5, bar_format="{desc} {n_fmt}/{total_fmt} {bar} "
                             "[{elapsed}<{remaining}] {postfix}")
            _live.append(self._bar)

    def step(self, detail: str = "", n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.set_postfix_str(detail, refresh=False)
            self._bar.update(n)
            if self.done >= self.total:
                self.close()
            return
        if console.quiet():
            return
        now = time.monotonic()
        if self._last is not None and now - self._last < self.min_interval and self.done < self.total:
            return
        self._last = now
        elapsed = now - self.start
        rate = (self.done - self.start_done) / elapsed if elapsed > 0 else 0
        eta = (self.total - self.done) / rate if rate > 0 else 0
        log(f"{self.label} {self.done}/{self.total} {detail} (elapsed {_fmt(elapsed)}, ETA {_fmt(eta)})".replace("  ", " "))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            if self._bar in _live:
                _live.remove(self._bar)
            self._bar = None


def plain_interval() -> float:
    """Seconds between plain progress lines: $SOLAR_QUANT_PROGRESS_INTERVAL (0: a line per update, as a
    log that records every step wants), else PLAIN_INTERVAL_S."""
    raw = os.environ.get(INTERVAL_ENV)
    if raw is None or not raw.strip():
        return PLAIN_INTERVAL_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not math.isfinite(value) or value < 0:
        raise OptionError(f"{INTERVAL_ENV}={raw!r}: expected a number of seconds >= 0 (0: a line per update)")
    return value
