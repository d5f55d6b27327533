"""Helpers the format entries' `verify` checks share: reading a JSON object with findings,
relative errors, and the per-Linear error `solar_quant.json` records."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

RECORD = "solar_quant.json"


def read_json(path: Path, findings: list[str]) -> dict | None:
    if not path.is_file():
        findings.append(f"{path}: missing")
        return None
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        findings.append(f"{path}: not valid JSON ({e})")
        return None
    if not isinstance(doc, dict):
        findings.append(f"{path}: must hold a JSON object")
        return None
    return doc


def rel_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    return float((approx - exact).norm() / exact.norm().clamp_min(1e-30))


def recorded_error(record: dict, layer: int, local: str) -> float | None:
    """The rel_weight_error solar_quant.json records for one Linear."""
    for entry in record.get("layers") or []:
        if isinstance(entry, dict) and entry.get("layer") == layer:
            value = ((entry.get("linears") or {}).get(local) or {}).get("rel_weight_error")
            return float(value) if isinstance(value, (int, float)) else None
    return None
