"""`inspect`: headers-only facts equal what loading the model says; bad paths fail cleanly."""

from __future__ import annotations

import json

from tests.conftest import assert_clean_failure, cli


def test_inspect_json_matches_loaded_config(demo_model):
    from transformers import AutoConfig

    proc = cli("inspect", demo_model, "--json", check=True)
    info = json.loads(proc.stdout)
    cfg = AutoConfig.from_pretrained(demo_model)
    assert info["layers"] == cfg.num_hidden_layers == 30
    assert info["hidden_size"] == cfg.hidden_size == 576
    assert (info["attention_heads"], info["kv_heads"]) == (9, 3)
    assert info["vocab_size"] == 49152 and info["tie_word_embeddings"] is True
    assert info["rope"]["rope_theta"] == cfg.rope_parameters["rope_theta"] == 100000.0
    assert info["parameters"] == 134_515_008
    assert info["quantized"] is None and info["tensor_dtypes"] == {"F16": 134_515_008}


def test_inspect_text_output(demo_model):
    out = cli("inspect", demo_model, check=True).stdout
    assert "LlamaForCausalLM" in out and "9 / 3 (GQA)" in out and "dynamic scaling off" in out


def test_inspect_bad_inputs(tmp_path):
    assert_clean_failure(cli("inspect", tmp_path / "nope"), "no such file")
    assert_clean_failure(cli("inspect", tmp_path), "no config.json")
    (tmp_path / "config.json").write_text("{not json")
    assert_clean_failure(cli("inspect", tmp_path), "config.json", "not valid JSON")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    assert_clean_failure(cli("inspect", tmp_path), "Llama-family")
