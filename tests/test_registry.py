"""A method is one file: the toy method below ("rtn-fixed": round-to-nearest with one fixed
scale, written as GPTQ v1) is registered from this file alone and then shows up everywhere a
built-in method does: `quantize --method` and its help, recipe validation, `run` and its
`--dry-run`, `plan --variants`, `verify` and the model card. docs/adding-a-method.md walks
through the same code.

Also: every built-in method's Variant (what plan counts) equals the Variant its format reads
back from the config the method writes (what verify checks) — one description, two views.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Literal

import pytest
from pydantic import Field

from solar_quant import registry
from solar_quant.options import GptqOptions

HERE = Path(__file__).resolve().parent
TOY = "rtn-fixed"


# -- the toy method: everything it needs is in this block ---------------------------------------
class RtnFixedOptions(GptqOptions):
    """GPTQ's grid fields (bits, group_size, ...) plus one scale shared by every weight."""

    method: Literal["rtn-fixed"] = "rtn-fixed"
    scale: float = Field(0.01, gt=0)


def fixed_scale_quantize(W, bits: int, group_size: int, scale: float):
    """The math: codes = clamp(round(W / scale) + zero), symmetric zero 2^(bits-1), one scale for all."""
    import torch

    from solar_quant.methods.gptq import assemble

    rows, columns = W.shape
    G = columns if group_size == -1 else group_size
    groups = -(-columns // G)
    zero = 1 << (bits - 1)
    codes = torch.clamp(torch.round(W / scale) + zero, 0, (1 << bits) - 1)
    scales = torch.full((groups, rows), scale)
    zeros = torch.full((groups, rows), zero, dtype=torch.int32)
    g_idx = torch.arange(columns, dtype=torch.int32) // G
    return assemble(codes, scales, zeros, g_idx)


def build_rtn_fixed(src, out, options: RtnFixedOptions, calib, output, *, device="cpu", resume=False, log=None):
    """The plumbing: stream SRC tensor by tensor into a GPTQ v1 folder OUT (staged, then renamed)."""
    import torch

    from solar_quant.architecture import is_linear_weight
    from solar_quant.checkpoint.reader import CheckpointReader
    from solar_quant.checkpoint.writer import ShardedWriter, StagedFolder
    from solar_quant.formats.gptq_v1 import pack, quantization_config
    from solar_quant.rope import RopeScaling
    from solar_quant.variant import copy_side_files, tool_record, variant_config

    reader = CheckpointReader(src)
    reader.require_llama()
    reader.require_unquantized()
    rope = RopeScaling.parse(output.rope_scaling)
    staged = StagedFolder(out, overwrite=output.overwrite)
    try:
        writer = ShardedWriter(staged.staging, output.shard_size)
        layers: dict[int, dict] = {}
        for name in sorted(reader.tensors):
            tensor = reader.get(name)
            if not is_linear_weight(name):
                writer.add(name, tensor.to(torch.float16))
                continue
            W = tensor.to(torch.float32)
            q = fixed_scale_quantize(W, options.bits, options.group_size, options.scale)
            module = name.removesuffix(".weight")
            for key, t in pack(q, options.bits).items():
                writer.add(f"{module}.{key}", t)
            _, _, layer, local = module.split(".", 3)  # model.layers.<i>.<self_attn.q_proj>
            error = float(f"{float((W - q.dequant).norm() / W.norm()):.6g}")
            layers.setdefault(int(layer), {})[local] = {"rel_weight_error": error}
        writer.close()
        qcfg = quantization_config(options)
        staged.write_json("config.json", variant_config(reader.config, qcfg, rope))
        staged.write_json("quantize_config.json", qcfg)
        copy_side_files(reader, staged)
        records = [{"layer": i, "linears": layers[i]} for i in sorted(layers)]
        staged.write_json("solar_quant.json", tool_record(reader, options.method, options.model_dump(), layers=records))
        return staged.commit()
    except BaseException:
        staged.abandon()
        raise


def rtn_fixed_plan_name(t: str, text: str, flag: str):
    """`plan --variants rtn-fixed`: the default options' GPTQ v1 layout, under the method's name."""
    from solar_quant.methods.entries.gptq import variant

    return registry.Variant(**{**vars(variant(RtnFixedOptions())), "label": TOY}) if t == TOY else None


def register_toy() -> None:
    """The registration: also usable as a plugin hook, SOLAR_QUANT_PLUGINS=test_registry:register_toy."""
    from solar_quant.methods.entries import gptq

    registry.register_method(registry.MethodEntry(
        name=TOY, options=RtnFixedOptions, format="gptq", summary="toy: round-to-nearest with one fixed scale",
        build=build_rtn_fixed, variant=gptq.variant,
        describe=lambda o: f"A fixed-scale RTN {o['bits']}-bit variant (scale {o['scale']})",
        cli_options=lambda flags: {"method": TOY, "bits": flags["bits"], "group_size": flags["group_size"]},
        host_memory=lambda shape, nsamples, seqlen: 12_345_000_000,
        time_range=lambda shape, nsamples, seqlen, device, source_bytes: (300 * 60.0, 420 * 60.0),
        needs_calibration=False, streams="tensor", parse_variant=rtn_fixed_plan_name, variant_forms=TOY),
        replace=True)
# -- end of the toy method ------------------------------------------------------------------------


@pytest.fixture
def toy():
    register_toy()
    yield registry.method(TOY)
    registry.unregister_method(TOY)


def invoke(*args):
    from typer.testing import CliRunner

    from solar_quant.cli.app import app

    return CliRunner().invoke(app, [str(a) for a in args])


RECIPE = """
name = "toy"
[model]
name = "tiny"
path = "{model}"
[[variants]]
name = "fixed"
[variants.quantize]
method = "rtn-fixed"
group_size = 32
scale = 0.02
"""


def test_toy_method_appears_in_quantize_help(toy):
    result = invoke("quantize", "--help")
    assert result.exit_code == 0, result.output
    assert TOY in result.output and "gptq" in result.output


def test_toy_method_is_unknown_without_registration():
    assert TOY not in registry.method_names()
    result = invoke("quantize", "x", "y", "--method", TOY)
    assert result.exit_code != 0 and "--method" in result.output


def test_toy_method_quantizes_and_verifies_through_the_cli(toy, tiny_llama, tmp_path):
    out = tmp_path / "fixed"
    result = invoke("quantize", tiny_llama, out, "--method", TOY, "--group-size", "32")
    assert result.exit_code == 0, result.output
    record = json.loads((out / "solar_quant.json").read_text())
    assert record["method"] == TOY and record["options"]["group_size"] == 32
    checked = invoke("verify", out, "--source", tiny_llama)
    assert checked.exit_code == 0, checked.output
    assert f"OK {out}" in checked.output


def test_verify_catches_a_corrupted_toy_variant(toy, tiny_llama, tmp_path):
    from safetensors.torch import load_file, save_file

    out = toy.build(tiny_llama, tmp_path / "fixed", RtnFixedOptions(group_size=32), None, _output())
    shard = sorted(out.glob("*.safetensors"))[0]
    tensors = load_file(shard)
    name = next(n for n in tensors if n.endswith(".scales"))
    tensors[name] = -tensors[name]
    save_file(tensors, shard, metadata={"format": "pt"})
    from solar_quant.verify import verify_variant

    findings = verify_variant(out, log=lambda m: None)
    assert any(name in f for f in findings), findings


def test_recipe_validation_knows_the_toy_method(toy, tiny_llama, tmp_path):
    from solar_quant.errors import InputError
    from solar_quant.recipe import load_recipe

    path = tmp_path / "r.toml"
    path.write_text(RECIPE.format(model=tiny_llama))
    q = load_recipe(path).variants[0].quantize
    assert isinstance(q, RtnFixedOptions) and q.scale == 0.02 and q.group_size == 32
    path.write_text(RECIPE.format(model=tiny_llama).replace("scale = 0.02", "scal = 0.02"))
    with pytest.raises(InputError, match=r"unknown key 'variants\.0\.quantize\.scal'"):
        load_recipe(path)
    path.write_text(RECIPE.format(model=tiny_llama).replace("scale = 0.02", "scale = -1"))
    with pytest.raises(InputError, match=r"variants\.0\.quantize\.scale"):
        load_recipe(path)
    path.write_text(RECIPE.format(model=tiny_llama).replace('"rtn-fixed"', '"quip-sharp"'))
    with pytest.raises(InputError, match=f"method must be one of .*{TOY}"):
        load_recipe(path)


def test_plan_variants_knows_the_toy_method(toy):
    result = invoke("plan", "--preset", "solar-0-70b", "--gpus", "2x80GB", "--variants", f"{TOY},gptq-4b-g128", "--json")
    assert result.exit_code == 0, result.output
    rows = {r["variant"]: r for r in json.loads(result.output)["rows"]}
    assert set(rows) == {TOY, "gptq-4b-g128"}
    assert rows[TOY]["weight_bytes"] == rows["gptq-4b-g128"]["weight_bytes"]  # default options: 4-bit g128 GPTQ v1


def test_dry_run_uses_the_toy_estimates(toy, tiny_llama, tmp_path):
    path = tmp_path / "r.toml"
    path.write_text(RECIPE.format(model=tiny_llama))
    result = invoke("run", path, "--dry-run")
    assert result.exit_code == 0, result.output
    assert "host memory while quantizing ~12.3 GB" in result.output
    assert "~300-420 min" in result.output
    assert "calibration:" not in result.output  # the entry says it needs none


def test_run_writes_a_card_from_the_toy_entry(toy, tiny_llama, tmp_path):
    from solar_quant.pipeline.run import run_recipe

    path = tmp_path / "r.toml"
    path.write_text(RECIPE.format(model=tiny_llama))
    result = run_recipe(str(path), out=str(tmp_path / "run"), log=lambda m: None)
    card = (result.variants["fixed"] / "README.md").read_text()
    assert "A fixed-scale RTN 4-bit variant (scale 0.02)" in card
    assert "one tensor at a time" in card
    assert "optimum gptqmodel" in card and "--quantization gptq" in card  # from the GPTQ v1 format entry
    assert not (tmp_path / "run" / "calibration").exists()


def test_plugin_env_var_registers_the_toy_in_a_fresh_process():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), str(HERE)]),
           registry.PLUGINS_ENV: "test_registry:register_toy", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "solar_quant", "quantize", "--help"], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert TOY in proc.stdout
    bad = subprocess.run([sys.executable, "-m", "solar_quant", "quantize", "--help"], capture_output=True, text=True,
                         env={**env, registry.PLUGINS_ENV: "no_such_plugin_module"}, timeout=300)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert "SOLAR_QUANT_PLUGINS" in bad.stderr and "no_such_plugin_module" in bad.stderr


