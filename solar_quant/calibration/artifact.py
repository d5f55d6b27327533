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


# --- tokenizer identity ------------------------------------------------------------------------

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


def load_tokenizer(model_path: str | Path):
    """The model folder's tokenizer; a folder without a loadable one is a CalibrationError."""
    path = Path(model_path)
    if not path.is_dir():
        raise CalibrationError(f"--model {path}: no such folder")
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise CalibrationError(f"{path}: no tokenizer.json or tokenizer.model; copy the model's tokenizer files into the folder")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # transformers raises many types (OSError, ValueError, JSON and tokenizers errors)
        detail = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise CalibrationError(f"{path}: cannot load the tokenizer ({type(e).__name__}: {detail}); "
                               "check tokenizer.json / tokenizer_config.json") from None


def tokenizer_identity(model_path: str | Path, tokenizer=None) -> dict:
    """What makes token ids mean the same thing: sha256 of the vocabulary files, vocab size, BOS/EOS.

    Without a loaded `tokenizer`, read from tokenizer.json and tokenizer_config.json by the
    `tokenizers` library alone where those files settle every field (`_identity_from_files`):
    checking a calibration set then does not import transformers' tokenizer stack (~100 MB of
    resident memory in a GPTQ run that needs no tokenizer). Otherwise transformers loads it."""
    from solar_quant.checkpoint.manifest import sha256_file

    path = Path(model_path)
    files = {name: sha256_file(path / name) for name in TOKENIZER_FILES if (path / name).is_file()}
    if tokenizer is None:
        found = _identity_from_files(path)
        if found is not None:
            return {"files": files, **found}
    tok = tokenizer if tokenizer is not None else load_tokenizer(path)
    return {"files": files, "vocab_size": len(tok), "bos_token": tok.bos_token, "bos_token_id": tok.bos_token_id,
            "eos_token": tok.eos_token, "eos_token_id": tok.eos_token_id}


SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")


def _identity_from_files(path: Path) -> dict | None:
    """vocab size and BOS/EOS as transformers' fast tokenizer reports them, from the files, or
    None wherever its loading could add to what tokenizer.json holds: no tokenizer.json or
    tokenizer_config.json, BOS or EOS left to a tokenizer class's default, or a special or
    added token the vocabulary lacks (or holds under another id)."""
    tj, tc = path / "tokenizer.json", path / "tokenizer_config.json"
    if not (tj.is_file() and tc.is_file()):
        return None
    try:
        config = json.loads(tc.read_text())
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(tj))
    except Exception:  # unreadable here: transformers' loader reports it in its own words
        return None
    if not isinstance(config, dict) or "bos_token" not in config or "eos_token" not in config:
        return None

    named = [config.get(k) for k in SPECIAL_TOKEN_KEYS]
    extra = config.get("additional_special_tokens") or []
    extra_map = config.get("extra_special_tokens") or {}
    named += list(extra) if isinstance(extra, list) else [extra]
    named += list(extra_map.values()) if isinstance(extra_map, dict) else [extra_map]
    # a token given as anything but a string (an AddedToken dict, ...) is transformers' to read
    if any(n is not None and (not isinstance(n, str) or tok.token_to_id(n) is None) for n in named):
        return None
    for token_id, entry in (config.get("added_tokens_decoder") or {}).items():
        text = entry.get("content") if isinstance(entry, dict) else None
        if not str(token_id).isdigit() or not isinstance(text, str) or tok.token_to_id(text) != int(token_id):
            return None
    bos, eos = config["bos_token"], config["eos_token"]
    return {"vocab_size": tok.get_vocab_size(with_added_tokens=True),
            "bos_token": bos, "bos_token_id": tok.token_to_id(bos) if bos is not None else None,
            "eos_token": eos, "eos_token_id": tok.token_to_id(eos) if eos is not None else None}


def tokenizer_differences(expected: dict, actual: dict) -> list[str]:
    """Why two identities differ (empty when the same ids mean the same tokens)."""
    diffs = [f"{k} {expected.get(k)!r} vs {actual.get(k)!r}" for k in ("vocab_size", "bos_token_id", "eos_token_id")
             if expected.get(k) != actual.get(k)]
    a, b = expected.get("files") or {}, actual.get("files") or {}
    common = set(a) & set(b)
    if not common:
        diffs.append(f"no tokenizer file in common ({sorted(a)} vs {sorted(b)})")
    diffs += [f"{name} sha256 differs" for name in sorted(common) if a[name] != b[name]]
    return diffs


def check_tokenizer(calib: CalibrationSet, model_path: str | Path, calib_path: str | Path = "the calibration set") -> None:
    """Raise if the calibration ids were made with another tokenizer than the model's."""
    expected = calib.card.get("tokenizer")
    if not expected:
        raise CalibrationError(f"{calib_path}: the card records no tokenizer identity; rebuild it with `solar-quant calibrate`")
    diffs = tokenizer_differences(expected, tokenizer_identity(model_path))
    if diffs:
        raise CalibrationError(f"{calib_path} was built with a different tokenizer than {model_path} ({'; '.join(diffs)}); "
                               f"rebuild it with `solar-quant calibrate --model {model_path}`")
