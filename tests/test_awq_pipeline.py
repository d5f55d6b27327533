"""--equalize end to end on a tiny GQA Llama: the folder records the scales, its folded norms
differ from the source, and `verify --source` checks them against the recorded transform."""

from __future__ import annotations

import json

import pytest

from tests.conftest import assert_clean_failure, cli
from tests.test_gptq_pipeline import _build, tiny_calib  # noqa: F401  (fixture)


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_equalized_variant_records_scales_and_verifies(tiny_llama, tiny_calib, tmp_path, method):  # noqa: F811
    from solar_quant.verify import verify_variant

    out = _build(tiny_llama, tmp_path / "eq", tiny_calib, method=method, bits=4, group_size=32, equalize=True)
    record = json.loads((out / "solar_quant.json").read_text())
    assert record["options"]["equalize"] and "equalization" in record
    assert set(record["layers"][0]["equalization"]) == {"attn_in", "attn_out", "mlp_in", "mlp_out"}
    assert (out / "equalization" / "layer-000.safetensors").is_file()
    assert verify_variant(out, tiny_llama, samples=2, log=lambda m: None) == []


def test_equalize_without_calibration_is_refused(tiny_llama, tmp_path):
    from solar_quant.errors import OptionError

    with pytest.raises(OptionError, match="--equalize needs calibration"):
        _build(tiny_llama, tmp_path / "x", None, method="rtn", equalize=True)
    assert not (tmp_path / "x").exists()
