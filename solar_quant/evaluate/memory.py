"""Estimate the memory one forward pass at a given context needs, before any model is loaded."""

from __future__ import annotations

import torch

from solar_quant import memory
from solar_quant.architecture import LlamaShape
from solar_quant.checkpoint.reader import CheckpointReader
from solar_quant.errors import OptionError

LOGIT_CHUNK = memory.LOGIT_CHUNK  # positions per lm_head chunk: logits never exist for a whole long window


def weights_bytes(reader: CheckpointReader, dtype: torch.dtype) -> int:
    """16-bit folders grow to the compute dtype in memory; quantized folders stay about their file size."""
    return memory.loaded_weight_bytes(reader.total_bytes, reader.quant_method is not None, torch.finfo(dtype).bits)


def dequantized_cache_bytes(reader: CheckpointReader, dtype: torch.dtype, device: torch.device) -> int:
    """GPTQ on CPU keeps each linear's dequantized weight (`loading.gptq_cpu_dequantize_once`)."""
    if reader.quant_method != "gptq" or device.type != "cpu":
        return 0
    from solar_quant.architecture import LlamaShape

    shape = LlamaShape.from_config(reader.config)
    return sum(o * i for o, i in shape.linear_shapes().values()) * shape.layers * (torch.finfo(dtype).bits // 8)


def activation_bytes(cfg: dict, context: int, dtype: torch.dtype, attention: str = "sdpa") -> int:
    """Peak activations for one sequence: hidden states, MLP, KV, one lm_head chunk and the attention scores."""
    return memory.forward_activation_bytes(_shape(cfg), context, torch.finfo(dtype).bits // 8, attention)


def _shape(cfg: dict) -> LlamaShape:
    """The fields the estimate reads, taken as config.json gives them (the loader checks them)."""
    hidden, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    return LlamaShape(hidden=hidden, layers=cfg["num_hidden_layers"], heads=heads,
                      kv_heads=cfg.get("num_key_value_heads", heads), head_dim=cfg.get("head_dim", hidden // heads),
                      intermediate=cfg["intermediate_size"], vocab=cfg["vocab_size"],
                      max_positions=cfg.get("max_position_embeddings", 0),
                      tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)))


def available_bytes(device: torch.device, device_map=None) -> int:
    if device.type == "cuda" or (device_map is not None and torch.cuda.is_available()):
        return sum(torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count()))
    import psutil

    return psutil.virtual_memory().available


def check_fits(path: str, context: int, dtype: torch.dtype, device: torch.device, device_map=None,
               flag: str = "--context") -> dict:
    """Raise OptionError when weights + activations at `context` exceed the free memory."""
    reader = CheckpointReader(path)
    need_w = weights_bytes(reader, dtype) + dequantized_cache_bytes(reader, dtype, device)
    need_a = activation_bytes(reader.config, context, dtype)
    have = available_bytes(device, device_map)
    gib = 1024**3
    if need_w + need_a > 0.9 * have:
        raise OptionError(f"{flag} {context}: {path} needs about {(need_w + need_a) / gib:.1f} GiB "
                          f"(weights {need_w / gib:.1f} + activations {need_a / gib:.1f}) but only "
                          f"{have / gib:.1f} GiB is free on {device.type}; use a smaller {flag} or more memory")
    return {"weights_bytes": need_w, "activation_bytes": need_a, "available_bytes": have}
