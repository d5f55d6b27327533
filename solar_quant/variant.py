"""What every variant folder carries besides its weights: config with quantization and
rope settings, tokenizer files, generation config, and `solar_quant.json`."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from solar_quant import TOOL_NAME, __version__
from solar_quant.checkpoint.reader import CheckpointReader
from solar_quant.checkpoint.writer import StagedFolder
from solar_quant.rope import RopeScaling, apply_rope

SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
              "chat_template.jinja", "generation_config.json", "added_tokens.json", "LICENSE", "LICENSE.txt")
RECORD_NAME = "solar_quant.json"


def copy_side_files(reader: CheckpointReader, staged: StagedFolder) -> list[str]:
    """Copy tokenizer, generation config and licence files from the source (never moved).

    A source whose tokenizer has no chat template (SOLAR-0-70b's has none) is taken to be tuned
    on SOLAR's template, as calibration's default assumes: its variant gets that template as
    `chat_template.jinja` and in `tokenizer_config.json`, so `apply_chat_template` and servers
    render the prompts the model was tuned on. A source with its own template is copied as is."""
    copied = []
    for name in SIDE_FILES:
        src = reader.path / name
        if src.is_file():
            shutil.copyfile(src, staged.path(name))
            copied.append(name)
    if adds_solar_template(reader):
        copied += _write_solar_template(staged)
    return copied


def adds_solar_template(reader: CheckpointReader) -> bool:
    """True when the source has a tokenizer but no chat template (see `copy_side_files`)."""
    from solar_quant.calibration.templates import has_chat_template

    has_tokenizer = any((reader.path / n).is_file() for n in ("tokenizer.json", "tokenizer.model"))
    return has_tokenizer and not has_chat_template(reader.path)


def _write_solar_template(staged: StagedFolder) -> list[str]:
    from solar_quant.calibration.templates import CHAT_TEMPLATE_FILE, SOLAR_CHAT_TEMPLATE

    staged.write_text(CHAT_TEMPLATE_FILE, SOLAR_CHAT_TEMPLATE)
    written = [CHAT_TEMPLATE_FILE]
    tok_cfg = staged.path("tokenizer_config.json")
    if tok_cfg.is_file():  # servers that read only tokenizer_config.json (TGI) find it there too
        try:
            doc = json.loads(tok_cfg.read_text())
        except ValueError:
            doc = None
        if isinstance(doc, dict):
            doc["chat_template"] = SOLAR_CHAT_TEMPLATE
            staged.write_text("tokenizer_config.json", json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
    return written


def variant_config(source_cfg: dict, quantization_config: dict, rope: RopeScaling, dtype: str = "float16") -> dict:
    """The source config with rope settings written in and `quantization_config` set."""
    cfg = apply_rope(source_cfg, rope)
    cfg["quantization_config"] = quantization_config
    cfg["dtype"] = dtype
    cfg.pop("torch_dtype", None)
    return cfg


def tool_record(reader: CheckpointReader, method: str, options: dict, **extra) -> dict:
    """The body of solar_quant.json: deterministic (no timestamps), so reruns give equal bytes.
    The source is named, not located: folder name, sha256 and what the model card needs."""
    record = {"tool": TOOL_NAME, "version": __version__, "method": method, "options": options,
              "source": {**reader.identity(), **source_card_metadata(reader.path)}, **extra}
    if adds_solar_template(reader):
        record["chat_template"] = "solar (added: the source's tokenizer has none)"
    return record


_HUB_CACHE_DIR = re.compile(r"^models--([A-Za-z0-9][\w.-]*)--([\w.-]+)$")  # huggingface_hub's cache layout
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def source_card_metadata(path: Path) -> dict:
    """The source's Hub id (`model_id`) and licence where they can be told from the folder alone:
    huggingface_hub's cache path (`models--ORG--NAME/snapshots/…`), config.json's `_name_or_path`,
    the front matter of the source's README.md, or the embedded demo model."""
    from solar_quant.models.demo import DEMO_LICENSE, DEMO_MODEL_ID, is_demo_folder

    path = Path(path).resolve()
    found: dict = {}
    for part in reversed(path.parts):
        m = _HUB_CACHE_DIR.match(part)
        if m:
            found["model_id"] = f"{m.group(1)}/{m.group(2)}"
            break
    try:
        named = json.loads((path / "config.json").read_text()).get("_name_or_path")
    except (OSError, ValueError):
        named = None
    if "model_id" not in found and isinstance(named, str) and _HUB_ID.match(named) and not Path(named).exists():
        found["model_id"] = named
    licence = _front_matter(path / "README.md").get("license")
    if isinstance(licence, str) and licence:
        found["license"] = licence
    if is_demo_folder(path):
        found = {"model_id": DEMO_MODEL_ID, "license": DEMO_LICENSE}
    return found


def _front_matter(readme: Path) -> dict:
    """The YAML block at the top of a model card (empty when there is none or it does not parse)."""
    try:
        text = readme.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return {}
    if not text.startswith("---"):
        return {}
    end = text.find("\n---", 3)
    if end < 0:
        return {}
    import yaml

    try:
        doc = yaml.safe_load(text[3:end])
    except yaml.YAMLError:
        return {}
    return doc if isinstance(doc, dict) else {}
