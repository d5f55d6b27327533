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
    from solar_quant import console

    out_stream = console.stdout()  # the real stdout even while library chatter is held back
    try:
        fd, err_fd = out_stream.fileno(), console.stderr().fileno()
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
        yield out_stream
        return
    out_stream.flush()
    saved = os.dup(fd)
    result = os.fdopen(os.dup(saved), "w", encoding="utf-8", errors="replace")
    os.dup2(err_fd, fd)
    try:
        yield result
    finally:
        with contextlib.suppress(OSError, ValueError):
            result.flush()
            out_stream.flush()
        os.dup2(saved, fd)
        os.close(saved)
        with contextlib.suppress(OSError, ValueError):
            result.close()
