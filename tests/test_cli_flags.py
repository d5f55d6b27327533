"""Flags that mean what they say: --device validated and used or refused, one spelling of the output
folder flag, --version / -h, eval's quantized-baseline refusal, report path and --json, verify
--json, and misspelt recipe keys named with the likely intended one."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import assert_clean_failure, cli


@pytest.fixture(scope="module")
def tiny_nf4(tiny_llama, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("flags") / "tiny-nf4"
    proc = cli("quantize", tiny_llama, "--out", out, "--method", "bnb-nf4", check=True)  # --out: the same as OUT
    assert proc.stdout.strip() == str(out)
    return out


def test_version_and_short_help():
    from solar_quant import __version__

    proc = cli("--version", check=True)
    assert proc.stdout.strip() == f"solar-quant {__version__}"
    for args in (("-h",), ("quantize", "-h"), ("generate", "-h"), ("chat", "-h")):
        proc = cli(*args, check=True)
        assert "Usage" in proc.stdout, args


@pytest.mark.parametrize("device", ["cuda:7", "banana"])
def test_bnb_quantize_refuses_a_device_it_cannot_use(tiny_llama, tmp_path, device):
    if device == "cuda:7" and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    out = tmp_path / "out"
    assert_clean_failure(cli("quantize", tiny_llama, out, "--method", "bnb-nf4", "--device", device),
                         f"--device {device}" if device.startswith("cuda") else "--device 'banana'")
    assert not out.exists() and not (tmp_path / ".out.partial").exists()


def test_bnb_quantizes_on_the_device_it_is_given(tiny_llama, tmp_path, monkeypatch):
    from solar_quant.options import BnbOptions, OutputOptions
    from solar_quant.pipeline import bnb as pipeline

    seen = []
    real = pipeline.quantize_weight
    monkeypatch.setattr(pipeline, "quantize_weight", lambda w, opts, device: seen.append(device) or real(w, opts, device))
    target = "cuda" if torch.cuda.is_available() else "cpu"
    pipeline.build_bnb_variant(tiny_llama, tmp_path / "v", BnbOptions(method="bnb-int8"), OutputOptions(),
                               log=lambda _m: None, device=target)
    assert seen and set(seen) == {str(torch.device(target))}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bnb_on_cuda_writes_a_variant_that_verifies(tiny_llama, tmp_path):
    out = tmp_path / "cuda-nf4"
    cli("quantize", tiny_llama, out, "--method", "bnb-nf4", "--device", "cuda", check=True)
    assert cli("verify", out, "--source", tiny_llama, check=True).stdout.startswith("OK")


def test_output_folder_flag_is_out_everywhere(tiny_llama, tmp_path):
    calib = tmp_path / "calib"
    proc = cli("calibrate", "--model", tiny_llama, "-o", calib, "--nsamples", "2", "--seqlen", "32", check=True)
    assert proc.stdout.strip().splitlines()[-1] == str(calib) and (calib / "calibration.safetensors").is_file()
    rtn = tmp_path / "rtn"
    cli("quantize", tiny_llama, "-o", rtn, "--method", "rtn", "--group-size", "32", check=True)
    assert (rtn / "manifest.json").is_file()
    assert_clean_failure(cli("quantize", tiny_llama, tmp_path / "a", "--out", tmp_path / "b", "--method", "rtn"),
                         "--out", "once")
    assert_clean_failure(cli("quantize", tiny_llama, "--method", "rtn"), "OUT", "--out")
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'name = "r"\n[model]\npath = "{tiny_llama}"\n[[variants]]\nname = "v"\n'
                      '[variants.quantize]\nmethod = "bnb-nf4"\n')
    proc = cli("run", recipe, "-o", tmp_path / "run", "--dry-run", check=True)
    assert str(tmp_path / "run") in proc.stdout


def test_eval_refuses_a_quantized_baseline_by_name(tiny_llama, tiny_nf4, tmp_path):
    proc = cli("eval", tiny_nf4, tiny_llama, "-o", tmp_path / "rep", "--seqlen", "32", "--max-tokens", "64")
    assert_clean_failure(proc, f"BASELINE {tiny_nf4}", "bitsandbytes", "--allow-quantized-baseline")
    assert not (tmp_path / "rep").exists()


def test_eval_json_and_report_path_with_an_allowed_quantized_baseline(tiny_llama, tiny_nf4, tmp_path):
    out = tmp_path / "rep"
    proc = cli("eval", tiny_nf4, tiny_llama, "--allow-quantized-baseline", "--json", "-o", out,
               "--seqlen", "32", "--max-tokens", "64", check=True)
    doc = json.loads(proc.stdout)
    assert doc == json.loads((out / "report.json").read_text())
    assert f"report: {out / 'report.md'}" in proc.stderr
    table = cli("eval", tiny_llama, tiny_nf4, "-o", tmp_path / "rep2", "--seqlen", "32", "--max-tokens", "64", check=True)
    assert f"report: {tmp_path / 'rep2' / 'report.md'}" in table.stderr and "report:" not in table.stdout
    assert Path(tiny_nf4).name in table.stdout


def test_verify_json(tiny_nf4, tmp_path):
    import shutil

    doc = json.loads(cli("verify", tiny_nf4, "--json", check=True).stdout)
    assert doc["ok"] is True and doc["findings"] == [] and doc["path"] == str(tiny_nf4)
    broken = tmp_path / "broken"
    shutil.copytree(tiny_nf4, broken)
    (broken / "generation_config.json").write_text("{}\n")  # no longer the bytes the manifest lists
    proc = cli("verify", broken, "--json")
    assert proc.returncode == 1
    doc = json.loads(proc.stdout)
    assert doc["ok"] is False and any("generation_config.json" in f for f in doc["findings"])
    assert_clean_failure(proc, "verify found")


RECIPE = """name = "r"
[model]
demo = true
[calibration]
nsamples = 8
[[variants]]
name = "v"
[variants.quantize]
method = "gptq"
bits = 4
"""


@pytest.mark.parametrize("typo, unknown, meant", [
    (("name = ", "name_typo = "), "name_typo", "name"),
    (("nsamples", "nsampels"), "calibration.nsampels", "calibration.nsamples"),
    (("bits", "bitz"), "variants.0.quantize.bitz", "variants.0.quantize.bits"),
])
def test_misspelt_recipe_key_names_the_key_and_the_likely_one(tmp_path, typo, unknown, meant):
    recipe = tmp_path / "r.toml"
    recipe.write_text(RECIPE.replace(*typo, 1))
    proc = cli("run", recipe, "--dry-run")
    assert_clean_failure(proc, f"unknown key '{unknown}'", f"did you mean '{meant}'?")


def test_recipe_device_is_checked_when_the_recipe_loads(tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text('device = "banana"\n' + RECIPE)
    assert_clean_failure(cli("run", recipe, "--dry-run"), "device", "banana", "cpu, cuda or cuda:N")
