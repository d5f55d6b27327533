"""Measure what `plan`'s runtime-overhead formula stands for, on one CUDA GPU.

A SOLAR-0-70b-shaped LlamaForCausalLM cut to 2 decoder layers (fp16, SDPA attention):
CUDA context (driver + cuBLAS, outside PyTorch's allocator) and the peak memory allocated
above weights + KV cache for a full prefill of T tokens, with full fp16 logits, with a loss
(fp32 upcast), and with only the last position's logits. Prints one JSON line per case.
Usage: python bench/plan_overhead_gpu.py  (needs torch + transformers and a CUDA GPU)
"""
import json

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def main() -> None:
    dev = torch.device("cuda:0")
    torch.ones(1, device=dev)
    a = torch.randn(1024, 1024, device=dev, dtype=torch.float16)
    (a @ a).sum().item()
    free, total = torch.cuda.mem_get_info(dev)
    print(json.dumps({"gpu": torch.cuda.get_device_name(dev), "total_mib": total / 2**20,
                      "used_outside_allocator_mib": (total - free - torch.cuda.memory_reserved(dev)) / 2**20,
                      "torch": torch.__version__}), flush=True)
    del a
    cfg = LlamaConfig(hidden_size=8192, num_hidden_layers=2, num_attention_heads=64, num_key_value_heads=8,
                      intermediate_size=28672, vocab_size=32000, max_position_embeddings=4096,
                      attn_implementation="sdpa", tie_word_embeddings=False)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model = model.to_empty(device=dev).to(torch.float16).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    weights = torch.cuda.memory_allocated(dev)
    for tokens, batch in ((2048, 1), (10240, 1), (4096, 2)):
        for mode in ("all", "loss", "last"):
            ids = torch.randint(0, 32000, (batch, tokens), device=dev)
            torch.cuda.synchronize(); torch.cuda.empty_cache(); torch.cuda.reset_peak_memory_stats(dev)
            base = torch.cuda.memory_allocated(dev)
            with torch.inference_mode():
                kw = {"labels": ids} if mode == "loss" else ({"logits_to_keep": 1} if mode == "last" else {})
                out = model(input_ids=ids, use_cache=True, **kw)
            peak = torch.cuda.max_memory_allocated(dev) - base
            kv = sum(t.numel() * t.element_size() for layer in out.past_key_values.layers for t in (layer.keys, layer.values))
            print(json.dumps({"tokens": tokens, "batch": batch, "logits": mode, "weights_mib": weights / 2**20,
                              "kv_mib": kv / 2**20, "peak_above_weights_mib": peak / 2**20,
                              "peak_above_weights_and_kv_mib": (peak - kv) / 2**20,
                              "reserved_mib": torch.cuda.memory_reserved(dev) / 2**20}), flush=True)
            del out, ids


if __name__ == "__main__":
    main()
