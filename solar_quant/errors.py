"""Typed errors: each message names the file, field or flag at fault and says what to change.

The CLI turns every `SolarQuantError` into one line on stderr and the subclass's exit code.
"""


class SolarQuantError(Exception):
    """Base class. `exit_code` is what the CLI exits with."""

    exit_code = 2


class InputError(SolarQuantError):
    """A path, file or option given by the user is unusable."""


class CheckpointError(InputError):
    """The source checkpoint is missing, malformed or not a supported architecture."""


class OptionError(InputError):
    """A flag or recipe value is out of range or conflicts with another."""


class CalibrationError(InputError):
    """Calibration sources or artifacts are malformed or insufficient."""


class OutputError(SolarQuantError):
    """The output location cannot be written (exists, read-only, disk full)."""


class IntegrityError(OutputError):
    """What was staged for OUT does not read back as written; nothing was moved under OUT."""


class NumericsError(SolarQuantError):
    """A tensor holds NaN/Inf, or a factorization failed beyond recovery."""


class DependencyError(SolarQuantError):
    """An optional package is missing; the message names the extra to install."""


class VerificationError(SolarQuantError):
    """`verify` found problems with an output folder."""

    exit_code = 1


class GateError(SolarQuantError):
    """An evaluation gate failed."""

    exit_code = 1


class DistributedError(SolarQuantError):
    """A rank of a multi-process (torchrun) job died, hung past the collective timeout or failed."""


class Interrupted(SolarQuantError):
    """SIGINT/SIGTERM arrived; the message says how to resume."""

    exit_code = 130
