"""The native Llama layer (models/llama_layer.py) against transformers' own: bit-identical layer
outputs and rope frequencies on tiny configs of every supported kind and on SmolLM2's layer 0,
the same GPTQ folder bytes either way, the fallback for other rope types, a quantize process
that never imports transformers' modeling code (nor, for a matching tokenizer, its tokenizer
stack), and a refused hidden_act."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from conftest import ROOT, assert_clean_failure, cli, tree_digest
from gptq_helpers import random_calibration

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

QUIET = {"SOLAR_QUANT_QUIET": "1"}
LLAMA3 = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 64}

# name -> (config fields over the tiny base, sequence length)
CASES = {
    "mha": ({"num_key_value_heads": 4}, 24),
    "gqa": ({}, 24),
    "explicit-head-dim": ({"head_dim": 32, "num_attention_heads": 4, "num_key_value_heads": 2}, 24),
    "attention-and-mlp-bias": ({"attention_bias": True, "mlp_bias": True}, 24),
    "linear": ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}}, 24),
    "dynamic-within-trained": ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0},
                                "max_position_embeddings": 16}, 12),
    "dynamic-beyond-trained": ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0},
                                "max_position_embeddings": 16}, 40),
    "llama3": ({"rope_parameters": LLAMA3, "max_position_embeddings": 256}, 24),
    "transformers-4-spelling": ({"rope_parameters": None, "rope_theta": 500000.0,
                                 "rope_scaling": {"type": "linear", "factor": 4.0}}, 24),
    "gqa-head-dim-over-256": ({"hidden_size": 64, "num_attention_heads": 2, "num_key_value_heads": 1,
                               "head_dim": 320}, 8),
    "gqa-head-dim-over-256-one-token": ({"hidden_size": 64, "num_attention_heads": 2, "num_key_value_heads": 1,
                                         "head_dim": 320}, 1),
}


def _tiny_config(**fields) -> dict:
    from solar_quant.models.synthetic import llama_config

    cfg = llama_config(hidden=64, layers=1, heads=4, kv_heads=2, intermediate=96, vocab=128, max_positions=64)
    cfg.update(fields)
    if cfg.get("head_dim") is None or "head_dim" not in fields:
        cfg["head_dim"] = cfg["hidden_size"] // cfg["num_attention_heads"]
    return {k: v for k, v in cfg.items() if v is not None}


def _both_layers(cfg: dict, seed: int = 0):
    """(native runner, native layer, transformers runner, transformers layer) with the same random weights."""
    from solar_quant.pipeline.layers import LayerRunner, is_native, llama_config, transformers_config

    native_cfg, hf_cfg = llama_config(cfg), transformers_config(cfg)
    assert is_native(native_cfg) and not is_native(hf_cfg)
    layers = []
    for config in (native_cfg, hf_cfg):
        from solar_quant.pipeline.layers import _new_layer

        layers.append(_new_layer(config, 0).eval().requires_grad_(False))
    g = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(v.shape, generator=g) * (1.0 if "layernorm" in k else 0.1)
             for k, v in layers[1].state_dict().items()}
    for layer in layers:
        layer.load_state_dict(state, strict=True)
    cpu = torch.device("cpu")
    return LayerRunner(native_cfg, cpu, chunk=2), layers[0], LayerRunner(hf_cfg, cpu, chunk=2), layers[1]


@pytest.mark.parametrize("case", sorted(CASES))
def test_native_layer_output_is_bit_identical_to_transformers(case):
    fields, seqlen = CASES[case]
    cfg = _tiny_config(**fields)
    native_runner, native, hf_runner, hf = _both_layers(cfg)
    hidden = torch.randn(5, seqlen, cfg["hidden_size"], generator=torch.Generator().manual_seed(1))
    ours, theirs = native_runner.forward(native, hidden), hf_runner.forward(hf, hidden)
    assert torch.isfinite(ours).all()
    assert torch.equal(ours, theirs), (ours - theirs).abs().max()
    assert dict(native.named_parameters()).keys() == dict(hf.named_parameters()).keys()
    assert (native.self_attn.num_key_value_groups, native.self_attn.head_dim) == \
        (hf.self_attn.num_key_value_groups, hf.self_attn.head_dim)


def test_native_layer_differs_when_the_rope_does():
    """The comparison above could pass with a rope that is never applied: linear x2 must change the output."""
    cfg = _tiny_config()
    runner, layer, _, _ = _both_layers(cfg)
    scaled_runner, scaled, _, _ = _both_layers(_tiny_config(**CASES["linear"][0]))
    hidden = torch.randn(2, 24, 64, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(runner.forward(layer, hidden), scaled_runner.forward(scaled, hidden))


@pytest.mark.parametrize("case", ["dynamic-beyond-trained", "llama3", "linear", "gqa"])
def test_rope_frequencies_follow_transformers_across_calls(case):
    """cos/sin equal call after call, including a dynamic rope growing and resetting."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from solar_quant.models.llama_layer import RotaryEmbedding
    from solar_quant.pipeline.layers import llama_config, transformers_config

    cfg = _tiny_config(**CASES[case][0])
    ours, theirs = RotaryEmbedding(llama_config(cfg)), LlamaRotaryEmbedding(transformers_config(cfg))
    x = torch.zeros(1, 1)
    for length in (8, 40, 24, 8, 200, 12):
        pos = torch.arange(length)[None]
        for a, b in zip(ours(x, pos), theirs(x, pos)):
            assert torch.equal(a, b), (case, length)
    assert torch.equal(ours.inv_freq, theirs.inv_freq)


