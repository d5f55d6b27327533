"""Hub-ready model cards: front matter the Hub reads, no local paths, `solar-quant card OUT
[--report R]`, and a memory table that states its assumptions and agrees with `plan`."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from conftest import ROOT, assert_clean_failure, cli
from solar_quant.checkpoint.manifest import check_manifest
from solar_quant.options import BnbOptions, EvalOptions, GptqOptions, OutputOptions

quiet = lambda *_a, **_k: None  # noqa: E731


def front_matter(card: str) -> dict:
    import yaml

    assert card.startswith("---\n"), card[:200]
    return yaml.safe_load(card[4:card.index("\n---\n", 4)])


@pytest.fixture(scope="module")
def hub_source(tiny_llama, tmp_path_factory) -> Path:
    """tiny_llama laid out as huggingface_hub caches a download, with the source's own card."""
    snap = tmp_path_factory.mktemp("hub") / "models--acme--tiny-llama" / "snapshots" / "0123abcd"
    shutil.copytree(tiny_llama, snap)
    (snap / "README.md").write_text("---\nlicense: mit\nlanguage: en\n---\n# tiny llama\n")
    return snap


@pytest.fixture(scope="module")
def nf4(hub_source, tmp_path_factory) -> Path:
    from solar_quant.pipeline.bnb import build_bnb_variant

    out = tmp_path_factory.mktemp("card-nf4") / "tiny-nf4"
    return build_bnb_variant(str(hub_source), str(out), BnbOptions(method="bnb-nf4", double_quant=True), OutputOptions(),
                             log=quiet)


def test_record_names_the_source_and_tells_its_hub_id_and_licence(nf4):
    record = json.loads((nf4 / "solar_quant.json").read_text())
    assert record["source"]["name"] == "0123abcd" and len(record["source"]["sha256"]) == 64
    assert record["source"]["model_id"] == "acme/tiny-llama" and record["source"]["license"] == "mit"
    assert "path" not in record["source"]


def test_the_demo_model_is_known_by_its_hub_id(demo_model, tmp_path):
    from solar_quant.models.demo import DEMO_LICENSE, DEMO_MODEL_ID
    from solar_quant.variant import source_card_metadata

    assert source_card_metadata(demo_model) == {"model_id": DEMO_MODEL_ID, "license": DEMO_LICENSE}
    (tmp_path / "config.json").write_text(json.dumps({"_name_or_path": "acme/named"}))
    assert source_card_metadata(tmp_path) == {"model_id": "acme/named"}
    (tmp_path / "config.json").write_text(json.dumps({"_name_or_path": str(tmp_path)}))  # a local path is no id
    assert source_card_metadata(tmp_path) == {}


def test_card_command_writes_hub_front_matter_from_the_source(nf4):
    from huggingface_hub import ModelCard

    proc = cli("card", nf4, check=True)
    assert proc.stdout.strip() == str(nf4 / "README.md")  # stdout: the result only
    card = (nf4 / "README.md").read_text()
    meta = front_matter(card)
    assert meta["license"] == "mit" and meta["base_model"] == "acme/tiny-llama"
    assert meta["base_model_relation"] == "quantized" and meta["library_name"] == "transformers"
    assert meta["pipeline_tag"] == "text-generation"
    assert {"bitsandbytes", "4-bit", "nf4", "double-quant"} <= set(meta["tags"])
    hub = ModelCard(card).data.to_dict()  # what huggingface_hub would push
    assert hub["base_model"] == "acme/tiny-llama" and hub["license"] == "mit"
    assert "## Options" in card and "solar-quant quantize" in card  # no recipe: the record's options
    assert check_manifest(nf4) == [] and not list(nf4.glob("*.tmp")) and not list(nf4.glob(".*"))


def test_flags_override_and_gptq_tags(hub_source, tmp_path):
    from solar_quant.pipeline.cards import write_card
    from solar_quant.pipeline.gptq import build_gptq_variant

    out = build_gptq_variant(str(hub_source), str(tmp_path / "rtn3"), GptqOptions(method="rtn", bits=3, group_size=32),
                             None, OutputOptions(), log=quiet)
    meta = front_matter(write_card(out, license="apache-2.0", base_model="acme/other").read_text())
    assert meta["license"] == "apache-2.0" and meta["base_model"] == "acme/other"
    assert {"gptq", "3-bit", "rtn"} <= set(meta["tags"]) and "bitsandbytes" not in meta["tags"]


def test_without_a_known_base_model_the_card_says_so(tiny_llama, tmp_path):
    from solar_quant.pipeline.bnb import build_bnb_variant
    from solar_quant.pipeline.cards import write_card

    out = build_bnb_variant(str(tiny_llama), str(tmp_path / "int8"), BnbOptions(method="bnb-int8"), OutputOptions(),
                            log=quiet)
    card = write_card(out).read_text()
    meta = front_matter(card)
    assert meta["license"] == "other" and "base_model" not in meta and "base_model_relation" not in meta
    assert "Licence: not recorded" in card and {"8-bit", "int8"} <= set(meta["tags"])


