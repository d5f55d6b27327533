"""What every variant folder carries besides its weights: config with quantization and
rope settings, tokenizer files, generation config, and `solar_quant.json`."""

from __future__ import annotations

import shutil

from solar_quant import TOOL_NAME, __version__
from solar_quant.checkpoint.reader import CheckpointReader
from solar_quant.checkpoint.writer import StagedFolder
from solar_quant.rope import RopeScaling, apply_rope

SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
              "chat_template.jinja", "generation_config.json", "added_tokens.json", "LICENSE", "LICENSE.txt")
RECORD_NAME = "solar_quant.json"


def copy_side_files(reader: CheckpointReader, staged: StagedFolder) -> list[str]:
    """Copy tokenizer, generation config and licence files from the source (never moved)."""
    copied = []
    for name in SIDE_FILES:
        src = reader.path / name
        if src.is_file():
            shutil.copyfile(src, staged.path(name))
            copied.append(name)
    return copied


def variant_config(source_cfg: dict, quantization_config: dict, rope: RopeScaling, dtype: str = "float16") -> dict:
    """The source config with rope settings written in and `quantization_config` set."""
    cfg = apply_rope(source_cfg, rope)
    cfg["quantization_config"] = quantization_config
    cfg["dtype"] = dtype
    cfg.pop("torch_dtype", None)
    return cfg


def tool_record(reader: CheckpointReader, method: str, options: dict, **extra) -> dict:
    """The body of solar_quant.json: deterministic (no timestamps), so reruns give equal bytes."""
    return {"tool": TOOL_NAME, "version": __version__, "method": method, "options": options,
            "source": reader.identity(), **extra}
