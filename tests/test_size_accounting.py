"""Every format we write has exactly the tensors and bytes `plan` predicts (bench/size_accounting.py on the tiny model).

The one allowed difference is bitsandbytes double-quant's packed JSON quant state, whose
`nested_offset` float has a data-dependent number of characters (formats/sizes.py).
"""

from __future__ import annotations

import pytest
import torch

from bench.size_accounting import account
from solar_quant.architecture import LlamaShape
from solar_quant.calibration.artifact import CalibrationSet
from solar_quant.checkpoint.reader import CheckpointReader
from solar_quant.options import BnbOptions, GptqOptions, OutputOptions
from solar_quant.plan import Variant

BNB = ("bnb-int8", "bnb-nf4", "bnb-nf4-dq", "bnb-fp4")
GPTQ_LAYOUTS = ("gptq-8b-g128", "gptq-4b-g128", "gptq-3b-g128", "gptq-4b-g32", "gptq-4b-gnone")


def _quiet(*_):
    pass


@pytest.fixture(scope="module")
def shape(tiny_llama) -> LlamaShape:
    return LlamaShape.from_config(CheckpointReader(tiny_llama).config)


def _write_bnb(src, out, variant: Variant):
    from solar_quant.pipeline.bnb import build_bnb_variant

    opts = BnbOptions(method=variant.method, double_quant=variant.double_quant)
    return build_bnb_variant(src, out, opts, OutputOptions(), log=_quiet)


def _write_gptq(src, out, variant: Variant, method: str, calib=None):
    from solar_quant.pipeline.gptq import build_gptq_variant

    opts = GptqOptions(method=method, bits=variant.bits, group_size=variant.group_size, act_order=variant.act_order)
    return build_gptq_variant(src, out, opts, calib, OutputOptions(shard_size=200_000), log=_quiet)


@pytest.mark.parametrize("name", BNB)
def test_bnb_outputs_match_the_plan(name, tiny_llama, shape, tmp_path):
    variant = Variant.parse(name)
    out = _write_bnb(tiny_llama, tmp_path / name, variant)
    r = account(out, variant, shape)
    assert not (r["missing"] or r["extra"] or r["mismatched"]), r
    assert r["exact_except_bnb_json"]
    if variant.double_quant:  # a few characters of the nested_offset repr per Linear, nothing else
        assert abs(r["difference_bytes"]) <= 5 * 7 * shape.layers
        assert r["difference_bytes"] == r["data_dependent_json_bytes"]
    else:
        assert r["exact"] and r["difference_bytes"] == 0
        assert r["bits_per_weight"] == r["planned_bits_per_weight"]


@pytest.mark.parametrize("name", GPTQ_LAYOUTS)
def test_gptq_layouts_match_the_plan(name, tiny_llama, shape, tmp_path):
    variant = Variant.parse(name)
    out = _write_gptq(tiny_llama, tmp_path / name, variant, "rtn")
    r = account(out, variant, shape)
    assert r["exact"], r
    assert r["actual_bytes"] == r["planned_bytes"]
    assert r["bits_per_weight"] == r["planned_bits_per_weight"]


def test_real_gptq_act_order_output_matches_the_plan(tiny_llama, shape, tmp_path):
    """GPTQ proper (calibrated, act-order) writes the same tensors as the RTN layout: only values differ."""
    variant = Variant.parse("gptq-4b-g32-act")
    ids = torch.randint(0, shape.vocab, (4, 32), generator=torch.Generator().manual_seed(0))
    out = _write_gptq(tiny_llama, tmp_path / "gptq", variant, "gptq", CalibrationSet(ids, {}))
    assert account(out, variant, shape)["exact"]


def test_the_accounting_notices_a_wrong_plan(tiny_llama, shape, tmp_path):
    """Checked against another format's plan, the same folder is not exact (the check can fail)."""
    out = _write_gptq(tiny_llama, tmp_path / "g128", Variant.parse("gptq-4b-g128"), "rtn")
    wrong = account(out, Variant.parse("gptq-3b-g128"), shape)
    assert not wrong["exact"] and wrong["mismatched"]
    assert wrong["difference_bytes"] > 0
