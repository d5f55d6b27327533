"""The bundled calibration set: documented, parseable, and disjoint from the held-out text."""

from __future__ import annotations

import json
import re

from solar_quant.calibration.bundled import bundled_dir, default_eval_text, default_sources
from solar_quant.calibration.sources import open_source

N = 13  # words: the n-gram length of the leakage check
WORD = re.compile(r"[a-z0-9']+")


def ngrams(text: str) -> set[tuple[str, ...]]:
    w = WORD.findall(text.lower())
    return {tuple(w[i:i + N]) for i in range(len(w) - N + 1)}


def strings(obj) -> list[str]:
    if isinstance(obj, str):
        return [obj]
    if isinstance(obj, dict):
        return [s for v in obj.values() for s in strings(v)]
    if isinstance(obj, list):
        return [s for v in obj for s in strings(v)]
    return []


def calibration_texts() -> dict[str, str]:
    root = bundled_dir()
    texts = {"prose.txt": (root / "prose.txt").read_text()}
    for name in ("orca.jsonl", "alpaca.jsonl", "chat.jsonl"):
        texts[name] = "\n".join(" ".join(strings(json.loads(line))) for line in (root / name).read_text().splitlines())
    return texts


def test_held_out_text_shares_no_13_gram_with_the_calibration_set():
    held_out = ngrams(default_eval_text().read_text())
    assert len(held_out) > 30_000
    for name, text in calibration_texts().items():
        shared = held_out & ngrams(text)
        assert not shared, f"{name} shares {len(shared)} 13-grams with eval.txt, e.g. {' '.join(next(iter(shared)))}"


def test_the_leakage_check_detects_a_copied_sentence():
    eval_text = default_eval_text().read_text()
    copied = " ".join(eval_text.split()[5000:5020])
    assert ngrams(eval_text) & ngrams("Some new text. " + copied + " More new text.")


def test_held_out_text_is_40k_to_60k_tokens(demo_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(demo_model))
    n = len(tok(default_eval_text().read_text(), add_special_tokens=False)["input_ids"])
    assert 40_000 <= n <= 60_000, n


def test_bundled_sources_parse_in_their_formats_and_mix_60_40():
    specs = default_sources()
    readers = [open_source(s, lambda m: None) for s in specs]
    assert [r.format for r in readers] == ["orca", "alpaca", "text"]
    assert all(r.count == r.records > 0 and r.skipped_empty == 0 for r in readers)
    assert sum(r.count for r in readers[:2]) >= 300
    assert abs(sum(s.weight for s in specs[:2]) - 0.6) < 1e-9 and abs(specs[2].weight - 0.4) < 1e-9
    chat = open_source(specs[0].model_copy(update={"path": str(bundled_dir() / "chat.jsonl"), "format": "auto"}), lambda m: None)
    assert chat.format == "chat" and chat.count > 0


def test_every_bundled_file_has_its_source_and_licence_documented():
    root = bundled_dir()
    readme = (root / "README.md").read_text()
    for path in root.iterdir():
        if path.is_file() and path.name != "README.md":
            assert f"`{path.name}`" in readme, f"{path.name} is not documented in calibration/README.md"
    for licence in ("CC0", "PDDL", "public domain", "BSD-3-Clause", "Apache-2.0"):
        assert licence in readme
    assert sum(p.stat().st_size for p in root.iterdir() if p.is_file()) < 4 * 1024 * 1024
