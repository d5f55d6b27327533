"""GPTQ v1 layout: bit-exact pack/unpack inverses, the documented bit positions, the config,
and a cross-check against GPTQModel's own readers."""

from __future__ import annotations

import json
import math

import pytest
import torch

from solar_quant import __version__
from solar_quant.formats import gptq_v1
from solar_quant.methods.gptq import QuantizedWeight, accumulate_hessian, assemble, gptq_quantize
from solar_quant.methods.grid import QuantSpec
from solar_quant.options import GptqOptions


def random_quantized(bits: int, N: int, K: int, G: int, *, act_order: bool, seed: int = 0) -> QuantizedWeight:
    """Arbitrary codes, zeros (0 and maxq included), float16 scales and a shuffled grouping."""
    g = torch.Generator().manual_seed(seed)
    maxq = 2**bits - 1
    n_groups = math.ceil(K / G)
    codes = torch.randint(0, maxq + 1, (N, K), generator=g)
    zeros = torch.randint(0, maxq + 1, (n_groups, N), generator=g, dtype=torch.int32)
    zeros[0, :2] = torch.tensor([0, maxq])
    scales = (torch.rand(n_groups, N, generator=g) * 0.01 + 1e-4).half().float()
    g_idx = torch.arange(K, dtype=torch.int32) // G
    if act_order:
        g_idx = g_idx[torch.randperm(K, generator=g)]
    return assemble(codes, scales, zeros, g_idx)


def codes_layer(bits, K=200, **kw):
    X = torch.randn(512, K, generator=torch.Generator().manual_seed(1))
    H = accumulate_hessian(None, 0, X)[0]
    W = torch.randn(96, K, generator=torch.Generator().manual_seed(2)) * 0.02
    W[0] = W[0].abs()  # an all-positive row: asymmetric zero point at its lowest
    return gptq_quantize(W, H, QuantSpec(bits, kw.pop("group_size", 64), kw.pop("sym", False)), **kw)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("N,K,G", [(96, 200, 64), (64, 256, 128), (72, 100, 32), (32, 96, 96)])
@pytest.mark.parametrize("act_order", [False, True])
def test_pack_unpack_round_trip_is_bit_exact(bits, N, K, G, act_order):
    q = random_quantized(bits, N, K, G, act_order=act_order)
    packed = gptq_v1.pack(q, bits)
    intweight, zeros, scales, g_idx = gptq_v1.unpack(packed, bits)
    assert torch.equal(intweight, q.intweight)
    assert torch.equal(zeros, q.zeros)
    assert torch.equal(scales, q.scales.half())
    assert torch.equal(g_idx, q.g_idx)
    assert torch.equal(gptq_v1.dequantize(packed, bits), q.dequant)
    n_groups = math.ceil(K / G)
    assert packed["qweight"].shape == (math.ceil(K * bits / 32), N) and packed["qweight"].dtype == torch.int32
    assert packed["qzeros"].shape == (n_groups, math.ceil(N * bits / 32)) and packed["qzeros"].dtype == torch.int32
    assert packed["scales"].shape == (n_groups, N) and packed["scales"].dtype == torch.float16
    assert packed["g_idx"].dtype == torch.int32


def test_four_bit_layout_matches_notes():
    """Row k sits in word k // 8 at bit 4 * (k % 8)."""
    codes = torch.arange(16).repeat(2).reshape(32, 1)  # K=32 codes for one output column
    words = gptq_v1.pack_codes(codes, 4)
    assert words.flatten().tolist() == [0x76543210, 0xFEDCBA98 - 2**32, 0x76543210, 0xFEDCBA98 - 2**32]


def test_three_bit_codes_straddle_words_like_auto_gptq():
    """32 codes -> 3 words: codes 0-9 in word 0, code 10 split 2+1 bits, code 21 split 1+2 bits."""
    for position, expected in [(0, [7, 0, 0]), (9, [7 << 27, 0, 0]), (10, [0b11 << 30, 1, 0]),
                               (11, [0, 7 << 1, 0]), (21, [0, 1 << 31, 0b11]), (22, [0, 0, 7 << 2]),
                               (31, [0, 0, 7 << 29])]:
        codes = torch.zeros(32, 1, dtype=torch.int64)
        codes[position] = 7
        words = [w & 0xFFFFFFFF for w in gptq_v1.pack_codes(codes, 3).flatten().tolist()]
        assert words == expected, position


