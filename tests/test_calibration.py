"""Calibration sets: format readers, mixing proportions, packing/dropping, determinism, artifacts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from solar_quant.calibration.artifact import CalibrationSet, check_tokenizer, load_calibration, tokenizer_identity
from solar_quant.calibration.build import build_calibration, calibration_from_cli, calibration_options
from solar_quant.calibration.sampling import max_nsamples, mix_quotas, take_rows
from solar_quant.calibration.sources import open_source, parse_source_flags
from solar_quant.errors import CalibrationError, OptionError
from solar_quant.options import SourceSpec

quiet = lambda msg: None  # noqa: E731


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def opts(sources, **kw):
    return calibration_options(sources, kw.pop("fmt", None), **{"template": "solar", "nsamples": 8, "seqlen": 64,
                                                                 "seed": 0, "short": "pack", **kw})


# --- readers ---------------------------------------------------------------------------------

def test_formats_are_detected_and_records_become_conversations(tmp_path):
    orca = write_jsonl(tmp_path / "o.jsonl", [{"system_prompt": "", "question": "Q1", "response": "R1"},
                                              {"system_prompt": "Sys", "question": "Q2", "response": "R2"}])
    alpaca = tmp_path / "a.json"  # Alpaca's own layout: one JSON array
    alpaca.write_text(json.dumps([{"instruction": "Do", "input": "this", "output": "Done"},
                                  {"instruction": "Skip me", "input": "", "output": "  "}]))
    chat = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                            {"role": "assistant", "content": "hello"}]}])
    text = tmp_path / "t.txt"
    text.write_text("Chapter one.\n\nSecond paragraph.\n\n\nChapter two.\n")
    readers = {p.name: open_source(SourceSpec(path=str(p)), quiet) for p in (orca, alpaca, chat, text)}
    assert {n: r.format for n, r in readers.items()} == {"o.jsonl": "orca", "a.json": "alpaca", "c.jsonl": "chat", "t.txt": "text"}
    o = readers["o.jsonl"]
    assert o.document(0) == [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "R1"}]
    assert o.document(1)[0] == {"role": "system", "content": "Sys"}
    a = readers["a.json"]
    assert (a.records, a.count, a.skipped_empty) == (2, 1, 1)
    assert a.document(0)[0] == {"role": "user", "content": "Do\n\nthis"}
    assert readers["c.jsonl"].document(0)[1]["content"] == "hello"
    t = readers["t.txt"]
    assert [t.document(i) for i in range(t.count)] == ["Chapter one.\n\nSecond paragraph.", "Chapter two."]


def test_format_flag_overrides_detection(tmp_path):
    f = write_jsonl(tmp_path / "data.jsonl", [{"question": "q", "response": "r"}])
    assert open_source(SourceSpec(path=str(f), format="text"), quiet).document(0).startswith('{"question"')


@pytest.mark.parametrize("lines, needles", [
    (['{"question": "q", "response": "r"}', '{"question": "q2", "response": '], ["bad.jsonl:2", "malformed JSON"]),
    (['{"question": "q", "response": "r"}', '', '{"question": "q3"}'], ["bad.jsonl:3", "'response'"]),
    (['{"question": "q", "response": "r"}', '["a list"]'], ["bad.jsonl:2", "JSON object"]),
])
def test_bad_records_name_file_line_and_field(tmp_path, lines, needles):
    f = tmp_path / "bad.jsonl"
    f.write_text("\n".join(lines) + "\n")
    with pytest.raises(CalibrationError) as e:
        open_source(SourceSpec(path=str(f)), quiet, "bad.jsonl")
    assert all(n in str(e.value) for n in needles), str(e.value)


def test_chat_records_are_validated(tmp_path):
    f = write_jsonl(tmp_path / "c.jsonl", [{"messages": [{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}]}])
    with pytest.raises(CalibrationError, match=r"c.jsonl:1: messages\[1\]"):
        open_source(SourceSpec(path=str(f)), quiet, "c.jsonl")


def test_source_flags():
    specs = parse_source_flags(["a.jsonl:0.6", "b.txt", "c:/x.txt:2"], ["auto", "text", "text"])
    assert [(s.path, s.weight, s.format) for s in specs] == [("a.jsonl", 0.6, "auto"), ("b.txt", 1.0, "text"), ("c:/x.txt", 2.0, "text")]
    with pytest.raises(OptionError, match="weight"):
        parse_source_flags(["a.jsonl:0"], None)
    with pytest.raises(OptionError, match="--format"):
        parse_source_flags(["a", "b", "c"], ["text", "orca"])
    with pytest.raises(OptionError, match="--format 'yaml'"):
        parse_source_flags(["a"], ["yaml"])


# --- mixing and rows -------------------------------------------------------------------------

def test_mix_quotas_follow_weights_exactly():
    assert mix_quotas([0.3, 0.3, 0.4], 128) == [39, 38, 51]
    assert mix_quotas([1, 1, 1], 10) == [4, 3, 3]
    assert mix_quotas([3, 1], 8) == [6, 2]
    for n in (1, 7, 128, 1000):
        q = mix_quotas([0.6, 0.25, 0.15], n)
        assert sum(q) == n and all(abs(x - w * n) < 1 for x, w in zip(q, [0.6, 0.25, 0.15]))
    assert max_nsamples([1, 1], [10, 3]) == 7  # quotas [4, 3]
    assert max_nsamples([3, 1], [30, 1]) == 6  # quotas(6) = [5, 1]; quotas(7) = [5, 2]


def test_pack_and_drop_rows():
    docs = [[1] * 5, [2] * 12, [3] * 3, [4] * 9]
    packed = take_rows(iter(docs), 4, "pack", 6)
    assert [list(r) for r in packed.rows] == [[1, 1, 1, 1], [1, 2, 2, 2], [2, 2, 2, 2], [2, 2, 2, 2], [2, 3, 3, 3], [4, 4, 4, 4]]
    assert (packed.documents, packed.truncated) == (4, 1)  # the last document is cut where the quota is met
    dropped = take_rows(iter(docs), 4, "drop", 10)
    assert [r[0] for r in dropped.rows] == [1, 2, 2, 2, 4, 4]
    assert (dropped.documents, dropped.dropped_short, dropped.truncated) == (3, 1, 2)


def prose(path: Path, word: str, docs: int = 40) -> Path:
    path.write_text("\n\n\n".join(" ".join([f"{word}{i}"] * 80) for i in range(docs)) + "\n")
    return path


def test_mixing_proportions_measured_in_the_ids(demo_model, tmp_path):
    from transformers import AutoTokenizer

    a, b = prose(tmp_path / "a.txt", "apple"), prose(tmp_path / "b.txt", "zebra")
    calib = build_calibration(demo_model, opts([f"{a}:3", f"{b}:1"], nsamples=16), quiet)
    assert calib.input_ids.shape == (16, 64)
    tok = AutoTokenizer.from_pretrained(str(demo_model))
    rows = [tok.decode(r) for r in calib.input_ids]
    assert sum("apple" in r for r in rows) == 12 and sum("zebra" in r for r in rows) == 4
    assert not any("apple" in r and "zebra" in r for r in rows)  # a row holds one source
    assert [s["samples"] for s in calib.card["sources"]] == [12, 4]
    assert [s["tokens"] for s in calib.card["sources"]] == [12 * 64, 4 * 64]
    assert calib.card["sources"][0]["path"] == str(a)


def test_same_inputs_and_seed_give_identical_ids_and_card(demo_model, tmp_path):
    a = prose(tmp_path / "a.txt", "apple")
    orca = write_jsonl(tmp_path / "o.jsonl", [{"question": f"What is {i}+{i}?", "response": f"It is {2 * i}."} for i in range(200)])
    o = opts([f"{a}:1", f"{orca}:1"], nsamples=12)
    one, two = build_calibration(demo_model, o, quiet), build_calibration(demo_model, o, quiet)
    assert torch.equal(one.input_ids, two.input_ids) and one.card == two.card
    other = build_calibration(demo_model, opts([f"{a}:1", f"{orca}:1"], nsamples=12, seed=1), quiet)
    assert other.card["sha256"] != one.card["sha256"]
    assert one.card["template"] == "solar" and one.card["seed"] == 0
    assert one.card["tokenizer"] == tokenizer_identity(demo_model)


def test_not_enough_data_says_how_many_are_available(demo_model, tmp_path):
    from transformers import AutoTokenizer

    a = prose(tmp_path / "a.txt", "apple", docs=4)
    tok = AutoTokenizer.from_pretrained(str(demo_model))
    docs = a.read_text().strip().split("\n\n\n")
    available = sum(len(tok(d, add_special_tokens=False)["input_ids"]) + 1 for d in docs) // 64  # + EOS each
    with pytest.raises(CalibrationError, match=rf"gives {available} samples of 64 tokens.*at most {available} ") as e:
        build_calibration(demo_model, opts([str(a)], nsamples=50), quiet)
    assert "--nsamples 50" in str(e.value)
    with pytest.raises(CalibrationError, match="shorter than --seqlen 2048"):
        build_calibration(demo_model, opts([str(a)], nsamples=2, seqlen=2048, short="drop"), quiet)


def test_large_jsonl_is_streamed_not_loaded(demo_model, tmp_path):
    """Indexing a ~20 MB JSONL file and reading records back keeps Python's peak allocations
    far below the file size; building from it tokenizes only the records it needs."""
    import tracemalloc

    big = tmp_path / "big.jsonl"
    filler = "word " * 200
    with open(big, "w") as f:
        for i in range(20_000):
            f.write(json.dumps({"instruction": f"Task {i}. {filler}", "input": "", "output": f"Answer {i}."}) + "\n")
    size = big.stat().st_size
    tracemalloc.start()
    reader = open_source(SourceSpec(path=str(big)), quiet)
    docs = [reader.document(i) for i in (19_999, 7, 12_345)]
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert reader.count == 20_000 and docs[0][1]["content"] == "Answer 19999."
    assert size > 20e6 and peak < size / 20, (size, peak)
    calib = build_calibration(demo_model, opts([str(big)], nsamples=4), quiet)
    assert calib.card["sources"][0]["documents"] <= 4 and calib.card["sources"][0]["records"] == 20_000


# --- artifact --------------------------------------------------------------------------------

def test_artifact_round_trip_and_tokenizer_check(demo_model, tmp_path):
    a = prose(tmp_path / "a.txt", "apple")
    calib = build_calibration(demo_model, opts([str(a)], nsamples=4), quiet)
    out = calib.save(tmp_path / "art")
    back = load_calibration(out)
    assert torch.equal(back.input_ids, calib.input_ids) and back.card == calib.card
    assert calibration_from_cli(demo_model, str(out), None, None).card["sha256"] == calib.card["sha256"]
    other = CalibrationSet(calib.input_ids, {**calib.card, "tokenizer": {**calib.card["tokenizer"], "vocab_size": 32000}})
    with pytest.raises(CalibrationError, match=r"different tokenizer than .*vocab_size 32000 vs 49152"):
        check_tokenizer(other, demo_model, "art2")
    with pytest.raises(OptionError, match="not both"):
        calibration_from_cli(demo_model, str(out), [str(a)], None)


def test_calibration_from_cli_builds_from_flags(demo_model, tmp_path):
    a = prose(tmp_path / "a.txt", "apple")
    calib = calibration_from_cli(demo_model, None, [str(a)], ["text"], template="raw", nsamples=3, seqlen=32, seed=5, short="drop")
    assert calib.input_ids.shape == (3, 32) and calib.card["short"] == "drop" and calib.card["template"] == "raw"
