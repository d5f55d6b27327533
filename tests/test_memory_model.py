"""One memory model: `plan`, `eval`'s fit check, `run --dry-run` and the GPTQ layer placement
take their numbers from `solar_quant.memory`, so the same shape gives the same numbers through
each consumer, and the terms they share (KV cache, layer weights) agree across them."""

from __future__ import annotations

import pytest
import torch

from solar_quant import memory
from solar_quant.architecture import LlamaShape

SOLAR_70B = {"hidden_size": 8192, "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8,
             "intermediate_size": 28672, "vocab_size": 32000, "max_position_embeddings": 4096}
TINY = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "intermediate_size": 160, "vocab_size": 49152, "max_position_embeddings": 64, "tie_word_embeddings": True}


@pytest.fixture(params=[SOLAR_70B, TINY], ids=["solar-70b", "tiny"])
def cfg(request):
    return request.param


def test_plan_uses_the_model(cfg):
    from solar_quant import plan
    from solar_quant.formats.sizes import Variant

    shape = LlamaShape.from_config(cfg)
    for context, batch in ((1, 1), (4096, 1), (10240, 2)):
        assert plan.kv_cache_bytes(shape, context, batch) == memory.kv_cache_bytes(shape, context, batch)
        assert plan.activation_bytes(shape, context, batch) == memory.prefill_activation_bytes(shape, context, batch)
        assert plan.scoring_bytes(shape, context, batch) == memory.scoring_bytes(shape, context, batch)
    assert plan.dequant_workspace_bytes(shape, Variant.parse("gptq-4b-g128")) == memory.dequant_workspace_bytes(shape, True)
    assert plan.dequant_workspace_bytes(shape, Variant.parse("fp16")) == 0
    assert plan.CUDA_CONTEXT_BYTES == memory.CUDA_CONTEXT_BYTES


def test_eval_uses_the_model_and_agrees_with_plan_on_the_kv_cache(cfg):
    from solar_quant.evaluate import memory as eval_memory

    shape = LlamaShape.from_config(cfg)
    for dtype in (torch.float16, torch.float32):
        for context in (128, 4096):
            for attention in ("sdpa", "eager"):
                ours = eval_memory.activation_bytes(cfg, context, dtype, attention)
                assert ours == memory.forward_activation_bytes(shape, context, dtype.itemsize, attention)
    # the layer count enters eval's estimate only through the KV cache: that term is plan's KV cache
    from solar_quant import plan

    for context in (128, 4096):
        kv_term = (eval_memory.activation_bytes(cfg, context, torch.float16)
                   - eval_memory.activation_bytes({**cfg, "num_hidden_layers": 0}, context, torch.float16))
        assert kv_term == plan.kv_cache_bytes(shape, context, 1)


def test_dry_run_uses_the_model(cfg):
    from solar_quant.pipeline.dry_run import host_memory_bytes, time_range_s

    shape = LlamaShape.from_config(cfg)
    for method in ("bnb-nf4", "rtn", "gptq"):
        assert host_memory_bytes(shape, method, 128, 2048) == memory.quantize_host_bytes(shape, method, 128, 2048)
    # GPTQ's host memory is RTN's plus both fp32 activation copies and two Hessians of the widest input
    extra = memory.quantize_host_bytes(shape, "gptq", 128, 2048) - memory.quantize_host_bytes(shape, "rtn", 128, 2048)
    assert extra == (memory.calibration_activation_bytes(128, 2048, shape.hidden, 4)
                     + 2 * max(shape.hidden, shape.intermediate) ** 2 * 4)
    lo, hi = time_range_s(shape, "gptq", 128, 2048, "cpu", shape.parameter_count() * 2)
    assert 0 < lo < hi


def test_layer_placement_uses_the_model_and_agrees_with_the_dry_run_on_layer_weights(cfg):
    from solar_quant.pipeline.gptq import layer_working_bytes

    shape = LlamaShape.from_config(cfg)
    for dtype in (torch.float16, torch.float32):
        assert layer_working_bytes(shape, dtype) == memory.layer_working_bytes(shape, dtype.itemsize)
    # both hold two layers' linears (the one quantized, the next read meanwhile): at fp32 the
    # weights term equals the dry run's RTN layers
    weights_fp32 = memory.layer_working_bytes(shape, 4) - memory.layer_working_bytes(shape, 0)
    largest = max(shape.vocab * shape.hidden, memory.largest_linear_params(shape)) * 2
    assert weights_fp32 == memory.quantize_host_bytes(shape, "rtn", 1, 1) - 2 * largest
    assert weights_fp32 == 2 * 4 * sum(n * k for n, k in shape.linear_shapes().values())


def test_the_dry_run_prints_the_models_numbers(tiny_llama, tmp_path):
    from solar_quant.pipeline.dry_run import dry_run_text

    recipe = tmp_path / "r.toml"
    recipe.write_text(f'name = "m"\n[model]\npath = "{tiny_llama}"\nname = "t"\nlicense = "apache-2.0"\n'
                      '[calibration]\nnsamples = 8\nseqlen = 64\n'
                      '[[variants]]\nname = "g"\n[variants.quantize]\nmethod = "gptq"\ngroup_size = 32\n')
    import json

    shape = LlamaShape.from_config(json.loads((tiny_llama / "config.json").read_text()))
    text = dry_run_text(str(recipe))
    assert f"host memory while quantizing ~{memory.quantize_host_bytes(shape, 'gptq', 8, 64) / 1e9:.1f} GB" in text