def test_memory_table_states_its_assumptions_and_agrees_with_plan(nf4):
    from solar_quant.architecture import LlamaShape
    from solar_quant.gpus import parse_gpus
    from solar_quant.pipeline.cards import write_card
    from solar_quant.plan import GIB, plan
    from solar_quant.formats.sizes import Variant

    card = write_card(nf4).read_text()
    section = card.split("## Memory", 1)[1].split("\n## ", 1)[0]
    assert "generation (serving)" in section and "`plan --logits last`" in section and "GiB = 2^30 bytes" in section
    assert "--logits all" in section  # and what scoring needs instead
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in section.splitlines() if re.match(r"\| \d", line)]
    assert len(rows) == 8
    assert "| context | GPUs | weights GiB | KV cache GiB | overhead GiB | total GiB | fits |" in section
    shape = LlamaShape.from_config(json.loads((nf4 / "config.json").read_text()))
    for context, gpus, weights, kv, overhead, total, fits in rows:
        (row,) = plan(shape, parse_gpus(gpus), context=int(context), variants=[Variant("bnb-nf4", double_quant=True, bits=4)],
                      logits="last")
        assert [float(weights), float(kv), float(overhead), float(total)] == \
            [round(b / GIB, 3) for b in (row.weight_bytes, row.kv_bytes, row.overhead_bytes, row.total_bytes)]
        assert fits.startswith("yes") == row.fits
    # the command the card quotes prints the same numbers
    command = re.search(r"`solar-quant plan (\S+) (--variants .*?--logits last)`", section)
    assert command and command[1] == nf4.name
    proc = cli("plan", nf4, *command[2].split(), "--json", check=True)
    (row,) = json.loads(proc.stdout)["rows"]
    first = rows[[r[:2] for r in rows].index(["4096", "1x80GB"])]
    assert float(first[5]) == round(row["total_bytes"] / GIB, 3)
    # one unit throughout: GiB, never a bare GB figure (GPU names such as 1x80GB aside)
    assert not re.search(r"\d\s+GB\b", card) and "GiB" in card.split("## Files and size", 1)[1].split("\n## ", 1)[0]


@pytest.fixture(scope="module")
def evaluated(nf4, hub_source, tmp_path_factory) -> Path:
    from solar_quant.evaluate.run import evaluate

    out = tmp_path_factory.mktemp("card-eval") / "eval"
    evaluate(str(hub_source), [str(nf4)], EvalOptions(seqlen=32, max_tokens=128, passkey_trials=0, contexts=(64,)),
             str(out), log=quiet, show=quiet)
    return out


def test_card_with_report_adds_quality_and_carries_no_local_path(nf4, evaluated, tmp_path_factory):
    cli("card", nf4, "--report", evaluated / "report.json", check=True)
    card = (nf4 / "README.md").read_text()
    quality = card.split("## Quality against fp16", 1)[1].split("\n## ", 1)[0]
    assert "| fp16 baseline | short |" in quality and f"| {nf4.name} | context 64 |" in quality
    assert "text = bundled:eval.txt (sha256" in quality
    assert (nf4 / "ppl_by_position_c64.png").is_file() and check_manifest(nf4) == []
    local = [str(tmp_path_factory.getbasetemp()), str(ROOT), str(Path.home())]
    for folder in (nf4, evaluated):
        for f in folder.rglob("*"):
            if f.is_file() and f.suffix in (".json", ".md", ".toml", ".txt", ".jinja"):
                text = f.read_text()
                assert not [p for p in local if p in text], (f, [p for p in local if p in text])


def test_card_refuses_a_report_that_does_not_cover_the_folder(evaluated, tiny_llama, tmp_path):
    from solar_quant.pipeline.bnb import build_bnb_variant

    other = build_bnb_variant(str(tiny_llama), str(tmp_path / "other-fp4"), BnbOptions(method="bnb-fp4"),
                              OutputOptions(), log=quiet)
    before = (other / "manifest.json").read_bytes()
    assert_clean_failure(cli("card", other, "--report", evaluated / "report.json"),
                         "does not cover this folder", "tiny-nf4")
    assert not (other / "README.md").exists() and (other / "manifest.json").read_bytes() == before


@pytest.mark.parametrize("case", ["missing", "source-folder", "bad-report"])
def test_card_bad_input_gets_one_line(case, tiny_llama, nf4, tmp_path):
    if case == "missing":
        args, needle = [tmp_path / "nope"], "no such folder"
    elif case == "source-folder":
        args, needle = [tiny_llama], "solar_quant.json"
    else:
        (tmp_path / "report.json").write_text("{not json")
        args, needle = [nf4, "--report", tmp_path / "report.json"], "not valid JSON"
    assert_clean_failure(cli("card", *args), needle)


def test_recipe_copy_shortens_local_paths():
    from solar_quant.pipeline.cards import without_local_paths

    text = 'path = "/data/models/SOLAR-0-70b-16bit"\ntext = \'/home/me/eval.txt\'\nname = "SOLAR-0-70b"\nw = "C:\\\\m\\\\x"'
    assert without_local_paths(text) == 'path = "SOLAR-0-70b-16bit"\ntext = \'eval.txt\'\nname = "SOLAR-0-70b"\nw = "x"'
