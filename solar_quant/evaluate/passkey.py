"""Passkey retrieval: a 5-digit number hidden once at a depth of filler text, asked for at the end.

The prompt is built to fit a token budget; scoring accepts only the exact number as the first
run of digits the model writes (a prefix or a longer number is wrong).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass

import torch

from solar_quant.errors import OptionError

FILLER = ("The grass is green. ", "The sky is blue. ", "The sun is yellow. ", "Here we go. ", "There and back again. ")
INTRO = ("There is an important piece of information hidden inside a lot of irrelevant text. "
         "Find it and memorize it. I will quiz you about it.\n\n")
NEEDLE = "The pass key is {key}. Remember it. "
QUESTION = "\n\nWhat is the pass key?"
ANSWER_PREFIX = "The pass key is"
TEMPLATES = ("auto", "solar", "chat_template", "raw")
NEW_TOKENS = 10


@dataclass(frozen=True)
class PasskeyPrompt:
    text: str
    ids: list[int]
    key: str
    depth: float  # requested
    filler_before: int  # filler sentences before the needle
    filler_total: int


def make_key(rng: random.Random) -> str:
    return str(rng.randint(10000, 99999))


def content_text(key: str, before: int, after: int) -> str:
    filler = lambda lo, n: "".join(FILLER[i % len(FILLER)] for i in range(lo, lo + n))  # noqa: E731
    return INTRO + filler(0, before) + NEEDLE.format(key=key) + filler(before, after) + QUESTION


def resolve_template(template: str, tokenizer) -> str:
    if template not in TEMPLATES:
        raise OptionError(f"--passkey-template {template!r}: expected one of {', '.join(TEMPLATES)}")
    if template == "auto":
        return "chat_template" if getattr(tokenizer, "chat_template", None) else "solar"
    if template == "chat_template" and not getattr(tokenizer, "chat_template", None):
        raise OptionError("--passkey-template chat_template: the baseline's tokenizer has no chat_template; use solar or raw")
    return template


def wrap(content: str, template: str, tokenizer) -> tuple[str, bool]:
    """The full prompt text and whether the tokenizer should add its special tokens."""
    if template == "chat_template":
        head = tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                             add_generation_prompt=True)
        return head + ANSWER_PREFIX, False
    if template == "solar":
        from solar_quant.calibration.templates import SolarTemplate

        return SolarTemplate().render([{"role": "user", "content": content}]) + ANSWER_PREFIX, True
    return content + "\n" + ANSWER_PREFIX, True


def build_prompt(tokenizer, key: str, depth: float, budget: int, template: str) -> PasskeyPrompt:
    """The longest prompt of at most `budget` tokens with the needle after `depth` of the filler."""
    if not 0.0 <= depth <= 1.0:
        raise OptionError(f"--passkey-depths {depth}: depths are fractions between 0 and 1")

    def encode(n: int) -> tuple[str, list[int], int]:
        before = round(depth * n)
        text, special = wrap(content_text(key, before, n - before), template, tokenizer)
        return text, tokenizer(text, add_special_tokens=special)["input_ids"], before

    empty = len(encode(0)[1])
    per_sentence = max(1, (len(encode(50)[1]) - empty) / 50)
    n = max(0, int((budget - empty) / per_sentence))
    text, ids, before = encode(n)
    while len(ids) > budget and n > 0:
        n = max(0, n - max(1, (len(ids) - budget) // 2))
        text, ids, before = encode(n)
    if len(ids) > budget:
        raise OptionError(f"--context {budget + NEW_TOKENS}: too short for the passkey prompt ({len(ids)} tokens "
                          f"before any filler, plus {NEW_TOKENS} to answer); use a longer --context or --passkey-trials 0")
    return PasskeyPrompt(text, ids, key, depth, before, n)


def passkey_correct(generated: str, key: str) -> bool:
    """True only when the first number in `generated` is exactly `key`."""
    match = re.search(r"\d+", generated)
    return match is not None and match.group() == key


def generate_answer(model: torch.nn.Module, tokenizer, prompt: PasskeyPrompt, device: torch.device) -> str:
    ids = torch.tensor([prompt.ids], device=device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    from solar_quant.evaluate.scoring import quiet_bnb

    with torch.inference_mode(), quiet_bnb():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False,
                             pad_token_id=pad, temperature=None, top_p=None, top_k=None)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def trial_keys(seed: int, context: int, depth: float, trials: int) -> list[str]:
    rng = random.Random(f"{seed}-{context}-{depth}")
    return [make_key(rng) for _ in range(trials)]
