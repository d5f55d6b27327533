"""Activation-aware equalization (methods/awq.py, pipeline/equalize.py): the folds leave a GQA
decoder layer's function unchanged, the search agrees with a brute-force oracle that quantizes
and runs the linears on explicit activations, and it helps on outlier channels."""

from __future__ import annotations

import pytest
import torch

from solar_quant.methods.awq import (PAIRS, channel_scales, check_scales, expand_kv_scales, kv_mean_abs,
                                     search_scales)
from solar_quant.methods.grid import QuantSpec
from solar_quant.methods.rtn import rtn_quantize
from solar_quant.errors import NumericsError


def _gqa_layer(seed: int = 0):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=8, num_hidden_layers=1, max_position_embeddings=64, vocab_size=64)
    config._attn_implementation = "sdpa"
    layer = LlamaDecoderLayer(config, 0).eval().requires_grad_(False)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn_like(p) * (0.2 if p.dim() == 2 else 1.0) + (1.0 if p.dim() == 1 else 0.0))
    return config, layer


def _runner(config):
    from solar_quant.pipeline.layers import LayerRunner

    return LayerRunner(config, torch.device("cpu"), torch.float32, chunk=2)


def test_folds_keep_the_gqa_layer_output():
    from solar_quant.pipeline.equalize import fold_layer, gqa_shape

    config, layer = _gqa_layer()
    runner = _runner(config)
    hidden = torch.randn(3, 16, 32)
    before = runner.forward(layer, hidden)
    kv_groups, head_dim = gqa_shape(layer)
    assert (kv_groups, head_dim) == (2, 8)
    g = torch.Generator().manual_seed(1)
    for pair in PAIRS:
        n = layer.get_submodule(pair.prev).weight.shape[0]
        fold_layer(layer, pair, torch.exp(torch.randn(n, generator=g)))  # scales spanning ~e^±3
    after = runner.forward(layer, hidden)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


def test_a_per_query_head_v_scale_would_not_fold():
    """The control: o's columns scaled per query head (not repeated over the KV group) change the output."""
    config, layer = _gqa_layer()
    runner = _runner(config)
    hidden = torch.randn(2, 16, 32)
    before = runner.forward(layer, hidden)
    s_o = torch.exp(torch.randn(32))  # one scale per o column, different across heads of a group
    with torch.no_grad():
        layer.self_attn.o_proj.weight.mul_(s_o)
        layer.self_attn.v_proj.weight.div_(kv_mean_abs(s_o, 2, 8)[:, None])
    assert (runner.forward(layer, hidden) - before).abs().max() > 1e-2


def test_kv_statistics_and_expansion_follow_repeat_kv():
    from transformers.models.llama.modeling_llama import repeat_kv

    s = torch.arange(2 * 8, dtype=torch.float32)  # 2 KV heads x head_dim 8
    per_head = repeat_kv(s.reshape(1, 2, 1, 8), 3).reshape(-1)  # query heads in transformers' order
    assert torch.equal(expand_kv_scales(s, 3, 8), per_head)
    assert torch.equal(kv_mean_abs(per_head, 3, 8), s)


def _brute_force(Ws, X, mean_abs, spec, grid):
    """Quantize W·diag(s), run on X / s, compare with W X: the error per α, explicitly."""
    errors = []
    for i in range(grid):
        s = channel_scales(mean_abs, i / (grid - 1))
        errors.append(sum(float(((X / s) @ rtn_quantize(W * s, spec).dequant.t() - X @ W.t()).pow(2).sum())
                          for W in Ws))
    return errors


@pytest.mark.parametrize("bits,group", [(3, 16), (4, -1)])
def test_search_matches_a_brute_force_oracle(bits, group):
    g = torch.Generator().manual_seed(2)
    X = torch.randn(256, 32, generator=g) * torch.exp(torch.randn(32, generator=g))
    Ws = [torch.randn(24, 32, generator=g) * 0.1, torch.randn(8, 32, generator=g) * 0.1]
    spec = QuantSpec(bits, group, True)
    mean_abs = X.abs().mean(dim=0)
    choice = search_scales(Ws, X.t() @ X, mean_abs, spec, grid=11)
    errors = _brute_force(Ws, X, mean_abs, spec, 11)
    best = min(range(11), key=errors.__getitem__)
    assert choice.alpha == pytest.approx(best / 10)
    assert choice.error == pytest.approx(errors[best], rel=1e-3)
    assert choice.error_plain == pytest.approx(errors[0], rel=1e-3)


def test_outlier_channels_make_a_positive_alpha_win():
    g = torch.Generator().manual_seed(3)
    X = torch.randn(512, 64, generator=g)
    X[:, :4] *= 40.0  # a few outlier channels carry most of the output
    W = torch.randn(48, 64, generator=g) * 0.1
    choice = search_scales([W], X.t() @ X, X.abs().mean(dim=0), QuantSpec(3, 32, True))
    assert choice.alpha > 0
    assert choice.error < 0.8 * choice.error_plain


def test_bad_scales_name_the_channel():
    with pytest.raises(NumericsError, match="channel 2"):
        check_scales(torch.tensor([1.0, 0.5, float("nan"), 1.0]), "model.layers.3.input_layernorm")
    with pytest.raises(NumericsError, match="channel 0"):
        check_scales(torch.tensor([0.0, 1.0]), "x")


def test_equalize_layer_keeps_the_output_and_lowers_the_search_error():
    from solar_quant.pipeline.equalize import equalize_layer, folded_source_tensor, gqa_shape
    from solar_quant.pipeline.layer_quant import LayerQuantConfig

    config, layer = _gqa_layer(seed=4)
    source = {k: v.clone() for k, v in layer.state_dict().items()}
    runner = _runner(config)
    hidden = torch.randn(4, 16, 32)
    hidden[..., :2] *= 20
    before = runner.forward(layer, hidden)
    record, scales = equalize_layer(layer, runner, hidden, LayerQuantConfig(bits=3, group_size=16), log=print)
    torch.testing.assert_close(runner.forward(layer, hidden), before, rtol=1e-4, atol=1e-4)
    assert set(record) == {p.name for p in PAIRS}
    assert all(r["error"] <= r["error_plain"] for r in record.values())
    kv_groups, head_dim = gqa_shape(layer)
    for name, tensor in layer.state_dict().items():  # the recorded transform recomputes every tensor exactly
        assert torch.equal(folded_source_tensor(name, name, source[name], scales, kv_groups, head_dim), tensor), name
