"""--equalize end to end on a tiny GQA Llama: the folder records the scales, its folded norms
differ from the source, and `verify --source` checks them against the recorded transform."""

from __future__ import annotations

import json

import pytest

from tests.conftest import assert_clean_failure, cli
from tests.test_gptq_pipeline import _build, tiny_calib  # noqa: F401  (fixture)


@pytest.mark.parametrize("method,sequential", [("rtn", True), ("gptq", True), ("gptq", False)])
def test_equalized_variant_records_scales_and_verifies(tiny_llama, tiny_calib, tmp_path, method, sequential):  # noqa: F811
    """RTN and GPTQ without true-sequential groups gather the statistics in a forward of their own,
    true-sequential GPTQ inside its staged pass (with v_proj / up_proj rescaled after their solve):
    each folder verifies against the source through the recorded transform."""
    from solar_quant.verify import verify_variant

    out = _build(tiny_llama, tmp_path / "eq", tiny_calib, method=method, bits=4, group_size=32, equalize=True,
                 true_sequential=sequential)
    record = json.loads((out / "solar_quant.json").read_text())
    assert record["options"]["equalize"] and "equalization" in record
    staged = method == "gptq" and sequential
    assert record["equalization"]["statistics"].startswith("each pair's group inputs" if staged else "the unquantized")
    assert set(record["layers"][0]["equalization"]) == {"attn_in", "attn_out", "mlp_in", "mlp_out"}
    assert (out / "equalization" / "layer-000.safetensors").is_file()
    assert verify_variant(out, tiny_llama, samples=2, log=lambda m: None) == []


def test_equalize_without_calibration_is_refused(tiny_llama, tmp_path):
    from solar_quant.errors import OptionError

    with pytest.raises(OptionError, match="--equalize needs calibration"):
        _build(tiny_llama, tmp_path / "x", None, method="rtn", equalize=True)
    assert not (tmp_path / "x").exists()


def test_awq_method_is_rtn_after_equalization(tiny_llama, tmp_path):
    """`--method awq` writes the very tensors of `--method rtn --equalize`, recorded as awq, with a card that says so."""
    from tests.conftest import tree_digest

    calib = tmp_path / "calib"
    cli("calibrate", "--model", tiny_llama, "--out", calib, "--nsamples", "4", "--seqlen", "32", check=True)
    base = ("quantize", tiny_llama, "--bits", "4", "--group-size", "32", "--calibration", calib)
    cli(*base, tmp_path / "awq", "--method", "awq", check=True)
    cli(*base, tmp_path / "rtn", "--method", "rtn", "--equalize", check=True)
    record = json.loads((tmp_path / "awq" / "solar_quant.json").read_text())
    assert record["method"] == "awq" and record["options"]["solver"] == "rtn" and record["options"]["equalize"]
    tensors = lambda d: {k: v for k, v in tree_digest(d).items() if k.endswith(".safetensors")}  # noqa: E731
    assert tensors(tmp_path / "awq") and tensors(tmp_path / "awq") == tensors(tmp_path / "rtn")
    from solar_quant import registry

    assert registry.method(record["method"]).describe(record["options"]).startswith("An AWQ (activation-aware")


@pytest.mark.parametrize("flags,needles", [
    (("--act-order",), ("--method awq", "--method gptq --equalize")),
    (("--clip", "hessian"), ("--clip hessian", "--method gptq --equalize")),
])
def test_awq_refuses_gptq_only_flags(tiny_llama, tmp_path, flags, needles):
    out = tmp_path / "q"
    proc = cli("quantize", tiny_llama, out, "--method", "awq", "--nsamples", "2", "--seqlen", "16", *flags)
    assert_clean_failure(proc, *needles)
    assert not out.exists()


def _copy_without(src, dst, name, change=None):
    """A copy of `src` whose tensor `name` is dropped (change None) or replaced by change(tensor)."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(src, dst)
    index = dst / "model.safetensors.index.json"
    shards = sorted(dst.glob("*.safetensors"))
    for shard in shards:
        tensors = load_file(str(shard))
        if name in tensors:
            if change is None:
                tensors.pop(name)
            else:
                tensors[name] = change(tensors[name])
            save_file(tensors, str(shard), metadata={"format": "pt"})
    if change is None and index.is_file():
        doc = json.loads(index.read_text())
        doc["weight_map"].pop(name, None)
        index.write_text(json.dumps(doc))
    return dst


@pytest.mark.parametrize("change,needles", [
    (None, ("model.layers.1.post_attention_layernorm.weight", "missing")),
    (lambda t: t.repeat(2), ("model.layers.1.post_attention_layernorm.weight", "shape [128]", "implies [64]")),
])
def test_equalize_refuses_a_missing_or_misshapen_norm(tiny_llama, tmp_path, change, needles):
    """The source check names the norm before any layer is equalized (`equalize.check_norms` is the
    second line of defence, for a norm the generic check lets through)."""
    src = _copy_without(tiny_llama, tmp_path / "src", "model.layers.1.post_attention_layernorm.weight", change)
    out = tmp_path / "q"
    proc = cli("quantize", src, out, "--method", "rtn", "--equalize", "--bits", "4", "--group-size", "32",
               "--nsamples", "2", "--seqlen", "16")
    assert_clean_failure(proc, *needles)
    assert not out.exists() and not list(tmp_path.glob(".q*"))


def test_non_finite_scale_names_layer_and_channel(tiny_llama, tiny_calib, tmp_path, monkeypatch):  # noqa: F811
    """A scale search that returns NaN or 0 stops the run naming the layer, the pair and the channel; nothing under OUT."""
    import torch

    from solar_quant.errors import NumericsError
    from solar_quant.pipeline import equalize

    real = equalize.search_scales

    def broken(*args, **kwargs):
        choice = real(*args, **kwargs)
        s = choice.scales.clone()
        s[5] = float("nan") if s.numel() > 40 else 0.0
        return type(choice)(**{**choice.__dict__, "scales": s})

    monkeypatch.setattr(equalize, "search_scales", broken)
    with pytest.raises(NumericsError, match=r"model\.layers\.0\.input_layernorm -> .*channel 5 is nan"):
        _build(tiny_llama, tmp_path / "q", tiny_calib, method="gptq", bits=4, group_size=32, equalize=True)
    assert not (tmp_path / "q").exists() and not list(tmp_path.glob(".q*"))


def test_staged_equalization_resumes_byte_identical(tiny_llama, tmp_path):
    """GPTQ + --equalize stopped after layer 0 and resumed writes the folder of an uninterrupted run,
    scales included (the resume point carries the quantized layer's outputs; the scales of layer 0
    are already in the staging folder)."""
    from tests.conftest import tree_digest
    from tests.test_gptq_pipeline import QUIET

    calib = tmp_path / "calib"
    cli("calibrate", "--model", tiny_llama, "--out", calib, "--nsamples", "4", "--seqlen", "32", check=True)
    args = ("quantize", tiny_llama, "--method", "gptq", "--bits", "3", "--group-size", "32", "--act-order",
            "--clip", "gptq-loss", "--equalize", "--calibration", calib, "--checkpoint-every", "0")
    cli(*args, tmp_path / "whole", check=True, env=QUIET)
    stopped = cli(*args, tmp_path / "q", env={**QUIET, "SOLAR_QUANT_STOP_AFTER_LAYER": "0:term"})
    assert stopped.returncode != 0 and not (tmp_path / "q").exists()
    cli(*args, tmp_path / "q", "--resume", check=True, env=QUIET)
    assert tree_digest(tmp_path / "q") == tree_digest(tmp_path / "whole")
