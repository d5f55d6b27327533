"""Facts about a checkpoint from config.json and safetensors headers alone (no tensor data)."""

from __future__ import annotations

from collections import Counter

from solar_quant.architecture import LlamaShape
from solar_quant.checkpoint.reader import CheckpointReader
from solar_quant.rope import read_rope


def inspect_checkpoint(path: str) -> dict:
    reader = CheckpointReader(path)
    reader.require_llama()
    cfg = reader.config
    shape = LlamaShape.from_config(cfg, str(reader.path / "config.json"))
    tensors = reader.tensors
    dtypes = Counter()
    for t in tensors.values():
        dtypes[t.dtype] += t.numel
    rope = read_rope(cfg)
    quant = cfg.get("quantization_config") if isinstance(cfg.get("quantization_config"), dict) else None
    return {
        "path": str(reader.path),
        "architecture": (cfg.get("architectures") or ["LlamaForCausalLM"])[0],
        "model_type": cfg.get("model_type"),
        "parameters": shape.parameter_count(),
        "stored_elements": sum(t.numel for t in tensors.values()),
        "tensor_dtypes": dict(dtypes.most_common()),
        "config_dtype": cfg.get("dtype") or cfg.get("torch_dtype"),
        "layers": shape.layers,
        "hidden_size": shape.hidden,
        "intermediate_size": shape.intermediate,
        "attention_heads": shape.heads,
        "kv_heads": shape.kv_heads,
        "gqa": shape.kv_heads < shape.heads,
        "head_dim": shape.head_dim,
        "vocab_size": shape.vocab,
        "max_position_embeddings": shape.max_positions,
        "tie_word_embeddings": shape.tie_word_embeddings,
        "rope": rope,
        "dynamic_rope_scaling": rope["rope_type"] == "dynamic",
        "shards": [{"file": s, "bytes": (reader.path / s).stat().st_size} for s in reader.shards],
        "tensor_count": len(tensors),
        "tensor_bytes": reader.total_bytes,
        "file_bytes": reader.file_bytes(),
        "quantized": _quant_summary(quant),
    }


def _quant_summary(quant: dict | None) -> dict | None:
    """The format entry's summary of a quantization_config; an unknown format shows its quant_method."""
    if not quant:
        return None
    from solar_quant import registry

    fmt = registry.format_of_config(quant)
    if fmt is None or fmt.inspect is None:
        return {"method": quant.get("quant_method")}
    return fmt.inspect(quant)


def format_inspect(info: dict) -> str:
    gib = 1024**3
    q = info["quantized"]
    rope = info["rope"]
    rope_text = f"{rope['rope_type']} (theta {rope['rope_theta']:g}" + (f", factor {rope['factor']:g})" if "factor" in rope else ")")
    lines = [
        f"path                {info['path']}",
        f"architecture        {info['architecture']} ({info['model_type']})",
        f"parameters          {info['parameters']:,} ({info['parameters'] / 1e9:.3f} B)",
        f"tensor dtypes       " + ", ".join(f"{k} {v:,}" for k, v in info["tensor_dtypes"].items()),
        f"layers              {info['layers']}",
        f"hidden / interm.    {info['hidden_size']} / {info['intermediate_size']}",
        f"heads / kv heads    {info['attention_heads']} / {info['kv_heads']}" + (" (GQA)" if info["gqa"] else "") + f", head_dim {info['head_dim']}",
        f"vocab               {info['vocab_size']}",
        f"max positions       {info['max_position_embeddings']}",
        f"rope                {rope_text}; dynamic scaling {'on' if info['dynamic_rope_scaling'] else 'off'}",
        f"tied embeddings     {info['tie_word_embeddings']}",
        f"shards              {len(info['shards'])} files, {info['file_bytes']:,} bytes ({info['file_bytes'] / gib:.2f} GiB)",
        f"quantized           " + ("no (16-bit source)" if not q else ", ".join(f"{k}={v}" for k, v in q.items())),
    ]
    return "\n".join(lines)
