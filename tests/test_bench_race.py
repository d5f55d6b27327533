"""The race's bookkeeping (bench/race.py) and its second text (bench/second_text.py): which runs
pair, which are refused, and what the Wikipedia cleaner keeps. Pure Python on small documents."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import race  # noqa: E402
import second_text  # noqa: E402


def _doc(seed, runs, scores, *, text="aa" * 32, fp16=30.0, calib="c1", configs=None):
    return {"protocol": {"calibration": {"seed": seed}, "configs": configs or {}},
            "eval_protocol": {"text": {"sha256": text}, "sections": {"short": {"scored_tokens": 16352}},
                              "kl": {"k": 256}},
            "fp16": {"ppl": fp16}, "calibration": {"sha256": calib}, "runs": runs, "scores": scores}


OURS_CFG = {"4b-g128-act-gloss-eq": {"bits": 4, "group_size": 128, "ours_extra": ["--clip", "gptq-loss", "--equalize"],
                                     "peer_run_of": "4b-g128-act-mse", "autoround_run_of": "4b-g128-autoround"}}


def _files(tmp_path: Path, monkeypatch, peer_fp16=30.0, ar_calib="c1"):
    monkeypatch.setattr(race.benchlib, "ROOT", tmp_path)
    ours = _doc(1, {"a": {"id": "a", "impl": "ours", "rep": 1, "config": "4b-g128-act-gloss-eq"}},
                {"a": {"ppl": 33.0, "kl_mean": 0.08}}, configs=OURS_CFG)
    peer = _doc(1, {"b": {"id": "b", "impl": "theirs", "rep": 1, "config": "4b-g128-act-mse"}},
                {"b": {"ppl": 36.0, "kl_mean": 0.10}}, fp16=peer_fp16)
    ar = _doc(1, {"c": {"id": "c", "impl": "autoround", "rep": 1, "config": "4b-g128-autoround"}},
              {"c": {"ppl": 34.0, "kl_mean": 0.09}}, calib=ar_calib)
    paths = []
    for name, doc in (("ours.json", ours), ("peer.json", peer), ("ar.json", ar)):
        (tmp_path / name).write_text(json.dumps(doc))
        paths.append(tmp_path / name)
    return paths


def test_ours_pairs_with_each_peer(tmp_path, monkeypatch):
    ours, peer, ar = _files(tmp_path, monkeypatch)
    ps, refused = race.pairs([ours], race.peer_runs([peer, ar]))
    assert refused == []
    by_peer = {p["peer"]: p for p in ps}
    assert set(by_peer) == {"gptqmodel", "autoround"}
    assert by_peer["gptqmodel"]["kl_ratio"] == pytest.approx(0.8)
    assert by_peer["gptqmodel"]["ppl_excess_ratio"] == pytest.approx(3.0 / 6.0)
    assert by_peer["autoround"]["kl_ratio"] == pytest.approx(0.08 / 0.09)
    assert by_peer["autoround"]["ppl_excess_ratio"] == pytest.approx(3.0 / 4.0)


def test_mismatched_protocol_is_refused_and_named(tmp_path, monkeypatch):
    ours, peer, ar = _files(tmp_path, monkeypatch, peer_fp16=31.0, ar_calib="other")
    ps, refused = race.pairs([ours], race.peer_runs([peer, ar]))
    assert ps == []
    assert any("gptqmodel" in r and "fp16_ppl" in r for r in refused), refused
    assert any("autoround" in r and "calibration_sha256" in r for r in refused), refused


def test_verdict_needs_five_draws_and_reads_the_upper_end():
    kl = race.pooled([0.70, 0.72, 0.74, 0.71, 0.73])
    row = race.verdict("gptqmodel", 4, kl, kl)
    assert "status" not in row and row["kl"]["met"] is True
    assert row["kl"]["upper"] == pytest.approx(kl["ci95"][1])
    few = race.verdict("gptqmodel", 3, race.pooled([0.7, 0.9]), race.pooled([0.7, 0.9]))
    assert few["status"].startswith("not settled")
    assert race.verdict("autoround", 2, kl, kl)["kl"]["met"] is None  # 2-bit g64: reported, no bar


def test_second_text_cleaner_keeps_prose_and_drops_markup():
    wiki = ("{{Infobox|name=x|{{nested}}}}'''Albedo''' is the [[reflection|reflectivity]] of a "
            "[[surface]].<ref>Source</ref> It is measured from 0 to 1.\n\n"
            "[[File:Albedo.png|thumb|A [[map]]]]\n{| class=wikitable\n|a||b\n|}\n"
            "Fresh snow has a high albedo &amp;nbsp;near 0.9.\n\n== History ==\nLater text.\n\n"
            "== References ==\nBook.\n")
    text = second_text.clean(wiki)
    assert text.startswith("Albedo is the reflectivity of a surface. It is measured from 0 to 1.")
    assert "Fresh snow has a high albedo" in text
    for gone in ("{{", "}}", "[[", "<ref", "Infobox", "wikitable", "thumb", "&amp;", "Book."):
        assert gone not in text, gone
    lead = second_text.lead(text)
    assert "Later text" not in lead and "Fresh snow" in lead
