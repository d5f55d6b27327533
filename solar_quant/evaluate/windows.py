"""Fixed scoring windows over one token stream, as the Hugging Face perplexity guide lays them out.

Window i covers tokens [i*stride, i*stride + seqlen). The first window scores every position
that has a predecessor (targets 1..seqlen-1); each later window scores only its last `stride`
targets, so with stride < seqlen every scored token sees at least seqlen - stride tokens of
context and no token is scored twice. With stride == seqlen (the default) the windows do not
overlap and each window's first token is never a target. Only full windows are used.
"""

from __future__ import annotations

from dataclasses import dataclass

from solar_quant.errors import InputError, OptionError


@dataclass(frozen=True)
class Window:
    start: int  # first token of the window in the stream
    length: int  # tokens fed to the model
    score_from: int  # first scored target position inside the window (>= 1)

    @property
    def scored(self) -> int:
        return self.length - self.score_from


def plan_windows(n_tokens: int, seqlen: int, stride: int | None = None) -> list[Window]:
    """Full windows of `seqlen` tokens every `stride` tokens over a stream of `n_tokens`."""
    stride = seqlen if stride is None else stride
    if seqlen < 2:
        raise OptionError(f"--seqlen {seqlen}: a window needs at least 2 tokens")
    if not 0 < stride <= seqlen:
        raise OptionError(f"--stride {stride}: must be between 1 and --seqlen ({seqlen})")
    if n_tokens < seqlen:
        raise InputError(f"the text has {n_tokens} tokens, fewer than one window (--seqlen {seqlen}); "
                         "pass a longer --text or a smaller --seqlen")
    windows = []
    for i, start in enumerate(range(0, n_tokens - seqlen + 1, stride)):
        score_from = 1 if i == 0 else max(1, seqlen - stride)
        windows.append(Window(start, seqlen, score_from))
    return windows


def long_windows(n_tokens: int, context: int, count: int) -> list[Window]:
    """Up to `count` non-overlapping windows of `context` tokens from the start of the stream."""
    if n_tokens < context:
        raise InputError(f"--context {context}: the text has only {n_tokens} tokens; "
                         "pass a longer --text or a smaller --context")
    n = min(count, n_tokens // context)
    return [Window(i * context, context, 1) for i in range(n)]


def default_bucket(context: int) -> int:
    """Bucket width for per-position tables: an eighth of the context, 1024 for contexts past 8k."""
    return 1024 if context > 8192 else max(1, context // 8)


def bucket_edges(context: int, width: int) -> list[tuple[int, int]]:
    """[start, end) target-position ranges covering 0..context."""
    return [(lo, min(lo + width, context)) for lo in range(0, context, width)]
