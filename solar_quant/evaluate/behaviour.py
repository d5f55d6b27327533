"""`eval`'s task and generation steps: checked in `prepare`, run on each loaded model.

Kept apart from `run.py` (perplexity, KL, passkey): this is what the models *answer*, scored
through lm-eval tasks (`tasks.py`, `paired.py`) and greedy generation (`generation.py`).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from pathlib import Path

from solar_quant.errors import OptionError
from solar_quant.evaluate import generation as gen
from solar_quant.evaluate import tasks as tk
from solar_quant.options import EvalOptions
from solar_quant.rope import STATIC_NTK, RopeScaling


@dataclass
class Behaviour:
    """What prepare() resolved for the task and generation steps (empty when neither was asked for)."""

    specs: list = field(default_factory=list)
    manager: object = None
    dirs: list = field(default_factory=list)
    context: int = 0
    prompts: list = field(default_factory=list)
    protocol: dict = field(default_factory=dict)

    @property
    def active(self) -> bool:
        return bool(self.specs or self.prompts)


def allowed_context(rope: dict, override: RopeScaling | None) -> int:
    """Tokens a model may take: the trained length, times the factor when rope scaling extends it."""
    mpe = int(rope["max_position_embeddings"])
    if override is not None and override.kind == STATIC_NTK:
        return int(mpe * override.factor)  # vLLM's cos/sin cache length
    if rope.get("rope_type") in ("dynamic", "linear") and rope.get("factor"):
        return int(mpe * float(rope["factor"]))
    return mpe


def prepare_behaviour(opts: EvalOptions, tokenizer, base_rope: dict, override: RopeScaling | None) -> Behaviour:
    """Every check of --tasks/--task-dir/--generate, before any model loads."""
    b = Behaviour(context=allowed_context(base_rope, override))
    if opts.task_dir and not opts.tasks:
        tk.check_task_dir(opts.task_dir)
    if opts.tasks:
        tk.require_lm_eval()
        b.specs = tk.parse_tasks(opts.tasks)
        if not b.specs:
            raise OptionError("--tasks: no task names given")
        bundled = tk.bundled_task_dir()
        b.dirs = [d for d in (bundled if bundled.is_dir() else None,
                              tk.check_task_dir(opts.task_dir) if opts.task_dir else None) if d is not None]
        b.manager = tk.task_manager(b.specs, b.dirs)
        probe = tk.probe(b.specs, b.manager, b.dirs, tokenizer, b.context, opts.limit)
        from importlib import metadata

        b.protocol["tasks"] = {"tasks": [s.label() for s in b.specs], "limit": opts.limit, "seeds": tk.SEEDS,
                               "batch_size": opts.task_batch_size, "context": b.context, "requests": probe,
                               "lm_eval": metadata.version("lm-eval"), "task_dirs": [str(d) for d in b.dirs],
                               "files_sha256": _dir_digest(b.dirs), "metrics": {s.label(): s.metric for s in b.specs},
                               "reference": dict(opts.task_reference) or None,
                               "reference_source": opts.task_reference_source}
    if opts.generate:
        template = gen.resolve_template(opts.generate_template, tokenizer)
        raw = gen.read_prompts(opts.generate)
        b.prompts = gen.render(raw, template, tokenizer, opts.generate, b.context, opts.max_new_tokens)
        text = Path(opts.generate).expanduser().read_bytes()
        b.protocol["generation"] = {"file": str(opts.generate), "sha256": hashlib.sha256(text).hexdigest(),
                                    "template": template, "max_new_tokens": opts.max_new_tokens,
                                    "prompts": len(b.prompts), "decoding": "greedy",
                                    "prompt_tokens": [len(p.ids) for p in b.prompts]}
    return b


def _dir_digest(dirs: list[Path]) -> str:
    h = hashlib.sha256()
    for d in dirs:
        for f in sorted(p for p in d.rglob("*") if p.is_file() and p.suffix in (".yaml", ".yml", ".jsonl", ".json", ".py")):
            h.update(str(f.relative_to(d)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def run_on(model, tokenizer, b: Behaviour, opts: EvalOptions, device, log) -> dict:
    """{"tasks": {...}, "generation": [...]} for one loaded model."""
    out: dict = {}
    if b.specs:
        out["tasks"] = tk.score_tasks(model, tokenizer, b.specs, b.manager, b.dirs, b.context, opts.limit,
                                      opts.task_batch_size, log)
    if b.prompts:
        from solar_quant import progress

        bar = progress.Progress(len(b.prompts), "generate")
        rows = []
        for p in b.prompts:
            rows.append({"id": p.id, "tokens_ids": gen.greedy(model, tokenizer, p, opts.max_new_tokens, device)})
            bar.step("prompts")
        out["generation"] = rows
    return out


def decorate_variant(result: dict, base: dict, tokenizer) -> dict:
    """Add paired task measures and per-prompt generation comparisons to a variant's result."""
    out = dict(result)
    if "tasks" in result:
        paired = tk.paired_rows(base["tasks"], result["tasks"])
        out["tasks"] = {k: {**v, **paired[k]} for k, v in result["tasks"].items()}
    if "generation" in result:
        rows = []
        for bv, vv in zip(base["generation"], result["generation"]):
            cmp = gen.compare(bv["tokens_ids"], vv["tokens_ids"])
            rows.append({"id": vv["id"], "tokens": len(vv["tokens_ids"]), **cmp, "tokens_ids": vv["tokens_ids"],
                         "text": tokenizer.decode(vv["tokens_ids"], skip_special_tokens=True)})
        out["generation"] = rows
    return out


def decorate_baseline(result: dict, tokenizer, opts: EvalOptions) -> dict:
    out = dict(result)
    if "tasks" in result:
        ref = {k.lower(): v for k, v in opts.task_reference.items()}
        out["tasks"] = {k: {**v, "reference": ref[v["task"].lower()] / 100 if v["task"].lower() in ref else None}
                        for k, v in result["tasks"].items()}
    if "generation" in result:
        out["generation"] = [{**r, "tokens": len(r["tokens_ids"]),
                              "text": tokenizer.decode(r["tokens_ids"], skip_special_tokens=True)}
                             for r in result["generation"]]
    return out


def score_answers(model, b: Behaviour, entries: list[dict], device) -> None:
    """With the baseline loaded again: its mean log-likelihood of every model's answers."""
    for e in entries:
        rows = e.get("generation") or []
        for p, row in zip(b.prompts, rows):
            key = "base_loglik" if e["role"] == "baseline" else "base_loglik_of_variant"
            row[key] = gen.mean_loglik(model, p, row["tokens_ids"], device)
        if e["role"] == "variant" and rows:
            e["generation_summary"] = gen.summary(rows)


def h4_average(tasks: dict) -> float | None:
    """The leaderboard-v1 average when all four H4 tasks ran."""
    want = [s.label() for s in tk.H4]
    if not all(k in tasks for k in want):
        return None
    vals = [tasks[k]["score"] for k in want]
    return sum(vals) / 4 if all(v is not None and not math.isnan(v) for v in vals) else None