@pytest.mark.parametrize("bits,word", [(2, 0x55555555), (3, None), (4, 0x77777777), (8, 0x7F7F7F7F)])
def test_symmetric_qzeros_store_zero_minus_one(bits, word):
    q = codes_layer(bits, sym=True)
    qzeros = gptq_v1.pack(q, bits)["qzeros"]
    if bits == 3:  # zero 4 stored as 3 = 0b011, as one bit stream: 0b...011011011
        stream = sum(3 << (3 * i) for i in range(32))
        expected = [(stream >> (32 * w)) & 0xFFFFFFFF for w in range(3)]
        assert [w & 0xFFFFFFFF for w in qzeros[0, :3].tolist()] == expected
    else:
        assert (qzeros == (word if word < 2**31 else word - 2**32)).all()
    if bits == 4:
        assert int(qzeros[0, 0]) == 2004318071


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("actorder,static", [(False, False), (True, False), (True, True)])
def test_file_is_the_truth(bits, actorder, static):
    """What a runtime computes from the packed tensors is exactly what the algorithm measured."""
    q = codes_layer(bits, actorder=actorder, static_groups=static)
    assert torch.equal(gptq_v1.dequantize(gptq_v1.pack(q, bits), bits), q.dequant)


def test_quantization_config():
    opts = GptqOptions(bits=3, group_size=64, act_order=True, sym=False, damp=0.02, mse=2.4)
    config = gptq_v1.quantization_config(opts, damp_used=0.2)
    assert json.loads(json.dumps(config)) == config
    expected = {"bits": 3, "group_size": 64, "desc_act": True, "sym": False, "lm_head": False,
                "quant_method": "gptq", "checkpoint_format": "gptq", "pack_dtype": "int32",
                "damp_percent": 0.02, "true_sequential": True, "static_groups": False}
    assert {k: config[k] for k in expected} == expected
    assert config["meta"]["quantizer"] == [f"solar-quant:{__version__}"]
    assert config["meta"]["damp_used"] == 0.2
    assert config["meta"]["mse"] == 2.4  # where GPTQModel records its clipping search too
    assert "damp_used" not in gptq_v1.quantization_config(opts)["meta"]


def test_pack_rejects_codes_out_of_range():
    q = random_quantized(4, 32, 64, 32, act_order=False)
    q.intweight[0, 0] = 16
    with pytest.raises(ValueError, match="0..15"):
        gptq_v1.pack(q, 4)


@pytest.mark.gptq_runtime
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_gptqmodel_reads_our_tensors(bits, monkeypatch):
    """GPTQModel's runtime module and its safetensors dequantizer decode what we pack."""
    monkeypatch.setenv("GPTQMODEL_CPU_WORKERS", "2")
    pytest.importorskip("gptqmodel", reason="needs the [gptq] extra")
    from gptqmodel.nn_modules.qlinear.torch import TorchLinear
    from gptqmodel.utils.model import convert_gptq_v1_to_v2_format_module
    from gptqmodel.utils.model_dequant import _correct_gptq_v1_qzeros, unpack_cols, unpack_rows

    for group_size, sym, act in ((64, False, True), (128, True, False), (-1, False, False)):
        # K = 224: a multiple of 32 (GPTQModel's 3-bit reader needs whole 3-word blocks) but not of 64 or 128
        q = codes_layer(bits, K=224, group_size=group_size, sym=sym, actorder=act)
        packed = gptq_v1.pack(q, bits)
        N, K = q.intweight.shape

        codes = unpack_rows(packed["qweight"], bits)[:K].t()
        zeros = unpack_cols(_correct_gptq_v1_qzeros(packed["qzeros"], bits), bits)[:, :N]
        assert torch.equal(codes, q.intweight) and torch.equal(zeros, q.zeros)

        module = TorchLinear(bits=bits, group_size=group_size, sym=sym, desc_act=act, in_features=K, out_features=N)
        for name, tensor in packed.items():
            getattr(module, name).copy_(tensor)
        convert_gptq_v1_to_v2_format_module(module, bits, torch.int32)  # what loading a v1 file does
        module.post_init()
        theirs = module.dequantize_weight().t()  # computed in float16
        assert torch.equal(theirs, q.dequant.half()), (group_size, sym, act)
