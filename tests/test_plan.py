"""`plan`: weight bytes equal real files (fp16 headers, transformers' bitsandbytes saves, GPTQModel's
buffers), the KV formula equals a real cache, splits cover every layer once within capacity, and
bad input fails in one line."""

from __future__ import annotations

import json
import math

import pytest

from solar_quant.architecture import LlamaShape
from solar_quant.checkpoint.reader import CheckpointReader
from solar_quant.formats.sizes import Variant, bnb_quant_state_json, default_variants, linear_tensor_specs, spec_bytes
from solar_quant.gpus import GIB, parse_gpus
from solar_quant.models.synthetic import SOLAR_70B_CONFIG, write_sparse_llama
from solar_quant.plan import (CUDA_CONTEXT_BYTES, activation_bytes, kv_cache_bytes, layer_split, layer_weight_bytes, plan,
                              scoring_bytes, tensor_specs, weight_bytes)
from tests.conftest import assert_clean_failure, cli

SOLAR = LlamaShape.from_config(SOLAR_70B_CONFIG)


def _header_specs(path) -> dict[str, tuple[str, tuple[int, ...]]]:
    return {n: (t.dtype, t.shape) for n, t in CheckpointReader(path).tensors.items()}


# -- exact bytes ------------------------------------------------------------------------------

def test_fp16_bytes_equal_a_sparse_70b_checkpoint(tmp_path):
    path = write_sparse_llama(tmp_path / "solar", SOLAR_70B_CONFIG)
    assert tensor_specs(SOLAR, Variant.parse("fp16")) == _header_specs(path)
    assert weight_bytes(SOLAR, Variant.parse("fp16")) == CheckpointReader(path).total_bytes == 137_953_296_384
    out = json.loads(cli("plan", path, "--variants", "fp16", "--gpus", "2x80GB", "--json", check=True).stdout)
    assert out["rows"][0]["weight_bytes"] == CheckpointReader(path).total_bytes


@pytest.mark.parametrize("which", ["tiny", "demo"])
def test_fp16_bytes_equal_real_checkpoints(which, tiny_llama, demo_model):
    path = tiny_llama if which == "tiny" else demo_model  # the demo model has tied embeddings
    shape = LlamaShape.from_config(CheckpointReader(path).config)
    assert tensor_specs(shape, Variant.parse("fp16")) == _header_specs(path)
    assert weight_bytes(shape, Variant.parse("fp16")) == CheckpointReader(path).total_bytes


BNB = {"bnb-int8": dict(load_in_8bit=True),
       "bnb-nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
       "bnb-nf4-dq": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True),
       "bnb-fp4": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4")}


@pytest.mark.parametrize("name", list(BNB))
def test_bnb_bytes_equal_transformers_saved_files(name, tiny_llama, tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, quantization_config=BitsAndBytesConfig(**BNB[name]),
                                                 dtype=torch.float16, device_map="cpu")
    model.save_pretrained(tmp_path / name)
    reader = CheckpointReader(tmp_path / name)
    saved = _header_specs(tmp_path / name)
    variant = Variant.parse(name)
    shape = LlamaShape.from_config(reader.config)
    planned = tensor_specs(shape, variant)
    assert set(planned) == set(saved)
    state_names = [n for n in saved if ".quant_state." in n]
    for n in saved:
        if variant.double_quant and n in state_names:
            continue  # its length depends on the data: checked byte for byte below
        assert planned[n] == saved[n], n
    for n in state_names:  # the JSON we write equals bitsandbytes' own, given the data's nested_offset
        raw = bytes(reader.get(n).tolist())
        fields = json.loads(raw)
        out_f, in_f = fields["shape"]
        assert raw == bnb_quant_state_json(fields["quant_type"], out_f, in_f, "float16", variant.double_quant,
                                           fields.get("nested_offset", 0.0))
    planned_total = weight_bytes(shape, variant)
    if variant.double_quant:  # the assumed nested_offset repr is off by a few characters per Linear at most
        assert abs(planned_total - reader.total_bytes) <= 5 * len(state_names)
    else:
        assert planned_total == reader.total_bytes


