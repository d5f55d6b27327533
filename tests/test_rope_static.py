"""`--rope-scaling ntk-static:F`: vLLM's one static NTK base, against the closed form and
against transformers' dynamic NTK below, at and above the trained length."""

from __future__ import annotations

import pytest
import torch

from conftest import assert_clean_failure, cli
from solar_quant.errors import OptionError
from solar_quant.rope import RopeScaling, dynamic_ntk_base, static_ntk_base

TRAINED = 64  # the tiny model's max_position_embeddings


def closed_form(base: float, dim: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin of the rope with `base`, computed in float64 from the definition."""
    inv = 1.0 / base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    freqs = torch.outer(torch.arange(length, dtype=torch.float64), inv)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def tables(model, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.zeros(1, length, model.config.hidden_size)
    cos, sin = model.model.rotary_emb(x, torch.arange(length)[None])
    return cos[0].double(), sin[0].double()


@pytest.fixture(scope="module")
def loaded(tiny_llama):
    from solar_quant.evaluate.loading import load_model

    def load(spec: str):
        return load_model(tiny_llama, torch.device("cpu"), torch.float32, None, RopeScaling.parse(spec, allow_static=True))
    return {spec: load(spec) for spec in ("none", "dynamic:2", "ntk-static:2")}



def test_static_base_is_vllms_closed_form():
    # factor 2, head_dim 128: base * 3 ** (128 / 126), about 3.053 x base
    assert static_ntk_base(10000.0, 2.0, 128) == pytest.approx(10000.0 * 3 ** (128 / 126), rel=1e-12)
    assert static_ntk_base(1.0, 2.0, 128) == pytest.approx(3.053, abs=1e-3)
    # transformers' dynamic base reaches the static one exactly at factor x the trained length
    assert dynamic_ntk_base(1e4, 2.0, 128, 2 * 4096, 4096) == pytest.approx(static_ntk_base(1e4, 2.0, 128))
    assert dynamic_ntk_base(1e4, 2.0, 128, 4096, 4096) == 1e4


@pytest.mark.parametrize("length", [8, TRAINED, 2 * TRAINED, 3 * TRAINED])
def test_ntk_static_tables_equal_the_closed_form_at_every_length(loaded, length):
    m = loaded["ntk-static:2"]
    theta = float(m.model.config.rope_parameters["rope_theta"])
    dim = m.model.config.hidden_size // m.model.config.num_attention_heads
    source_theta = float(loaded["none"].model.config.rope_parameters["rope_theta"])
    assert theta == pytest.approx(static_ntk_base(source_theta, 2.0, dim), rel=1e-12)
    cos, sin = tables(m.model, length)
    ref_cos, ref_sin = closed_form(theta, dim, length)
    torch.testing.assert_close(cos, ref_cos, atol=2e-5, rtol=0)
    torch.testing.assert_close(sin, ref_sin, atol=2e-5, rtol=0)
    assert "vLLM" in m.rope["emulates"]


def test_static_differs_from_dynamic_as_the_formulas_say(loaded):
    dim = loaded["none"].model.config.hidden_size // loaded["none"].model.config.num_attention_heads
    theta = float(loaded["none"].model.config.rope_parameters["rope_theta"])
    static, dynamic, plain = (loaded[k].model for k in ("ntk-static:2", "dynamic:2", "none"))
    # inside the trained length transformers' dynamic rope is the plain rope; the static base is not
    for length in (16, TRAINED):
        torch.testing.assert_close(tables(dynamic, length)[0], tables(plain, length)[0])
        assert (tables(static, length)[0] - tables(dynamic, length)[0]).abs().max() > 1e-2
    # past it, dynamic follows base * (2 L / L_trained - 1) ** (d / (d - 2)): equal to the static base at 2x
    for length in (TRAINED + 32, 2 * TRAINED, 4 * TRAINED):
        want = dynamic_ntk_base(theta, 2.0, dim, length, TRAINED)
        torch.testing.assert_close(tables(dynamic, length)[0], closed_form(want, dim, length)[0], atol=2e-5, rtol=0)
        gap = (tables(static, length)[0] - tables(dynamic, length)[0]).abs().max().item()
        if length == 2 * TRAINED:
            assert gap < 2e-5
        else:
            assert gap > 1e-3


def test_ntk_static_is_refused_where_a_config_would_carry_it():
    with pytest.raises(OptionError, match="ntk-static"):
        RopeScaling.parse("ntk-static:2")
    with pytest.raises(OptionError, match="factor"):
        RopeScaling.parse("ntk-static:1", allow_static=True)
    assert str(RopeScaling.parse("ntk-static:2", allow_static=True)) == "ntk-static:2"


def test_quantize_refuses_ntk_static(tiny_llama, tmp_path):
    proc = cli("quantize", tiny_llama, tmp_path / "v", "--method", "bnb-nf4", "--rope-scaling", "ntk-static:2")
    assert_clean_failure(proc, "ntk-static")
    assert not (tmp_path / "v").exists()