def test_smollm2_layer0_is_bit_identical(demo_model):
    from solar_quant.checkpoint.reader import CheckpointReader
    from solar_quant.pipeline.layers import LayerRunner, embed_tokens, llama_config, load_decoder_layer, transformers_config

    reader = CheckpointReader(demo_model)
    ids = torch.randint(0, reader.config["vocab_size"], (3, 64), generator=torch.Generator().manual_seed(0))
    hidden = embed_tokens(reader, ids)
    outs = []
    for config in (llama_config(reader.config), transformers_config(reader.config)):
        runner = LayerRunner(config, torch.device("cpu"), chunk=2)
        outs.append(runner.forward(load_decoder_layer(reader, config, 0, torch.device("cpu")), hidden))
    assert torch.equal(outs[0], outs[1]) and not torch.equal(outs[0], hidden)


def test_other_rope_types_fall_back_to_transformers():
    from solar_quant.pipeline.layers import is_native, llama_config

    yarn = {"rope_type": "yarn", "factor": 2.0, "rope_theta": 10000.0, "original_max_position_embeddings": 64}
    assert not is_native(llama_config(_tiny_config(rope_parameters=yarn)))
    partial = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
    assert not is_native(llama_config(_tiny_config(rope_parameters=partial)))
    assert is_native(llama_config(_tiny_config()))


@pytest.mark.parametrize("opts", [dict(method="gptq", bits=4, group_size=32, act_order=True),
                                  dict(method="rtn", bits=3, group_size=32, equalize=True)], ids=["gptq", "rtn-equalize"])
def test_folder_bytes_are_those_of_the_transformers_layer(tiny_llama, tmp_path, monkeypatch, opts):
    from solar_quant.options import GptqOptions, OutputOptions
    from solar_quant.pipeline import layers
    from solar_quant.pipeline.gptq import build_gptq_variant

    calib = random_calibration(6, 32, 49152, tiny_llama, seed=1)
    opts = GptqOptions(**opts)
    native = build_gptq_variant(tiny_llama, tmp_path / "native", opts, calib, OutputOptions(), log=lambda m: None)
    monkeypatch.setattr(layers, "llama_config", lambda cfg, *a, **k: layers.transformers_config(cfg))
    theirs = build_gptq_variant(tiny_llama, tmp_path / "hf", opts, calib, OutputOptions(), log=lambda m: None)
    assert tree_digest(native) == tree_digest(theirs)


def test_cli_gptq_quantize_never_imports_transformers_modeling(tiny_llama, tmp_path):
    """A CPU GPTQ quantize through the CLI, in one process whose sys.modules is written at exit."""
    random_calibration(6, 32, 49152, tiny_llama, seed=1).save(tmp_path / "calib")
    seen = tmp_path / "modules.txt"
    script = textwrap.dedent(f"""
        import atexit, runpy, sys
        atexit.register(lambda: open({str(seen)!r}, "w").write("\\n".join(sorted(sys.modules))))
        sys.argv = ["solar-quant", "quantize", {str(tiny_llama)!r}, {str(tmp_path / "q")!r}, "--method", "gptq",
                    "--bits", "4", "--group-size", "32", "--calibration", {str(tmp_path / "calib")!r}]
        runpy.run_module("solar_quant", run_name="__main__")
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env={**__import__("os").environ, "PYTHONPATH": str(ROOT), **QUIET})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "q" / "model.safetensors").is_file()
    modules = set(seen.read_text().split())
    assert "solar_quant.models.llama_layer" in modules and "torch" in modules  # the hook saw the run
    # neither the layers' modeling code nor, for a matching tokenizer, transformers' tokenizer stack
    heavy = sorted(m for m in modules if m.startswith(("transformers.models", "torchao", "transformers.modeling_utils",
                                                         "transformers.masking_utils", "transformers.tokenization_utils_base",
                                                         "transformers.integrations.sdpa_attention")))
    assert heavy == [], heavy


def test_unsupported_hidden_act_is_refused_in_one_line(tiny_llama, tmp_path):
    import shutil

    src = tmp_path / "gelu"
    shutil.copytree(tiny_llama, src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["hidden_act"] = "gelu"
    (src / "config.json").write_text(json.dumps(cfg))
    manifest = src / "manifest.json"
    if manifest.exists():
        manifest.unlink()  # the edited config would otherwise fail the source's integrity check first
    proc = cli("quantize", src, tmp_path / "q", "--method", "rtn", "--bits", "4", "--group-size", "32", env=QUIET)
    assert_clean_failure(proc, "config.json", "hidden_act", "gelu")
    assert not (tmp_path / "q").exists()

