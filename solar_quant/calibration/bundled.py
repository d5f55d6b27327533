"""The bundled calibration set and held-out evaluation text in the repository's `calibration/`.

Default mix (weights are shares of calibration rows, hence of tokens):
  orca.jsonl    0.30  Orca-shaped instruction records (system_prompt, question, response)
  alpaca.jsonl  0.30  Alpaca-shaped instruction records (instruction, input, output)
  prose.txt     0.40  public-domain prose (State of the Union addresses, Moby-Dick)
60 % template samples, as SOLAR was fine-tuned on Orca- and Alpaca-style data in its own
template, and 40 % plain prose so calibration also covers ordinary text (chat-only data is
known to hurt). `chat.jsonl` (multi-turn) ships as an example source, outside the default mix.
`SOLAR_QUANT_CALIBRATION_DIR` points elsewhere (e.g. for an installed wheel).
"""

from __future__ import annotations

import os
from pathlib import Path

from solar_quant.errors import CalibrationError
from solar_quant.options import SourceSpec

DEFAULT_MIX = (("orca.jsonl", 0.3, "orca"), ("alpaca.jsonl", 0.3, "alpaca"), ("prose.txt", 0.4, "text"))
EVAL_TEXT = "eval.txt"


def bundled_dir() -> Path:
    env = os.environ.get("SOLAR_QUANT_CALIBRATION_DIR")
    path = Path(env) if env else Path(__file__).resolve().parents[2] / "calibration"
    if not (path / EVAL_TEXT).is_file():
        raise CalibrationError(f"{path}: the bundled calibration folder is missing; set SOLAR_QUANT_CALIBRATION_DIR "
                               "to a checkout's calibration/ folder, or pass --source files")
    return path


def default_sources() -> list[SourceSpec]:
    root = bundled_dir()
    return [SourceSpec(path=str(root / name), weight=w, format=fmt) for name, w, fmt in DEFAULT_MIX]


def default_eval_text() -> Path:
    """The held-out evaluation text (State of the Union addresses never used for calibration)."""
    return bundled_dir() / EVAL_TEXT


def display_name(path: str | Path) -> str:
    """How a source is named in cards: `calibration/NAME` for bundled files, else as given."""
    p = Path(path)
    try:
        if p.resolve().parent == bundled_dir().resolve():
            return f"calibration/{p.name}"
    except CalibrationError:
        pass
    return str(path)
