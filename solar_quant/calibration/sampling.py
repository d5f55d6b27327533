"""Mixing and row assembly: documents -> token ids -> fixed-length calibration rows.

Mixing is measured in rows: source i gets `quota_i` of the `nsamples` rows, proportional to
its weight (largest remainder). Every row holds exactly `seqlen` tokens of one source, so a
source's share of rows is exactly its share of calibration tokens.

Within a source, documents are taken in a seeded shuffled order and turned into rows:
  pack  documents are concatenated (each with its BOS/EOS) and cut into `seqlen` rows; a
        document may continue into the next row. The last document used is cut where the
        quota is met (counted in `truncated`).
  drop  documents shorter than `seqlen` are dropped; a longer one gives its full `seqlen`
        windows, and the remainder is discarded (counted in `truncated`).
"""

from __future__ import annotations

import hashlib
import random
from array import array
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Iterable, Iterator

from solar_quant.calibration.sources import Document
from solar_quant.calibration.templates import Template

HISTOGRAM_EDGES = (64, 128, 256, 512, 1024, 2048, 4096, 8192)


def mix_quotas(weights: list[float], nsamples: int) -> list[int]:
    """Rows per source, proportional to weight; leftover rows go to the largest remainders
    (ties to the earlier source). Exact arithmetic, so the split is the same everywhere."""
    w = [Fraction(x) for x in weights]
    exact = [x / sum(w) * nsamples for x in w]
    quotas = [int(x) for x in exact]
    order = sorted(range(len(w)), key=lambda i: (-(exact[i] - quotas[i]), i))
    for i in order[: nsamples - sum(quotas)]:
        quotas[i] += 1
    return quotas


def max_nsamples(weights: list[float], available: list[int]) -> int:
    """The largest nsamples whose quotas every source can fill."""
    for n in range(sum(available), 0, -1):
        if all(q <= a for q, a in zip(mix_quotas(weights, n), available)):
            return n
    return 0


def derived_rng(seed: int, *tags: object) -> random.Random:
    """An RNG for one purpose, independent of Python's hash seed and of the other purposes."""
    key = "/".join(map(str, (seed, *tags))).encode()
    return random.Random(int.from_bytes(hashlib.sha256(key).digest()[:8], "little"))


@dataclass(frozen=True)
class SpecialTokens:
    """How each document is framed: BOS (decided by `special_tokens`) and EOS."""

    bos_id: int | None
    bos_token: str | None
    add_bos: bool
    bos_reason: str
    eos_id: int | None
    eos_token: str | None

    def card(self) -> dict:
        return {"bos_token": self.bos_token, "bos_token_id": self.bos_id, "bos_added": self.add_bos,
                "bos_reason": self.bos_reason, "eos_token": self.eos_token, "eos_token_id": self.eos_id,
                "eos_added": self.eos_id is not None}


def special_tokens(tokenizer: Any) -> SpecialTokens:
    """BOS as the model saw it. Llama/SOLAR tokenizers add `<s>` themselves, so we do too. A
    tokenizer that declares `add_bos_token` but whose fast backend does not add it gets it added.
    A BOS that the tokenizer does not add and that its chat template uses as a turn marker
    (SmolLM2: bos `<|im_start|>`) is not a document start, so it is not added. Otherwise a BOS
    the tokenizer has is added."""
    bos_id, bos = tokenizer.bos_token_id, tokenizer.bos_token
    eos = dict(eos_id=tokenizer.eos_token_id, eos_token=tokenizer.eos_token)
    if bos_id is None:
        return SpecialTokens(None, None, False, "the tokenizer has no BOS token", **eos)
    if tokenizer("a")["input_ids"][:1] == [bos_id]:
        return SpecialTokens(bos_id, bos, True, "the tokenizer adds BOS when encoding", **eos)
    if getattr(tokenizer, "add_bos_token", False):
        return SpecialTokens(bos_id, bos, True, "tokenizer_config sets add_bos_token", **eos)
    if bos in (getattr(tokenizer, "chat_template", None) or ""):
        return SpecialTokens(bos_id, bos, False, f"BOS {bos} is a turn marker in the chat template, not a document start", **eos)
    return SpecialTokens(bos_id, bos, True, "the tokenizer has a BOS token but does not add it itself", **eos)


