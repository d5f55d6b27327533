"""`solar-quant calibrate` end to end: the bundled default, byte-identical reruns, clean failures."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.conftest import assert_clean_failure, cli, tree_digest


def test_default_build_is_byte_identical_and_carded(demo_model, tmp_path):
    first, second = tmp_path / "one", tmp_path / "two"
    proc = cli("calibrate", "--model", demo_model, "--out", first, check=True)
    cli("calibrate", "--model", demo_model, "--out", second, check=True)
    assert tree_digest(first) == tree_digest(second)
    assert sorted(tree_digest(first)) == ["calibration.json", "calibration.safetensors", "manifest.json"]
    card = json.loads((first / "calibration.json").read_text())
    assert (card["nsamples"], card["seqlen"], card["seed"], card["template"], card["short"]) == (128, 2048, 0, "solar", "pack")
    assert [(s["path"], s["samples"]) for s in card["sources"]] == [
        ("calibration/orca.jsonl", 39), ("calibration/alpaca.jsonl", 38), ("calibration/prose.txt", 51)]
    assert sum(card["length_histogram"].values()) == card["documents"]
    assert "calibration/prose.txt" in proc.stdout and card["sha256"] in proc.stdout
    assert_clean_failure(cli("calibrate", "--model", demo_model, "--out", first), "already exists", "--overwrite")


@pytest.fixture
def bad(tmp_path):
    """Write a source file; run calibrate on it; check nothing appeared under --out."""
    out = tmp_path / "out"

    def run(*extra: str, model=None, demo):
        proc = cli("calibrate", "--model", model or demo, "--out", out, "--nsamples", "2", "--seqlen", "32", *extra)
        assert not out.exists() and not (tmp_path / ".out.partial").exists()
        return proc

    return run


def test_bad_sources_fail_cleanly(demo_model, tmp_path, bad):
    f = tmp_path / "data.jsonl"
    f.write_text('{"question": "q", "response": "r"}\n{"question": "q2", "response"\n')
    assert_clean_failure(bad("--source", f, demo=demo_model), f"{f}:2", "malformed JSON")
    f.write_text('{"instruction": "i", "output": "o"}\n{"instruction": "i2"}\n')
    assert_clean_failure(bad("--source", f, demo=demo_model), f"{f}:2", "missing field 'output'")
    f.write_text('{"instruction": "  ", "output": "o"}\n{"instruction": "i2", "output": ""}\n')
    assert_clean_failure(bad("--source", f, demo=demo_model), "no usable documents after filtering")
    assert_clean_failure(bad("--source", tmp_path / "nope.jsonl", demo=demo_model), "nope.jsonl", "no such file")
    (tmp_path / "small.txt").write_text("word " * 100 + "\n")  # ~100 tokens: 3 samples of 32
    assert_clean_failure(bad("--source", tmp_path / "small.txt", "--nsamples", "40", demo=demo_model),
                         "--nsamples 40", "small.txt gives 3 samples of 32 tokens", "at most 3")
    assert_clean_failure(bad("--source", tmp_path / "small.txt", "--short", "drop", "--seqlen", "512", demo=demo_model),
                         "small.txt gives no samples", "shorter than --seqlen 512")


def test_bad_flags_and_tokenizers_fail_cleanly(demo_model, tmp_path, bad):
    assert_clean_failure(bad("--template", "vicuna", demo=demo_model), "--template 'vicuna'", "solar, chat_template, raw")
    assert_clean_failure(bad("--nsamples", "100000", demo=demo_model), "--nsamples 100000", "at most")
    broken = tmp_path / "broken-model"
    broken.mkdir()
    assert_clean_failure(bad(model=broken, demo=demo_model), "no tokenizer.json or tokenizer.model")
    shutil.copy(demo_model / "tokenizer_config.json", broken)
    (broken / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "Nonsense"}}')
    assert_clean_failure(bad(model=broken, demo=demo_model), str(broken), "cannot load the tokenizer")
