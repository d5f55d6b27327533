"""`verify`: good bitsandbytes and GPTQ folders of the tiny model verify clean; each kind of
tampering (a flipped byte, or a shard rewritten with a fresh manifest so only the content
checks can catch it) yields its specific finding."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import assert_clean_failure, cli
from gptq_helpers import random_calibration

QUIET = {"SOLAR_QUANT_QUIET": "1"}


def _verify(path, source=None, samples=2):
    from solar_quant.verify import verify_variant

    return verify_variant(path, source, samples=samples, log=lambda m: None)


@pytest.fixture(scope="module")
def variants(tiny_llama, tmp_path_factory) -> dict[str, Path]:
    from solar_quant.options import BnbOptions, GptqOptions, OutputOptions
    from solar_quant.pipeline.bnb import build_bnb_variant
    from solar_quant.pipeline.gptq import build_gptq_variant

    root = tmp_path_factory.mktemp("variants")
    calib = random_calibration(4, 32, 49152, tiny_llama, seed=1)
    quiet = dict(log=lambda m: None)
    return {
        "gptq": build_gptq_variant(tiny_llama, root / "gptq", GptqOptions(group_size=32), calib, OutputOptions(), **quiet),
        "gptq-asym-act": build_gptq_variant(tiny_llama, root / "gptq-asym-act",
                                            GptqOptions(group_size=32, sym=False, act_order=True, bits=3), calib,
                                            OutputOptions(rope_scaling="dynamic:2"), **quiet),
        "int8": build_bnb_variant(tiny_llama, root / "int8", BnbOptions(method="bnb-int8"), OutputOptions(), **quiet),
        "nf4-dq": build_bnb_variant(tiny_llama, root / "nf4-dq", BnbOptions(method="bnb-nf4", double_quant=True),
                                    OutputOptions(), **quiet),
    }


@pytest.fixture
def copy_of(variants, tmp_path):
    def make(key: str) -> Path:
        return Path(shutil.copytree(variants[key], tmp_path / key))

    return make


def _rewrite(folder: Path, change) -> None:
    """Apply `change` to the tensors of the (single) shard and write a manifest that matches."""
    from safetensors.torch import load_file, save_file

    from solar_quant.checkpoint.manifest import write_manifest

    shard = folder / "model.safetensors"
    tensors = load_file(str(shard))
    change(tensors)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    write_manifest(folder)


def _edit_json(folder: Path, name: str, change) -> None:
    from solar_quant.checkpoint.manifest import write_manifest

    doc = json.loads((folder / name).read_text())
    change(doc)
    (folder / name).write_text(json.dumps(doc, indent=2))
    write_manifest(folder)


def _one(findings: list[str], *needles: str) -> str:
    hits = [f for f in findings if all(n in f for n in needles)]
    assert hits, findings
    return hits[0]


@pytest.mark.parametrize("key", ["gptq", "gptq-asym-act", "int8", "nf4-dq"])
def test_good_variants_verify_clean_with_their_source(variants, tiny_llama, key):
    assert _verify(variants[key], tiny_llama) == []


def test_cli_prints_ok_and_exits_0(variants, tiny_llama):
    proc = cli("verify", variants["gptq"], "--source", tiny_llama, env=QUIET)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1].startswith("OK ")


def test_a_flipped_byte_fails_the_manifest(copy_of):
    folder = copy_of("int8")
    shard = folder / "model.safetensors"
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0x01
    shard.write_bytes(bytes(data))
    findings = _verify(folder)
    _one(findings, "manifest", "model.safetensors", "sha256 differs")
    proc = cli("verify", folder, env=QUIET)
    assert_clean_failure(proc, "verify found", "sha256 differs")
    assert proc.returncode == 1 and "FAIL manifest:" in proc.stdout


def test_an_unlisted_file_fails_the_manifest(copy_of):
    folder = copy_of("gptq")
    (folder / "extra.bin").write_bytes(b"x")
    _one(_verify(folder), "extra.bin", "not listed")


# -- GPTQ layout invariants, each with a manifest that matches the tampered shard ----------------
Q = "model.layers.1.self_attn.q_proj"


def test_changed_qzeros(copy_of):
    folder = copy_of("gptq")
    _rewrite(folder, lambda t: t[f"{Q}.qzeros"].__setitem__((0, 0), 0x66666666))
    assert _one(_verify(folder), Q, "qzeros", "differ from 7")


def test_wrapped_asymmetric_zero(copy_of):
    folder = copy_of("gptq-asym-act")
    # 3-bit: the first word holds zero points of outputs 0..9 (stored zero - 1); all ones = zero 0 wrapped
    _rewrite(folder, lambda t: t[f"{Q}.qzeros"].__setitem__((0, 0), 0x3FFFFFFF))
    _one(_verify(folder), Q, "qzeros", "zero points are 0")


def test_g_idx_out_of_range(copy_of):
    folder = copy_of("gptq")
    _rewrite(folder, lambda t: t[f"{Q}.g_idx"].__setitem__(3, 2))  # 64 inputs, group 32: groups 0..1
    _one(_verify(folder), Q, "g_idx", "outside 0..1")


def test_g_idx_reordered_without_desc_act(copy_of):
    folder = copy_of("gptq")

    def swap(t):
        g = t[f"{Q}.g_idx"]
        g[0], g[40] = 1, 0
    _rewrite(folder, swap)
    _one(_verify(folder), Q, "g_idx", "differs from k // 32")


def test_g_idx_group_too_large(copy_of):
    folder = copy_of("gptq-asym-act")
    _rewrite(folder, lambda t: t[f"{Q}.g_idx"].fill_(0))
    _one(_verify(folder), Q, "g_idx", "64 columns, more than the group size 32")


@pytest.mark.parametrize("value", [0.0, float("nan"), -0.01])
def test_bad_scales(copy_of, value):
    folder = copy_of("gptq")
    _rewrite(folder, lambda t: t[f"{Q}.scales"].__setitem__((1, 5), value))
    _one(_verify(folder), Q, "scales", "1 of")


def test_missing_tensor(copy_of):
    folder = copy_of("gptq")
    _rewrite(folder, lambda t: t.pop(f"{Q}.g_idx"))
    _one(_verify(folder), f"'{Q}.g_idx' is missing")


def test_wrong_shape_and_an_extra_tensor(copy_of):
    folder = copy_of("gptq")

    def change(t):
        t[f"{Q}.scales"] = t[f"{Q}.scales"][:1].clone()
        t["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(64, 64, dtype=torch.float16)
    _rewrite(folder, change)
    findings = _verify(folder)
    _one(findings, f"'{Q}.scales' is F16 [1, 64], expected F16 [2, 64]")
    _one(findings, "unexpected tensor 'model.layers.0.self_attn.q_proj.weight'")


def test_quantize_config_disagreeing(copy_of):
    folder = copy_of("gptq")
    _edit_json(folder, "quantize_config.json", lambda d: d.update(bits=8))
    _one(_verify(folder), "quantize_config.json", "disagrees", "bits (8 vs 4)")


def test_rope_type_typo(copy_of):
    folder = copy_of("gptq-asym-act")
    _edit_json(folder, "config.json", lambda d: d["rope_parameters"].update(rope_type="dynamc"))
    _one(_verify(folder), "config.json", "rope_parameters", "dynamc", "KeyError")


def test_rope_factor_missing(copy_of):
    folder = copy_of("gptq-asym-act")
    _edit_json(folder, "config.json", lambda d: d["rope_parameters"].pop("factor"))
    _one(_verify(folder), "config.json", "rope_parameters", "factor")


def test_rope_settings_absent(copy_of):
    folder = copy_of("gptq")
    _edit_json(folder, "config.json", lambda d: d.pop("rope_parameters"))
    _one(_verify(folder), "config.json", "no rope settings")


def test_tampered_gptq_weights_need_the_source_to_be_seen(copy_of, tiny_llama):
    """Codes changed consistently (valid layout, fresh manifest): only the recorded error catches it."""
    folder = copy_of("gptq")
    _rewrite(folder, lambda t: t[f"{Q}.qweight"].__setitem__(0, t[f"{Q}.qweight"][0] ^ 0x11111111))
    assert _verify(folder) == []
    _one(_verify(folder, tiny_llama), Q, "recorded at quantization time", "altered")


def test_a_changed_norm_is_seen_with_the_source(copy_of, tiny_llama):
    folder = copy_of("gptq")
    _rewrite(folder, lambda t: t["model.layers.0.input_layernorm.weight"].mul_(2))
    _one(_verify(folder, tiny_llama), "model.layers.0.input_layernorm.weight", "differs from the source's")


def test_another_source_is_named(variants, tmp_path, tiny_llama):
    from solar_quant.models.synthetic import llama_config, write_random_llama

    other = write_random_llama(tmp_path / "other", llama_config(), seed=7, tokenizer_from=tiny_llama)
    _one(_verify(variants["gptq"], other), str(other), "is not the checkpoint")


# -- bitsandbytes ---------------------------------------------------------------------------------
L = "model.layers.0.mlp.down_proj"


def test_negative_scb(copy_of):
    folder = copy_of("int8")
    _rewrite(folder, lambda t: t[f"{L}.SCB"].__setitem__(3, -1.0))
    _one(_verify(folder), L, "SCB", "finite and >= 0")


def test_scb_shape(copy_of):
    folder = copy_of("int8")
    _rewrite(folder, lambda t: t.__setitem__(f"{L}.SCB", t[f"{L}.SCB"][:-1].clone()))
    _one(_verify(folder), f"'{L}.SCB' is F32 [63], expected F32 [64]")


def test_scaled_scb_needs_the_source(copy_of, tiny_llama):
    folder = copy_of("int8")
    _rewrite(folder, lambda t: t[f"{L}.SCB"].mul_(1.5))
    assert _verify(folder) == []
    _one(_verify(folder, tiny_llama), L, "fresh bnb-int8 quantization", "altered")


def test_weight_format(copy_of):
    folder = copy_of("int8")
    _rewrite(folder, lambda t: t[f"{L}.weight_format"].fill_(1))
    _one(_verify(folder), L, "weight_format: 1")


def _quant_state(t, value: bytes):
    t[f"{L}.weight.quant_state.bitsandbytes__nf4"] = torch.tensor(list(value), dtype=torch.uint8)


def test_garbled_quant_state(copy_of):
    folder = copy_of("nf4-dq")
    _rewrite(folder, lambda t: _quant_state(t, b'{"quant_type": "nf4", "blocksize": 6'))
    _one(_verify(folder), L, "quant state is not valid JSON")


def test_quant_state_shape_disagrees(copy_of):
    folder = copy_of("nf4-dq")

    def change(t):
        state = json.loads(bytes(t[f"{L}.weight.quant_state.bitsandbytes__nf4"].tolist()))
        state["shape"] = [160, 64]  # transposed
        _quant_state(t, json.dumps(state).encode())
    _rewrite(folder, change)
    _one(_verify(folder), L, "shape [160, 64], expected [64, 160]")


def test_absmax_nan(copy_of):
    folder = copy_of("nf4-dq")
    _rewrite(folder, lambda t: t[f"{L}.weight.nested_absmax"].fill_(float("nan")))
    _one(_verify(folder), L, "nested_absmax", "finite")


def test_bnb_config_both_modes(copy_of):
    folder = copy_of("int8")
    _edit_json(folder, "config.json", lambda d: d["quantization_config"].update(load_in_4bit=True))
    _one(_verify(folder), "config.json", "exactly one of load_in_8bit / load_in_4bit")


def test_swapped_bnb_weights_need_the_source(copy_of, tiny_llama):
    folder = copy_of("nf4-dq")
    up, gate = "model.layers.1.mlp.up_proj.weight", "model.layers.1.mlp.gate_proj.weight"

    def swap(t):
        t[up], t[gate] = t[gate].clone(), t[up].clone()
    _rewrite(folder, swap)
    assert _verify(folder) == []
    findings = _verify(folder, tiny_llama)
    _one(findings, "model.layers.1.mlp.up_proj", "altered")
    _one(findings, "model.layers.1.mlp.gate_proj", "altered")


def test_sample_layers_spread_first_to_last():
    from solar_quant.verify import sample_layers

    assert sample_layers(80, 2) == [0, 79] and sample_layers(80, 3) == [0, 40, 79]
    assert sample_layers(2, 5) == [0, 1] and sample_layers(5, 1) == [0] and sample_layers(5, 0) == []


def test_verify_of_a_missing_folder_is_a_clean_error(tmp_path):
    assert_clean_failure(cli("verify", tmp_path / "nope", env=QUIET), "nope", "no such folder")
