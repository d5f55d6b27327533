"""Keep stdout for a command's result: what else writes there meanwhile goes to stderr."""

from __future__ import annotations

import contextlib
import io
import os
import sys


@contextlib.contextmanager
def result_stdout():
    """A text stream on the real stdout for the result alone, while everything else that
    writes to stdout meanwhile (file descriptor 1 or `sys.stdout`: e.g. a loader's banner or INFO
    lines) lands on stderr. Where stdout is not a file descriptor (an in-process test runner), it
    is yielded as it is."""
    try:
        fd, err_fd = sys.stdout.fileno(), sys.stderr.fileno()
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        yield sys.stdout
        return
    sys.stdout.flush()
    saved = os.dup(fd)
    result = os.fdopen(os.dup(saved), "w", encoding="utf-8", errors="replace")
    os.dup2(err_fd, fd)
    try:
        yield result
    finally:
        with contextlib.suppress(OSError, ValueError):
            result.flush()
            sys.stdout.flush()
        os.dup2(saved, fd)
        os.close(saved)
        with contextlib.suppress(OSError, ValueError):
            result.close()