@pytest.mark.gptq_runtime
def test_gptq_specs_equal_gptqmodel_buffers(monkeypatch):
    """GPTQModel 7.6.0 allocates the v1 tensors it saves; our shapes must equal its buffers."""
    monkeypatch.setenv("GPTQMODEL_CPU_WORKERS", "2")
    import torch
    from gptqmodel.nn_modules.qlinear.torch import TorchLinear

    for bits in (2, 3, 4, 8):
        for group in (32, 64, 128, -1):
            for in_f, out_f in ((576, 1536), (1536, 576), (8192, 1024)):  # 576: groups of 128 end partial
                layer = TorchLinear(bits=bits, group_size=group, sym=True, desc_act=False, in_features=in_f,
                                    out_features=out_f, bias=False, pack_dtype=torch.int32, register_buffers=True)
                real = {k: (str(v.dtype), tuple(v.shape)) for k, v in layer.state_dict().items()}
                ours = linear_tensor_specs(Variant("gptq", bits=bits, group_size=group), out_f, in_f)
                torch_names = {"I32": "torch.int32", "F16": "torch.float16"}
                assert {k: (torch_names[d], s) for k, (d, s) in ours.items()} == real, (bits, group, in_f, out_f)


def test_gptq_specs_follow_the_v1_layout():
    """Sizes built independently from the v1 layout in docs/background.md: packed along K, zeros along N, one row per group."""
    for bits, group, k, n in ((4, 128, 8192, 28672), (3, 64, 28672, 8192), (8, -1, 8192, 1024), (4, 128, 576, 1536)):
        groups = 1 if group == -1 else math.ceil(k / group)
        expected = (math.ceil(k * bits / 32) * n * 4 + groups * math.ceil(n * bits / 32) * 4 + groups * n * 2 + k * 4)
        specs = linear_tensor_specs(Variant("gptq", bits=bits, group_size=group), n, k)
        assert sum(spec_bytes(s) for s in specs.values()) == expected
    # act-order changes g_idx's values only
    assert linear_tensor_specs(Variant.parse("gptq-4b-g128-act"), 64, 128) == linear_tensor_specs(Variant.parse("gptq-4b-g128"), 64, 128)


def test_published_70b_sizes():
    """Published Llama-2-70B checkpoints (docs/background.md): fp16 ~138 GB; GPTQ 4-bit 35.3 GB (no groups),
    36.7 GB (g128 act-order); 3-bit g64 act-order 29.3 GB. Our bytes lack only headers and configs."""
    for name, published in (("fp16", 138.0), ("gptq-4b-gnone", 35.3), ("gptq-4b-g128-act", 36.7), ("gptq-3b-g64-act", 29.3)):
        assert abs(weight_bytes(SOLAR, Variant.parse(name)) / 1e9 / published - 1) < 0.005, name


def test_kv_cache_equals_a_real_dynamic_cache(tiny_llama):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float16).eval()
    shape = LlamaShape.from_config(CheckpointReader(tiny_llama).config)
    for tokens, batch in ((17, 1), (40, 3)):
        with torch.inference_mode():
            out = model(input_ids=torch.randint(0, 1000, (batch, tokens)), use_cache=True)
        real = sum(t.numel() * t.element_size() for layer in out.past_key_values.layers for t in (layer.keys, layer.values))
        assert kv_cache_bytes(shape, tokens, batch) == real


# -- fit and split ----------------------------------------------------------------------------

