"""bitsandbytes quantizers and layout: chunked calls equal one bitsandbytes call bit for bit,
the config equals transformers' own, the skip rule equals transformers', and the inverse
(dequantize) reproduces the weight within the format's error."""

from __future__ import annotations

import pytest
import torch

from solar_quant.formats import bnb as fmt
from solar_quant.methods import bnb as method
from solar_quant.options import BnbOptions


def _weight(out: int, inp: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(out, inp, generator=g) * 0.05).half()


def _sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    ref, approx = ref.float(), approx.float()
    return float(10 * torch.log10(ref.pow(2).sum() / (ref - approx).pow(2).sum()))


# (out, in): in a multiple of 64, not a multiple of 64, and a total with a partial last block
SHAPES = [(96, 128), (64, 160), (7, 37)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("quant_type,double_quant", [("nf4", False), ("nf4", True), ("fp4", False), ("fp4", True)])
def test_chunked_4bit_equals_one_bitsandbytes_call(shape, quant_type, double_quant):
    import bitsandbytes.functional as F

    w = _weight(*shape)
    packed, state = F.quantize_4bit(w, blocksize=64, compress_statistics=double_quant, quant_type=quant_type)
    expected = {"weight": packed, **{f"weight.{k}": v for k, v in state.as_dict(packed=True).items()}}
    got = method.quantize_4bit(w, quant_type, double_quant, chunk_elements=256)  # many chunks
    assert set(got) == set(expected)
    for k in expected:
        assert got[k].dtype == expected[k].dtype and got[k].shape == expected[k].shape, k
        assert torch.equal(got[k], expected[k]), k


@pytest.mark.parametrize("shape", SHAPES)
def test_chunked_int8_equals_one_bitsandbytes_call(shape):
    import bitsandbytes.functional as F

    w = _weight(*shape, seed=1)
    cb, scb, _ = F.int8_vectorwise_quant(w)
    got = method.quantize_int8(w, chunk_elements=3 * shape[1])  # three rows per call
    assert torch.equal(got["weight"], cb) and torch.equal(got["SCB"], scb)
    assert got["weight_format"].dtype == torch.uint8 and got["weight_format"].item() == 0


@pytest.mark.parametrize("quant_type,double_quant,min_db", [("nf4", False, 18), ("nf4", True, 18), ("fp4", False, 14)])
def test_4bit_dequantize_inverts_the_layout(quant_type, double_quant, min_db):
    import bitsandbytes.functional as F

    w = _weight(128, 256, seed=2)
    parts = method.quantize_4bit(w, quant_type, double_quant)
    back = fmt.dequantize_linear(parts, torch.float32)
    packed, state = F.quantize_4bit(w, blocksize=64, compress_statistics=double_quant, quant_type=quant_type)
    assert torch.equal(back, F.dequantize_4bit(packed, state).float())  # exactly what bitsandbytes computes
    assert back.shape == w.shape and _sqnr_db(w, back) > min_db
    meta = fmt.unpack_quant_state(parts[f"weight.quant_state.bitsandbytes__{quant_type}"])
    assert meta["quant_type"] == quant_type and meta["blocksize"] == 64
    assert meta["dtype"] == "float16" and meta["shape"] == [128, 256]
    assert ("nested_offset" in meta) == double_quant


def test_int8_dequantize_inverts_the_layout():
    w = _weight(64, 96, seed=3)
    back = fmt.dequantize_linear(method.quantize_int8(w))
    row_max = w.float().abs().amax(1, keepdim=True)
    assert (back - w.float()).abs().le(row_max / 127 / 2 + 1e-3).all()  # half a step of each row's grid
    assert _sqnr_db(w, back) > 35


def test_bits_per_weight_match_the_format():
    w = _weight(1024, 1024, seed=4)
    n = w.numel()
    assert fmt.bits_per_weight(method.quantize_int8(w), n) == pytest.approx(8 + 32 / 1024, abs=1e-3)
    nf4 = fmt.bits_per_weight(method.quantize_4bit(w, "nf4", False), n)
    dq = fmt.bits_per_weight(method.quantize_4bit(w, "nf4", True), n)
    assert 4.5 <= nf4 < 4.52 and 4.12 <= dq < 4.14 and dq < nf4


def test_linear_parts_is_the_inverse_of_linear_tensors():
    parts = method.quantize_4bit(_weight(64, 64), "nf4", True)
    named = fmt.linear_tensors("model.layers.3.mlp.up_proj", parts)
    named["model.layers.3.mlp.up_proj_extra.weight"] = torch.zeros(1)  # a neighbour that must not leak in
    named["model.layers.3.mlp.down_proj.weight"] = torch.zeros(1)
    back = fmt.linear_parts("model.layers.3.mlp.up_proj", named)
    assert set(back) == set(parts) and all(back[k] is parts[k] for k in parts)


@pytest.mark.parametrize("opts,tf_kwargs", [
    (dict(method="bnb-int8", compute_dtype="float32"), dict(load_in_8bit=True)),
    (dict(method="bnb-nf4"), dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype="float16")),
    (dict(method="bnb-nf4", double_quant=True, compute_dtype="bfloat16"),
     dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype="bfloat16")),
    (dict(method="bnb-fp4", compute_dtype="float32", skip_modules=("lm_head", "down_proj")),
     dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", llm_int8_skip_modules=["lm_head", "down_proj"])),
])
def test_quantization_config_equals_transformers(opts, tf_kwargs):
    from transformers import BitsAndBytesConfig

    theirs = BitsAndBytesConfig(**tf_kwargs).to_dict()
    ours = fmt.quantization_config(BnbOptions(**opts))
    assert ours == theirs and list(ours) == sorted(theirs)


@pytest.mark.parametrize("module", ["lm_head", "model.layers.1.mlp.down_proj", "model.layers.11.self_attn.q_proj",
                                    "model.layers.1.self_attn.o_proj", "model.layers.2.mlp.gate_proj"])
@pytest.mark.parametrize("skip", [("lm_head",), ("down_proj",), ("model.layers.1",), ("mlp.gate",),
                                  ("model.layers.1.*",), ("lm_head", "self_attn")])
def test_skip_rule_equals_transformers(module, skip):
    from transformers.quantizers.quantizers_utils import should_convert_module

    assert fmt.should_quantize(module, skip) == should_convert_module(module, list(skip))


def test_invalid_skip_pattern_names_the_flag():
    from solar_quant.errors import OptionError

    with pytest.raises(OptionError, match="--skip-modules"):
        fmt.should_quantize("lm_head", ("layers.(",))