class DocumentEncoder:
    """Renders documents with the template and tokenizes them in batches, framed by BOS/EOS."""

    def __init__(self, tokenizer: Any, template: Template, batch: int = 64):
        self.tokenizer, self.template, self.batch = tokenizer, template, batch
        self.specials = special_tokens(tokenizer)

    def text(self, doc: Document) -> str:
        return (doc if isinstance(doc, str) else self.template.render(doc)).rstrip()

    def encode(self, texts: list[str]) -> list[list[int]]:
        from transformers.utils import logging as hf_logging

        level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # "sequence longer than model_max_length" does not apply here
        try:
            batch = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        finally:
            hf_logging.set_verbosity(level)
        s = self.specials
        out = []
        for ids in batch:
            if s.add_bos and ids[:1] != [s.bos_id]:
                ids = [s.bos_id] + ids
            if s.eos_id is not None and ids[-1:] != [s.eos_id]:
                ids = ids + [s.eos_id]
            out.append(ids)
        return out

    def stream(self, docs: Iterable[Document]) -> Iterator[list[int]]:
        pending = []
        for doc in docs:
            pending.append(self.text(doc))
            if len(pending) == self.batch:
                yield from self.encode(pending)
                pending = []
        if pending:
            yield from self.encode(pending)


@dataclass
class Rows:
    """Rows taken from one source, and what happened to its documents."""

    rows: list[array] = field(default_factory=list)
    documents: int = 0  # documents that contributed tokens
    truncated: int = 0  # documents whose tail was not used
    dropped_short: int = 0  # documents shorter than seqlen, dropped (--short drop)
    lengths: list[int] = field(default_factory=list)  # token length of each contributing document

    @property
    def tokens(self) -> int:
        return sum(len(r) for r in self.rows)


def take_rows(token_docs: Iterable[list[int]], seqlen: int, short: str, need: int) -> Rows:
    """Up to `need` rows of `seqlen` tokens; fewer when the documents run out."""
    out = Rows()
    if need <= 0:
        return out
    buf = array("q")
    for ids in token_docs:
        if short == "drop" and len(ids) < seqlen:
            out.dropped_short += 1
            continue
        out.documents += 1
        out.lengths.append(len(ids))
        if short == "drop":
            k = min(len(ids) // seqlen, need - len(out.rows))
            out.rows += [array("q", ids[w * seqlen:(w + 1) * seqlen]) for w in range(k)]
            used = k * seqlen
        else:
            used = 0
            while used < len(ids) and len(out.rows) < need:
                take = min(seqlen - len(buf), len(ids) - used)
                buf.extend(ids[used:used + take])
                used += take
                if len(buf) == seqlen:
                    out.rows.append(buf)
                    buf = array("q")
        if used < len(ids):
            out.truncated += 1
        if len(out.rows) == need:
            break
    return out


def count_rows(token_docs: Iterable[list[int]], seqlen: int, short: str) -> int:
    """How many rows the documents can give in all (what `take_rows` yields with no quota)."""
    if short == "drop":
        return sum(len(ids) // seqlen for ids in token_docs)
    return sum(len(ids) for ids in token_docs) // seqlen


def length_histogram(lengths: Iterable[int]) -> dict[str, int]:
    """Document lengths in tokens, in power-of-two bins."""
    labels = [f"<={HISTOGRAM_EDGES[0]}"] + [f"{a + 1}-{b}" for a, b in zip(HISTOGRAM_EDGES, HISTOGRAM_EDGES[1:])]
    labels.append(f">{HISTOGRAM_EDGES[-1]}")
    counts = dict.fromkeys(labels, 0)
    for n in lengths:
        i = next((k for k, edge in enumerate(HISTOGRAM_EDGES) if n <= edge), len(HISTOGRAM_EDGES))
        counts[labels[i]] += 1
    return counts
