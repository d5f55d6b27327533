"""SIGINT and SIGTERM stop a command the same way: as a KeyboardInterrupt, so every
`except KeyboardInterrupt` / `except BaseException` cleanup path runs (staging folders are
abandoned, resumable jobs are kept), and the CLI prints one line saying how to resume and
exits 130 for either signal.

`deferred()` holds both signals over a few steps that must not be split (the renames that
move a finished folder into place); the signal is acted on as the block ends.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
EXIT_CODE = 130  # for SIGINT and SIGTERM alike (128 + SIGINT), see README "Reliability"
DEFAULT_HINT = "interrupted; nothing partial was left under the output name; rerun the same command to start again"

_hint: str | None = None


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(signal.Signals(signum).name)


def install() -> None:
    """Make SIGTERM behave like Ctrl-C for this process (the CLI entry calls this once).

    A signal the parent set to be ignored stays ignored, as Python itself does for SIGINT."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in STOP_SIGNALS:
        if signal.getsignal(sig) is not signal.SIG_IGN:
            signal.signal(sig, _raise_interrupt)


def set_interrupt_hint(text: str | None) -> None:
    """What the CLI prints when the running command is interrupted (None: the default)."""
    global _hint
    _hint = text


def interrupt_message() -> str:
    return _hint or DEFAULT_HINT


@contextlib.contextmanager
def deferred():
    """Run the block with SIGINT/SIGTERM held; a signal that arrived is then handled as usual."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    for sig in STOP_SIGNALS:
        if previous[sig] is not signal.SIG_IGN:
            signal.signal(sig, lambda signum, frame: pending.append(signum))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        if pending:
            _deliver(pending[0], previous[pending[0]])


def _deliver(signum: int, handler) -> None:
    if callable(handler):
        handler(signum, None)
    elif handler == signal.SIG_DFL:
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        os.kill(os.getpid(), signum)
