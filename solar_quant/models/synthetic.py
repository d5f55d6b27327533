"""Synthetic Llama checkpoints for tests and benchmarks.

`write_random_llama` streams random weights through the sharded writer (any size, one
tensor in memory at a time). `write_sparse_llama` writes real safetensors headers over
sparse files, so a 140 GB checkpoint's layout costs no disk and no time: headers-only
tools (inspect, plan, dry runs) see the true shapes.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

from solar_quant.architecture import LlamaShape

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json",
                   "tokenizer.model", "generation_config.json")


def llama_config(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=160, vocab=49152, max_positions=64,
                 rope_theta=10000.0, tie_word_embeddings=False, dtype="float16", **extra) -> dict:
    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "head_dim": hidden // heads, "intermediate_size": intermediate, "vocab_size": vocab,
        "max_position_embeddings": max_positions, "rms_norm_eps": 1e-5, "hidden_act": "silu",
        "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta},
        "tie_word_embeddings": tie_word_embeddings, "dtype": dtype, "bos_token_id": 1, "eos_token_id": 2,
        "attention_bias": False, "mlp_bias": False,
    }
    cfg.update(extra)
    return cfg


SOLAR_70B_CONFIG = llama_config(hidden=8192, layers=80, heads=64, kv_heads=8, intermediate=28672, vocab=32000,
                                max_positions=4096, rope_theta=10000.0, rms_norm_eps=1e-5)


def _copy_tokenizer(src: Path | None, dst: Path) -> None:
    if src is None:
        return
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file() and name != "generation_config.json":
            shutil.copy(Path(src) / name, dst / name)


def write_random_llama(path: str | Path, config: dict, seed: int = 0, shard_bytes: int = 64 * 1024**2,
                       tokenizer_from: str | Path | None = None, std: float = 0.05) -> Path:
    """Write a random fp16 Llama checkpoint (sharded, with index and manifest) to `path`."""
    import torch

    from solar_quant.checkpoint.writer import ShardedWriter, StagedFolder

    staged = StagedFolder(path, overwrite=True)
    gen = torch.Generator().manual_seed(seed)
    shape = LlamaShape.from_config(config)
    writer = ShardedWriter(staged.staging, shard_bytes)
    for name, dims in shape.tensor_shapes().items():
        if name.endswith("layernorm.weight") or name == "model.norm.weight":
            t = 1.0 + 0.1 * torch.randn(dims, generator=gen)
        else:
            t = torch.randn(dims, generator=gen) * std
        writer.add(name, t.to(torch.float16))
    writer.close()
    staged.write_json("config.json", config)
    staged.write_json("generation_config.json", {"bos_token_id": config.get("bos_token_id", 1),
                                                 "eos_token_id": config.get("eos_token_id", 2)})
    _copy_tokenizer(Path(tokenizer_from) if tokenizer_from else None, staged.staging)
    return staged.commit()


def write_sparse_llama(path: str | Path, config: dict, shard_bytes: int = 5 * 1024**3) -> Path:
    """Real headers over sparse (all-zero, unallocated) data: a full-size layout for free."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    shape = LlamaShape.from_config(config)
    shards: list[dict] = [{}]
    sizes = [0]
    for name, dims in shape.tensor_shapes().items():
        nbytes = math.prod(dims) * 2
        if shards[-1] and sizes[-1] + nbytes > shard_bytes:
            shards.append({})
            sizes.append(0)
        shards[-1][name] = {"dtype": "F16", "shape": list(dims), "data_offsets": [sizes[-1], sizes[-1] + nbytes]}
        sizes[-1] += nbytes
    weight_map = {}
    for i, (entries, size) in enumerate(zip(shards, sizes), 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        raw = json.dumps({"__metadata__": {"format": "pt"}, **entries}).encode()
        raw += b" " * (-len(raw) % 8)
        with open(path / fname, "wb") as f:
            f.write(len(raw).to_bytes(8, "little"))
            f.write(raw)
        os.truncate(path / fname, 8 + len(raw) + size)
        weight_map.update({n: fname for n in entries})
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}, indent=2))
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path