# -- one description: what a method's options say == what its format reads back ---------------------
@pytest.mark.parametrize("options", [
    {"method": "bnb-int8"}, {"method": "bnb-nf4", "double_quant": True}, {"method": "bnb-fp4"},
    {"method": "bnb-nf4", "skip_modules": ("lm_head", "model.layers.0.mlp")},
    {"method": "gptq", "bits": 3, "group_size": 64, "act_order": True}, {"method": "gptq", "sym": False},
    {"method": "rtn", "bits": 8, "group_size": -1},
])
def test_method_variant_equals_the_variant_its_format_reads_back(options, tmp_path):
    from solar_quant.formats import bnb, gptq_v1

    entry = registry.method(options["method"])
    opts = entry.options(**options)
    fmt = registry.format_entry(entry.format)
    qcfg = {"bitsandbytes": bnb.quantization_config, "gptq": gptq_v1.quantization_config}[fmt.name](opts)
    (tmp_path / "quantize_config.json").write_text(json.dumps(qcfg))
    findings: list[str] = []
    assert registry.format_of_config(qcfg) is fmt
    assert fmt.variant(tmp_path, qcfg, findings) == entry.variant(opts)
    assert findings == []


def test_every_builtin_entry_is_complete():
    for name, entry in registry.methods().items():
        assert entry.options.model_fields["method"].annotation is not None
        assert entry.format in registry.formats(), name
        assert entry.variant(entry.options(method=name)).kind in registry.format_entry(entry.format).kinds
    kinds = [k for f in registry.formats().values() for k in f.kinds]
    assert len(kinds) == len(set(kinds))  # each layout kind belongs to one format


def _output():
    from solar_quant.options import OutputOptions

    return OutputOptions()
