"""Generation fidelity: greedy answers of the baseline and each variant to the same prompts.

Per prompt: where the variant's greedy path first leaves the baseline's, the share of positions
with the same token, and the baseline's mean log-likelihood of the variant's answer (how
plausible fp16 finds what the variant said). A judge model (MT-bench) is out of reach offline;
these measure how much of fp16's behaviour the variant keeps, not how good it is.

Prompt file: JSON lines, each `{"id": ..., "messages": [{"role", "content"}, ...]}` (single- or
multi-turn, rendered with the SOLAR template or the tokenizer's own) or `{"id": ..., "prompt": "..."}`
(used as the user turn). Blank lines and lines starting with `#` are skipped.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from solar_quant.calibration.templates import ROLES, get_template
from solar_quant.errors import InputError, OptionError


@dataclass(frozen=True)
class Prompt:
    id: str
    text: str  # rendered
    ids: list[int]


def read_prompts(path: str) -> list[tuple[str, list[dict]]]:
    """(id, conversation) per line; a malformed line is an error naming FILE:LINE."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise InputError(f"--generate {path}: file not found; give a JSON-lines prompt file (see docs/evaluation-tasks.md)")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise InputError(f"--generate {path}: not UTF-8 text ({e.reason})") from None
    out, seen = [], set()
    for n, line in enumerate(lines, 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        where = f"{p}:{n}"
        try:
            doc = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{where}: not valid JSON ({e.msg}); one prompt object per line") from None
        conv = _conversation(doc, where)
        pid = str(doc.get("id", f"line{n}"))
        if pid in seen:
            raise InputError(f"{where}: id {pid!r} is used twice; prompt ids must be unique")
        seen.add(pid)
        out.append((pid, conv))
    if not out:
        raise InputError(f"--generate {path}: no prompts in the file")
    return out


def _conversation(doc, where: str) -> list[dict]:
    if not isinstance(doc, dict):
        raise InputError(f"{where}: expected an object with \"messages\" or \"prompt\"")
    if isinstance(doc.get("prompt"), str) and doc["prompt"].strip():
        return [{"role": "user", "content": doc["prompt"]}]
    msgs = doc.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise InputError(f"{where}: expected \"messages\": [{{\"role\": ..., \"content\": ...}}, ...] or \"prompt\": \"...\"")
    for m in msgs:
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise InputError(f"{where}: each message needs a role ({', '.join(ROLES)}) and a string content")
    if msgs[-1]["role"] != "user":
        raise InputError(f"{where}: the last message must be the user's turn (the model answers it)")
    return msgs


def resolve_template(name: str, tokenizer) -> str:
    if name == "auto":
        return "chat_template" if getattr(tokenizer, "chat_template", None) else "solar"
    if name == "chat_template" and not getattr(tokenizer, "chat_template", None):
        raise OptionError("--generate-template chat_template: the baseline's tokenizer has no chat_template; use solar or raw")
    return name


def render(prompts: list[tuple[str, list[dict]]], template: str, tokenizer, path: str, context: int,
           max_new_tokens: int) -> list[Prompt]:
    """Rendered, tokenized prompts; each must leave room for `max_new_tokens` within `context`."""
    tpl = get_template(template, tokenizer)
    special = template != "chat_template"  # a chat template writes its own special tokens
    out = []
    for pid, conv in prompts:
        text = tpl.render(conv)
        ids = tokenizer(text, add_special_tokens=special)["input_ids"]
        if len(ids) + max_new_tokens > context:
            raise OptionError(f"--generate {path}: prompt {pid!r} has {len(ids)} tokens, plus --max-new-tokens "
                              f"{max_new_tokens} exceeds the model's context of {context}; shorten it or lower --max-new-tokens")
        out.append(Prompt(pid, text, list(ids)))
    return out


def greedy(model, tokenizer, prompt: Prompt, max_new_tokens: int, device) -> list[int]:
    """The greedy continuation's token ids (ending at EOS when the model stops)."""
    from solar_quant.evaluate.scoring import quiet_bnb

    ids = torch.tensor([prompt.ids], device=device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.inference_mode(), quiet_bnb():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=pad, temperature=None, top_p=None, top_k=None)
    return out[0, ids.shape[1]:].tolist()


def mean_loglik(model, prompt: Prompt, answer: list[int], device) -> float:
    """Mean log-probability per token that `model` gives `answer` after the prompt."""
    if not answer:
        return math.nan
    ids = torch.tensor([prompt.ids + answer], device=device)
    with torch.inference_mode():
        logits = model(ids).logits[0, len(prompt.ids) - 1:-1].float()
    logp = torch.log_softmax(logits, dim=-1)
    target = torch.tensor(answer, device=logp.device)
    return logp.gather(1, target[:, None]).mean().item()


def compare(base: list[int], variant: list[int]) -> dict:
    """First position where the paths differ (None when identical), and the share of positions
    holding the same token over the longer of the two answers."""
    n = min(len(base), len(variant))
    first = next((i for i in range(n) if base[i] != variant[i]), None)
    if first is None and len(base) != len(variant):
        first = n
    same = sum(1 for i in range(n) if base[i] == variant[i])
    longest = max(len(base), len(variant))
    return {"first_divergence": first, "identical_share": same / longest if longest else 1.0,
            "identical": first is None}


def summary(rows: list[dict]) -> dict:
    """Across prompts: how many answers are identical, mean share, median first divergence."""
    if not rows:
        return {}
    firsts = sorted(r["first_divergence"] for r in rows if r["first_divergence"] is not None)
    lls = [r["base_loglik_of_variant"] for r in rows if r.get("base_loglik_of_variant") is not None
           and not math.isnan(r["base_loglik_of_variant"])]
    return {"prompts": len(rows), "identical": sum(r["identical"] for r in rows),
            "identical_share_mean": sum(r["identical_share"] for r in rows) / len(rows),
            "first_divergence_median": firsts[len(firsts) // 2] if firsts else None,  # over diverging answers
            "base_loglik_of_variant_mean": sum(lls) / len(lls) if lls else None}
