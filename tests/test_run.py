"""`solar-quant run`: a recipe end to end on the tiny model (calibrate, quantize, verify, eval, cards)."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from solar_quant.checkpoint.manifest import check_manifest
from solar_quant.checkpoint.headers import read_header
from tests.conftest import ROOT, assert_clean_failure, cli, tree_digest


def assert_no_local_paths(root: Path, local: list[Path]) -> None:
    """No file of a run (cards, records, reports, run.json, safetensors headers) names a local folder."""
    needles = [str(p) for p in local]
    for f in root.rglob("*"):
        if not f.is_file() or f.suffix == ".png":
            continue
        if f.suffix == ".safetensors":
            entries, metadata = read_header(str(f))
            text = json.dumps([list(entries), metadata])
        else:
            text = f.read_text(errors="replace")
        assert not [n for n in needles if n in text], (f, [n for n in needles if n in text])

RECIPE = """
name = "tiny-demo"
[model]
path = "{model}"
name = "tiny-llama"
license = "apache-2.0"

[calibration]
template = "raw"
nsamples = 8
seqlen = 64
seed = 0

[[variants]]
name = "tiny-bnb-int8"
rope_scaling = "dynamic:2"
[variants.quantize]
method = "bnb-int8"

[[variants]]
name = "tiny-gptq-4bit-g32"
rope_scaling = "dynamic:2"
[variants.quantize]
method = "gptq"
bits = 4
group_size = 32
act_order = true
mse = 2.4

[eval]
seqlen = 32
max_tokens = 256
contexts = [128]
rope_scaling = "dynamic:2"
passkey_trials = 0
max_ppl_ratio = {gate}
"""


def test_recipe_runs_end_to_end(tiny_llama, tmp_path):
    before = tree_digest(tiny_llama)
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(RECIPE.format(model=tiny_llama, gate=1.5))
    out = tmp_path / "run"
    proc = cli("run", recipe, "--out", out, check=True)
    for name in ("tiny-bnb-int8", "tiny-gptq-4bit-g32"):
        folder = out / name
        card = (folder / "README.md").read_text()
        assert "## Quality against fp16" in card and "context 128" in card and "Licence: apache-2.0" in card
        assert "from_pretrained(path" in card and "[model]" in card  # loading code and the exact recipe
        assert check_manifest(folder) == []  # the card is covered by the refreshed manifest
        cfg = json.loads((folder / "config.json").read_text())
        assert cfg["rope_parameters"]["rope_type"] == "dynamic" and cfg["rope_parameters"]["factor"] == 2.0
        assert name in proc.stdout
    gptq_card = (out / "tiny-gptq-4bit-g32" / "README.md").read_text()
    assert "## Calibration set" in gptq_card and "act-order, clipping search (norm 2.4), symmetric" in gptq_card
    qcfg = json.loads((out / "tiny-gptq-4bit-g32" / "quantize_config.json").read_text())
    assert qcfg["desc_act"] is True and qcfg["meta"]["mse"] == 2.4
    report = json.loads((out / "eval" / "report.json").read_text())
    assert [m["role"] for m in report["models"]] == ["baseline", "variant", "variant"]
    run = json.loads((out / "run.json").read_text())
    assert {r["variant"] for r in run["summary"]} == {"tiny-bnb-int8", "tiny-gptq-4bit-g32"}
    assert all(r["gates"] == "pass" for r in run["summary"])
    assert tree_digest(tiny_llama) == before
    assert_no_local_paths(out, [tmp_path, tiny_llama.parent, ROOT, Path.home()])
    meta = yaml.safe_load(gptq_card.split("---\n")[1])
    assert meta["license"] == "apache-2.0" and {"gptq", "4-bit"} <= set(meta["tags"])

    # `card` refreshes a run's card from the recipe the folder kept (recipe.toml, paths shortened)
    folder = out / "tiny-bnb-int8"
    kept = (folder / "recipe.toml").read_text()
    assert f'path = "{tiny_llama.name}"' in kept and str(tiny_llama) not in kept
    cli("card", folder, check=True)
    refreshed = (folder / "README.md").read_text()
    assert "## Recipe" in refreshed and "Licence: apache-2.0" in refreshed and check_manifest(folder) == []

    # Outputs exist: refused without --resume/--overwrite; --resume keeps finished variants.
    assert_clean_failure(cli("run", recipe, "--out", out), "already exists", "--resume")
    resumed = cli("run", recipe, "--out", out, "--resume", check=True)
    assert "already complete, kept" in resumed.stderr


GATE_RECIPE = """
name = "tiny-gate"
[model]
path = "{model}"

[[variants]]
name = "tiny-rtn-2bit"
[variants.quantize]
method = "rtn"
bits = 2
group_size = 32

[eval]
seqlen = 32
max_tokens = 128
passkey_trials = 0
max_ppl_ratio = 1.0001
"""


def test_failed_gate_exits_1_after_writing_cards(tiny_llama, tmp_path):
    recipe = tmp_path / "gate.toml"
    recipe.write_text(GATE_RECIPE.format(model=tiny_llama))
    proc = cli("run", recipe, "--out", tmp_path / "run")
    assert proc.returncode == 1, proc.stderr
    assert "GATE FAILED" in proc.stdout and "tiny-rtn-2bit" in proc.stderr
    card = (tmp_path / "run" / "tiny-rtn-2bit" / "README.md").read_text()
    assert "## Quality against fp16" in card
