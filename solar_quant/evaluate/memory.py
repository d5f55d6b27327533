"""Estimate the memory one forward pass at a given context needs, before any model is loaded."""

from __future__ import annotations

import torch

from solar_quant.checkpoint.reader import CheckpointReader
from solar_quant.errors import OptionError

LOGIT_CHUNK = 512  # positions per lm_head chunk: logits never exist for a whole long window


def weights_bytes(reader: CheckpointReader, dtype: torch.dtype) -> int:
    """16-bit folders grow to the compute dtype in memory; quantized folders stay about their file size."""
    size = reader.total_bytes
    if reader.quant_method is None:
        return size * torch.finfo(dtype).bits // 16
    return int(size * 1.2)


def dequantized_cache_bytes(reader: CheckpointReader, dtype: torch.dtype, device: torch.device) -> int:
    """GPTQ on CPU keeps each linear's dequantized weight (`loading.gptq_cpu_dequantize_once`)."""
    if reader.quant_method != "gptq" or device.type != "cpu":
        return 0
    from solar_quant.architecture import LlamaShape

    shape = LlamaShape.from_config(reader.config)
    return sum(o * i for o, i in shape.linear_shapes().values()) * shape.layers * (torch.finfo(dtype).bits // 8)


def activation_bytes(cfg: dict, context: int, dtype: torch.dtype, attention: str = "sdpa") -> int:
    """Peak activations for one sequence: hidden states, MLP, KV, one lm_head chunk and the attention scores."""
    b = torch.finfo(dtype).bits // 8
    hidden, inter = cfg["hidden_size"], cfg["intermediate_size"]
    heads = cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads", heads) * cfg.get("head_dim", hidden // heads)
    layers = cfg["num_hidden_layers"]
    per_token = (6 * hidden + 3 * inter) * b + 2 * layers * kv * b  # live activations + the KV cache
    scores = heads * context * context * 4 * 2 if attention == "eager" else heads * context * 1024 * 4
    logits = LOGIT_CHUNK * cfg["vocab_size"] * 4 * 3
    return context * per_token + scores + logits


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