def test_70b_fp16_needs_two_80gb_gpus_at_10240():
    [one] = plan(SOLAR, parse_gpus("1x80GB"), 10240, 1, [Variant.parse("fp16")])
    [two] = plan(SOLAR, parse_gpus("2x80GB"), 10240, 1, [Variant.parse("fp16")])
    assert not one.fits and one.gpus_needed == 2 and not one.device_map
    assert two.fits and len(two.gpus) == 2
    [nf4] = plan(SOLAR, parse_gpus("2x80GB"), 10240, 1, [Variant.parse("bnb-nf4")])
    assert nf4.fits and len(nf4.gpus) == 1  # the fewest GPUs that hold it


@pytest.mark.parametrize("spec", ["2x80GB", "4x24GB", "3x48GB", "80GB,24GB,24GB", "8x24GB", "2xH100"])
def test_splits_cover_every_layer_once_within_capacity(spec):
    gpus = parse_gpus(spec)
    for row in plan(SOLAR, gpus, 10240, 1, default_variants()):
        if not row.fits:
            continue
        specs = tensor_specs(SOLAR, row.variant)
        per_gpu_weights = [0] * len(row.gpus)
        for name, s in specs.items():  # independent per-GPU sum from the device_map and the tensor list
            module = next(m for m in row.device_map if name.startswith(m + "."))
            per_gpu_weights[row.device_map[module]] += spec_bytes(s)
        assert per_gpu_weights == [g.weight_bytes for g in row.gpus]
        assert sum(per_gpu_weights) == row.weight_bytes
        layers = [int(m.split(".")[2]) for m in row.device_map if m.startswith("model.layers.")]
        assert layers == list(range(SOLAR.layers))  # each exactly once, in order
        devices = [row.device_map[f"model.layers.{i}"] for i in layers]
        assert devices == sorted(devices)  # contiguous ranges
        assert row.device_map["model.embed_tokens"] == 0 and row.device_map["lm_head"] == len(row.gpus) - 1
        for g in row.gpus:
            kv = (g.layers[1] - g.layers[0] if g.layers else 0) * kv_cache_bytes(SOLAR, 10240) // SOLAR.layers
            assert g.kv_bytes == kv and g.overhead_bytes >= CUDA_CONTEXT_BYTES + activation_bytes(SOLAR, 10240, 1)
            assert g.total_bytes <= g.capacity == gpus[g.index].capacity, (spec, row.variant.name, g)


def test_split_is_balanced():
    [row] = plan(SOLAR, parse_gpus("4x24GB"), 4096, 1, [Variant.parse("gptq-4b-g128")])
    counts = [g.layers[1] - g.layers[0] for g in row.gpus]
    assert sum(counts) == 80 and max(counts) - min(counts) <= 3, counts


def test_device_map_loads_in_transformers(tiny_llama, tmp_path):
    """The module names are the model's and cover every parameter (accelerate's own check)."""
    import torch
    from accelerate.utils import check_device_map
    from transformers import AutoModelForCausalLM

    shape = LlamaShape.from_config(CheckpointReader(tiny_llama).config)
    variant = Variant.parse("fp16")
    layer = layer_weight_bytes(shape, variant) + kv_cache_bytes(shape, 64) // shape.layers
    embed = shape.vocab * shape.hidden * 2
    first = CUDA_CONTEXT_BYTES + activation_bytes(shape, 64, 1) + embed
    last = CUDA_CONTEXT_BYTES + max(activation_bytes(shape, 64, 1), scoring_bytes(shape, 64, 1)) + embed + shape.hidden * 2
    caps = [first + layer * 3 // 2, last + layer * 3 // 2]  # room for one layer each, not two
    assert [s.layers for s in layer_split(shape, variant, caps, 64, 1)] == [(0, 1), (1, 2)]
    path = tmp_path / "map.json"
    spec = ",".join(f"{c / 1024**2:.6f}MiB" for c in caps)
    assert cli("plan", tiny_llama, "--gpus", spec, "--context", "64", "--variants", "fp16",
               "--device-map-out", path, check=True).returncode == 0
    dm = json.loads(path.read_text())
    assert [dm[f"model.layers.{i}"] for i in range(2)] == [0, 1] and dm["lm_head"] == 1
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float16, device_map={k: "cpu" for k in dm})
    modules = dict(model.named_modules())
    assert all(k in modules for k in dm)  # every key names a real module
    check_device_map(model, dm)  # and every parameter gets a device
    with pytest.raises(ValueError, match="model.norm"):  # a map missing a module is refused: the check has teeth
        check_device_map(model, {k: v for k, v in dm.items() if k != "model.norm"})


