"""The calibration artifact: token ids in safetensors plus a JSON card, saved atomically.

`calibration.safetensors` holds `input_ids` (int64, [nsamples, seqlen]); `calibration.json`
is the card (sources and counts, template, tokenizer identity, length histogram, sha256 of
the ids). Quantized variants copy the card into `solar_quant.json`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from solar_quant.errors import CalibrationError

IDS_FILE = "calibration.safetensors"
CARD_FILE = "calibration.json"


def ids_sha256(input_ids: torch.Tensor) -> str:
    return hashlib.sha256(input_ids.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


@dataclass
class CalibrationSet:
    input_ids: torch.Tensor  # int64 [nsamples, seqlen]
    card: dict = field(default_factory=dict)

    def save(self, out: str | Path, overwrite: bool = False) -> Path:
        from safetensors.torch import save_file

        from solar_quant.checkpoint.writer import StagedFolder

        staged = StagedFolder(out, overwrite=overwrite)
        try:
            save_file({"input_ids": self.input_ids.to(torch.int64).contiguous()}, str(staged.path(IDS_FILE)),
                      metadata={"format": "pt"})
            staged.write_json(CARD_FILE, self.card)
            return staged.commit()
        except BaseException:
            staged.abandon()
            raise


def load_calibration(path: str | Path) -> CalibrationSet:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    ids_path, card_path = path / IDS_FILE, path / CARD_FILE
    if not ids_path.is_file() or not card_path.is_file():
        raise CalibrationError(f"{path}: not a calibration artifact (needs {IDS_FILE} and {CARD_FILE}); make one with `solar-quant calibrate`")
    try:
        ids = load_file(str(ids_path))["input_ids"]
        card = json.loads(card_path.read_text())
    except (SafetensorError, KeyError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CalibrationError(f"{path}: calibration artifact is corrupt ({e}); rebuild it with `solar-quant calibrate`") from None
    if ids.dim() != 2 or ids.dtype != torch.int64:
        raise CalibrationError(f"{ids_path}: input_ids must be int64 [nsamples, seqlen], found {ids.dtype} {list(ids.shape)}")
    if card.get("sha256") and card["sha256"] != ids_sha256(ids):
        raise CalibrationError(f"{ids_path}: sha256 differs from {CARD_FILE}; the artifact was modified, rebuild it")
    return CalibrationSet(ids, card)
