"""Where a command's output goes: its result on stdout, our progress and errors on stderr, and
what third-party libraries print (banners, INFO lines, warnings) held back unless `--verbose`.

A CLI command runs inside `captured()`. For its duration `sys.stdout` and `sys.stderr` are
`Chatter` streams: GPTQModel's logger writes its banner and INFO lines to whatever `sys.stdout`
is at the time, transformers, torch and bitsandbytes log to `sys.stderr`, and Python warnings go
there too, so all of it lands in the chatter. With `--verbose` the chatter is passed on to the
real stderr (never to stdout); otherwise it is kept in memory and, when it held something that
looks like a real problem (not a banner, INFO line or one of the known harmless notices), one
summary line says so at the end. `result()` writes to the real stdout, `stderr()` is the real
stderr for our own lines. Outside `captured()` (library use) both are simply `sys.stdout` /
`sys.stderr`.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
from collections import deque
from dataclasses import dataclass, field

VERBOSE_ENV = "SOLAR_QUANT_VERBOSE"
QUIET_ENV = "SOLAR_QUANT_QUIET"
HELD_LINES = 400  # chatter lines kept for the summary and for a crash report

# Lines third-party packages print on every run that say nothing about this run's results.
HARMLESS = tuple(re.compile(p) for p in (
    r"^\s*$",
    r"^\s*(INFO|DEBUG)\b",
    r"[┌└│▓▒░─┐┘]",  # GPTQModel's ASCII banner
    r"^(GPT-QModel|Transformers|Torch|Triton|Python|Optimum|Accelerate)\s*:",
    r"Python GIL is enabled",
    r"is an Enum subclass and is now natively supported by torch\.compile",  # torchao's pytree notices
    r"Failed to load CPU gemm_4bit_forward from kernels-community",  # bitsandbytes' optional hub kernel
    r"TRANSFORMERS_CACHE|HF_HOME",
    r"^\s+warnings\.warn\(",  # the source line Python prints under a warning
    r"\b(FutureWarning|DeprecationWarning|PendingDeprecationWarning)\b",  # libraries' own deprecations
    # transformers, when eval passes GPTQConfig(backend=...) to pick a kernel that loads partial groups:
    r"You passed `quantization_config` or equivalent parameters to `from_pretrained` but the model",
))
RELEVANT = re.compile(r"warn|error|fail|traceback|exception|nan\b|overflow", re.IGNORECASE)


@dataclass
class _State:
    out: object | None = None  # the real stdout while a command is captured
    err: object | None = None  # the real stderr while a command is captured
    verbose: bool | None = None
    quiet: bool | None = None
    held: deque = field(default_factory=lambda: deque(maxlen=HELD_LINES))
    relevant: list[str] = field(default_factory=list)


_STATE = _State()


def configure(*, verbose: bool | None = None, quiet: bool | None = None) -> None:
    """Set by the CLI's `--verbose` / `--quiet`; unset, the environment variables decide."""
    if verbose is not None:
        _STATE.verbose = verbose
    if quiet is not None:
        _STATE.quiet = quiet


def verbose() -> bool:
    return _STATE.verbose if _STATE.verbose is not None else os.environ.get(VERBOSE_ENV) == "1"


def quiet() -> bool:
    return _STATE.quiet if _STATE.quiet is not None else os.environ.get(QUIET_ENV) == "1"


def stdout():
    """The stream a command's result goes to."""
    return _STATE.out if _STATE.out is not None else sys.stdout


def stderr():
    """The stream our own progress, warnings and errors go to."""
    return _STATE.err if _STATE.err is not None else sys.stderr


def result(text) -> None:
    """Print the command's result (a path, a table, JSON) on stdout."""
    text = str(text)
    stream = stdout()
    stream.write(text if text.endswith("\n") else text + "\n")
    stream.flush()


def is_harmless(line: str) -> bool:
    return any(p.search(line) for p in HARMLESS)


class Chatter:
    """A text stream standing in for stdout/stderr while a command runs (see the module docstring)."""

    def __init__(self, name: str):
        self.name = name
        self._partial = ""

    # the text-stream surface libraries use
    encoding = "utf-8"
    errors = "replace"

    def write(self, text: str) -> int:
        if verbose() and _STATE.err is not None:
            _STATE.err.write(text)
            return len(text)
        self._partial += text
        *lines, self._partial = self._partial.split("\n")
        for line in lines:
            _hold(line)
        return len(text)

    def writelines(self, lines) -> None:
        for line in lines:
            self.write(line)

    def flush(self) -> None:
        if verbose() and _STATE.err is not None:
            _STATE.err.flush()

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:  # C code that asks for a descriptor writes to the real stderr
        return (_STATE.err or sys.__stderr__).fileno()

    def readable(self) -> bool:
        return False

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    @property
    def closed(self) -> bool:
        return False

    def close(self) -> None:
        self.flush()


def _hold(line: str) -> None:
    line = line.rstrip("\r")
    _STATE.held.append(line)
    if not is_harmless(line) and RELEVANT.search(line):
        _STATE.relevant.append(line.strip())


def held_lines() -> list[str]:
    """The chatter held back so far (the last HELD_LINES lines)."""
    return list(_STATE.held)


@contextlib.contextmanager
def captured():
    """Run a command with third-party output held back; restores the streams afterwards.

    Nested use (a command calling another) keeps the outer capture."""
    if _STATE.out is not None:
        yield
        return
    _STATE.out, _STATE.err = sys.stdout, sys.stderr
    _STATE.held.clear()
    _STATE.relevant.clear()
    sys.stdout, sys.stderr = Chatter("stdout"), Chatter("stderr")
    crashed = False
    try:
        yield
    except BaseException as e:
        crashed = not _is_expected(e)
        raise
    finally:
        for stream in (sys.stdout, sys.stderr):
            if isinstance(stream, Chatter):
                stream.write("\n" if stream._partial else "")
        sys.stdout, sys.stderr = _STATE.out, _STATE.err
        err = _STATE.err
        _STATE.out = _STATE.err = None
        _report_held(err, crashed)


def _is_expected(e: BaseException) -> bool:
    """Exceptions that end a command with our own one-line message."""
    from solar_quant.errors import SolarQuantError

    if isinstance(e, SystemExit):
        return True
    try:
        import click

        if isinstance(e, (click.exceptions.Exit, click.exceptions.Abort, click.ClickException)):
            return True
    except ImportError:
        pass
    try:
        import typer  # typer >= 0.16 raises its own Exit (not click's) after our one-line message

        if isinstance(e, typer.Exit):
            return True
    except ImportError:
        pass
    return isinstance(e, (SolarQuantError, KeyboardInterrupt))


def _report_held(err, crashed: bool) -> None:
    if verbose():
        return
    if crashed and _STATE.held:  # an unexpected error: what the libraries said may explain it
        err.write("solar-quant: output held back from libraries before the error:\n")
        err.write("\n".join(line for line in _STATE.held if line.strip()) + "\n")
    elif _STATE.relevant:
        first = _STATE.relevant[0]
        first = first if len(first) <= 120 else first[:117] + "..."
        n = len(_STATE.relevant)
        err.write(f"solar-quant: {n} warning line(s) from libraries were held back, the first: {first!r}; "
                  f"rerun with --verbose to see them\n")
    err.flush()
