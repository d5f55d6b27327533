"""glibc's malloc settings for the two streaming steps: the one place the process-wide
`mallopt` calls live (a no-op on other C libraries).

glibc serves a block below its mmap threshold from the heap and a larger one from its own
mmap, unmapped on free; it raises the threshold (up to 32 MiB) each time such a block is freed,
and gives heap memory back to the OS once more than the trim threshold (2x the mmap threshold)
is free at its top. The steps want opposite things:

- bnb (`freed_memory_returned_promptly`): tensor-sized temporaries must go back to the OS at
  once, or resident memory ratchets up by hundreds of MB over a checkpoint;
- GPTQ (`freed_blocks_reused`): every decoder layer allocates and frees the same per-chunk
  temporaries (4096 tokens x intermediate size: 25 MB on SmolLM2) thousands of times; mapped and
  unmapped each time, each allocation faults its pages in anew.

Each setting lasts only while its step runs. glibc cannot turn its threshold raising back on,
so on exit the thresholds are set to the values that raising converges to (mmap 32 MiB,
trim 64 MiB); a step left at its own values slowed every later step of the same process
(`run`: 217 s of system time in `make demo` after the bnb step; bench/results/demo_time_*.txt).
"""

from __future__ import annotations

import contextlib
import ctypes
import sys

M_TRIM_THRESHOLD = -1  # glibc malloc.h
M_MMAP_THRESHOLD = -3
MIB = 1 << 20
CONVERGED = (32 * MIB, 64 * MIB)  # (mmap, trim) where glibc's own raising ends

RETURN_PROMPTLY = (1 * MIB, None)  # the trim threshold left as it is
# GPTQ: blocks up to 128 MiB come from the heap and stay there for the next chunk; larger ones
# (a 70B's hidden-state buffers, its chunk products) are still mapped and unmapped.
REUSE = (128 * MIB, 128 * MIB)  # trim at 128 MiB free: 3-bit g128 SmolLM2 peak RSS 735 -> 637 MiB, as few faults


def glibc():
    """The C library handle where it is glibc with `mallopt`, else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt  # noqa: B018 - absent on C libraries without it
        return libc
    except (OSError, AttributeError):
        return None


@contextlib.contextmanager
def _thresholds(mmap: int, trim: int | None):
    libc = glibc()
    if libc is not None:
        libc.mallopt(M_MMAP_THRESHOLD, mmap)
        if trim is not None:
            libc.mallopt(M_TRIM_THRESHOLD, trim)
    try:
        yield
    finally:
        if libc is not None:
            libc.mallopt(M_MMAP_THRESHOLD, CONVERGED[0])
            libc.mallopt(M_TRIM_THRESHOLD, CONVERGED[1])


def freed_memory_returned_promptly():
    """bnb: every block of 1 MiB or more is mapped and unmapped on free. Measured on the 4-layer
    benchmark checkpoint: peak RSS 884 -> ~630 MiB."""
    return _thresholds(*RETURN_PROMPTLY)


def freed_blocks_reused():
    """GPTQ: blocks up to 128 MiB are kept on the heap for reuse, and up to 128 MiB of free heap
    before it is trimmed. Measured on SmolLM2, 3-bit g128, 64 x 512 tokens, 2 threads, whole
    `quantize` runs: 0.87 M -> 0.18 M page faults, system time 5.1 -> 2.3 s; peak RSS 637 MiB
    against 686-735 MiB with (64, 64) or (128, 256) MiB (bench/README.md)."""
    return _thresholds(*REUSE)