def test_cli_table_and_json():
    out = cli("plan", "--preset", "solar-0-70b", "--gpus", "2x80GB", "--context", "10240", check=True).stdout
    assert "fp16" in out and "0: embed, L0-39 | 1: L40-79, head" in out and "gptq-3b-gnone" in out
    doc = json.loads(cli("plan", "--preset", "solar-0-70b", "--gpus", "2x80GB", "--variants", "fp16,bnb-nf4-dq",
                         "--variants", "gptq-4b-g128", "--json", check=True).stdout)
    assert [r["variant"] for r in doc["rows"]] == ["fp16", "bnb-nf4-dq", "gptq-4b-g128"]
    assert doc["rows"][0]["device_map"]["model.layers.79"] == 1


# -- parsing and bad input --------------------------------------------------------------------

def test_gpu_specs_parse():
    assert [g.capacity for g in parse_gpus("2x80GB")] == [80 * GIB] * 2
    assert [g.capacity for g in parse_gpus("4x24GB")] == [24 * GIB] * 4
    assert [g.capacity for g in parse_gpus("80GB")] == [80 * GIB]
    assert [g.capacity for g in parse_gpus("80GB, 1x24GiB")] == [80 * GIB, 24 * GIB]
    assert [g.capacity for g in parse_gpus("2xH100")] == [81559 * 1024**2] * 2
    assert [g.capacity for g in parse_gpus("A100-40GB")] == [40 * GIB]


def test_variant_names_round_trip():
    for v in default_variants():
        assert Variant.parse(v.name) == v
    assert Variant.parse("gptq-4b-g-1") == Variant.parse("gptq-4b-gnone")


def test_bad_inputs(tmp_path):
    preset = ("plan", "--preset", "solar-0-70b")
    assert_clean_failure(cli(*preset, "--gpus", "2x80XB"), "--gpus", "2x80GB")
    assert_clean_failure(cli(*preset, "--gpus", "0x80GB"), "--gpus")
    assert_clean_failure(cli(*preset, "--gpus", "lots"), "--gpus", "accepted forms")
    assert_clean_failure(cli(*preset, "--context", "0"), "--context")
    assert_clean_failure(cli(*preset, "--context=-5"), "--context")
    assert_clean_failure(cli(*preset, "--batch", "0"), "--batch")
    assert_clean_failure(cli("plan", "--preset", "llama-3-405b"), "--preset", "solar-0-70b")
    assert_clean_failure(cli(*preset, "--variants", "gptq-5b-g128"), "--variants", "bits")
    assert_clean_failure(cli(*preset, "--variants", "awq-4b"), "--variants", "unknown variant")
    assert_clean_failure(cli(*preset, "--logits", "some"), "--logits")
    assert_clean_failure(cli("plan"), "--preset")
    assert_clean_failure(cli("plan", tmp_path / "nope"), "no such file")
    assert_clean_failure(cli("plan", tmp_path), "no config.json")
    target = tmp_path / "missing-folder" / "map.json"
    assert_clean_failure(cli(*preset, "--device-map-out", target), "--device-map-out")
    target = tmp_path / "map.json"
    assert_clean_failure(cli(*preset, "--gpus", "1x8GB", "--device-map-out", target), "no variant fits")
    assert not target.exists() and not list(tmp_path.glob(".*partial"))
