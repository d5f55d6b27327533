"""GPU spec strings (`2x80GB`, `4x24GB`, `2xH100`, `80GB,24GB`) -> a list of GPU memory sizes.

A size with GB/G/GiB is read as GiB, as GPU vendors label cards (an "80GB" A100 has
81920 MiB). `MB`/`MiB` and `TB`/`TiB` likewise binary. Named cards use the total memory
`nvidia-smi` reported on the machines that carry them here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from solar_quant.errors import OptionError

MIB = 1024**2
GIB = 1024**3
# Total memory as nvidia-smi reported it (MiB) on machines seen here (.library/device/KINDS.md).
NAMED_GPUS = {"H100": 81559 * MIB, "H100-80GB": 81559 * MIB, "H200": 143771 * MIB}
ACCEPTED = ("NxSIZE or SIZE (e.g. 2x80GB, 1x48GB, 4x24GB, 80GB, 40GiB), NxNAME (2xH100, H200, "
            "A100-80GB), or a comma-separated mix (80GB,24GB)")
_UNITS = {"": GIB, "G": GIB, "GB": GIB, "GIB": GIB, "M": MIB, "MB": MIB, "MIB": MIB,
          "T": 1024 * GIB, "TB": 1024 * GIB, "TIB": 1024 * GIB}
_PART = re.compile(r"^(?:(\d+)\s*[x×*]\s*)?(.+)$", re.IGNORECASE)
_SIZE = re.compile(r"^(\d+(?:\.\d+)?)\s*([A-Z]*)$")
_LABELLED = re.compile(r"^[A-Z0-9]+-(\d+(?:\.\d+)?)\s*(GB|GIB|G)$")  # A100-80GB, L40S-48GB


@dataclass(frozen=True)
class Gpu:
    index: int
    capacity: int  # bytes
    label: str


def parse_gpus(spec: str, flag: str = "--gpus") -> list[Gpu]:
    """Parse `spec` into one Gpu per device, in device-index order."""
    sizes: list[tuple[int, str]] = []
    for part in [p.strip() for p in str(spec).split(",")]:
        m = _PART.match(part)
        if not part or not m:
            raise OptionError(f"{flag} {spec!r}: cannot read {part!r}; accepted forms: {ACCEPTED}")
        digits = m.group(1) or "1"
        count = int(digits) if len(digits) <= 6 else 10**6  # long digit strings: too many GPUs anyway
        if count <= 0 or count > 1024:
            raise OptionError(f"{flag} {spec!r}: GPU count {count} must be between 1 and 1024")
        size, label = _size(m.group(2).strip(), spec, flag)
        sizes.extend([(size, label)] * count)
    return [Gpu(i, size, label) for i, (size, label) in enumerate(sizes)]


def _size(text: str, spec: str, flag: str) -> tuple[int, str]:
    key = text.upper()
    if key in NAMED_GPUS:
        return NAMED_GPUS[key], key
    m = _SIZE.match(key) or _LABELLED.match(key)
    if m and (m.group(2) or "") in _UNITS:
        number = float(m.group(1)) * _UNITS[m.group(2) or ""]
        if not number < 2**63:
            raise OptionError(f"{flag} {spec!r}: GPU memory {text!r} is implausibly large")
        value = int(number)
        if value <= 0:
            raise OptionError(f"{flag} {spec!r}: GPU memory must be larger than 0")
        return value, text
    raise OptionError(f"{flag} {spec!r}: cannot read GPU {text!r}; accepted forms: {ACCEPTED}; named: "
                      + ", ".join(sorted(NAMED_GPUS)))


def describe(gpus: list[Gpu]) -> str:
    """'2 x 80.0 GiB' or '80.0 GiB + 24.0 GiB'."""
    caps = [g.capacity for g in gpus]
    if len(set(caps)) == 1:
        return f"{len(caps)} x {caps[0] / GIB:.1f} GiB"
    return " + ".join(f"{c / GIB:.1f} GiB" for c in caps)
