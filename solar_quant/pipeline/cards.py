"""Write (or refresh) a variant folder's model card (README.md) from its record, plan and eval.

`run` writes the card after evaluating, from the recipe; `solar-quant card OUT [--report R]`
writes or refreshes it for any folder made by `quantize` or `run`. A run keeps the recipe it
came from as `recipe.toml` in the folder (local paths shortened to their names), so a refresh
restores the recipe's licence, base model and text. No card or record carries a local path.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from solar_quant import registry
from solar_quant.architecture import LlamaShape
from solar_quant.card import GIB, render_card
from solar_quant.checkpoint.lock import OutputLock
from solar_quant.checkpoint.manifest import write_manifest
from solar_quant.errors import InputError
from solar_quant.formats.sizes import BNB_BLOCKSIZE
from solar_quant.recipe import Recipe
from solar_quant.registry import Variant
from solar_quant.rope import read_rope
from solar_quant.variant import RECORD_NAME

FIT_GPUS = ("1x24GB", "1x48GB", "1x80GB", "2x80GB")
FIT_CONTEXTS = (4096, 10240)
FIT_LOGITS = "last"  # the card's table is for generation (serving); eval's all-position scoring needs more
RECIPE_COPY = "recipe.toml"


def variant_of(options) -> Variant:
    """The `plan` variant that quantize options produce (its method entry says), from the typed
    options or from the dict a folder's solar_quant.json records."""
    if isinstance(options, dict):
        entry = registry.method(options["method"])
        options = entry.options(**{k: v for k, v in options.items() if k in entry.options.model_fields})
    return registry.method(options.method).variant(options)


def fit_rows(shape: LlamaShape, variant: Variant) -> list[dict]:
    """For each context and GPU set: GiB and whether it fits (the numbers `plan --logits last` prints)."""
    from solar_quant.gpus import parse_gpus
    from solar_quant.plan import plan

    rows = []
    for context in FIT_CONTEXTS:
        for spec in FIT_GPUS:
            (row,) = plan(shape, parse_gpus(spec), context=context, batch=1, variants=[variant], logits=FIT_LOGITS)
            rows.append({"context": context, "gpus": spec, "weights_gib": round(row.weight_bytes / GIB, 3),
                         "kv_cache_gib": round(row.kv_bytes / GIB, 3), "overhead_gib": round(row.overhead_bytes / GIB, 3),
                         "total_gib": round(row.total_bytes / GIB, 3),
                         "fits": f"yes ({len(row.gpus)} GPU)" if row.fits else "no"})
    return rows


def fit_note(variant: Variant, name: str) -> str:
    """The memory table's assumptions, and the `plan` command that prints the same numbers."""
    return (f"Assumptions: generation (serving), batch 1, only the last position's logits kept (`plan --logits "
            f"{FIT_LOGITS}`); fp16 KV cache; per GPU used, 1 GiB CUDA context + prefill activations"
            + ("" if variant.method == "fp16" else " + one fp16 copy of the largest Linear") +
            ". Scoring every position, as `solar-quant eval` does, needs up to context × vocab × 10.52 bytes more on "
            "the GPU holding lm_head (`plan --logits all`). GiB = 2^30 bytes. One row, reproduced: "
            f"`solar-quant plan {name} --variants {variant.name} --gpus {FIT_GPUS[2]} --context {FIT_CONTEXTS[0]} "
            f"--logits {FIT_LOGITS}`.")


def write_card(folder: str | Path, *, report: dict | None = None, eval_dir: Path | None = None,
               recipe: Recipe | None = None, recipe_text: str | None = None, recipe_name: str | None = None,
               license: str | None = None, base_model: str | None = None,
               rope_reports: dict[str, dict] | None = None) -> Path:
    """Write `folder`/README.md atomically and refresh manifest.json; returns the card's path.

    Without `recipe`, the folder's own `recipe.toml` (kept by `run`) is used when present.
    `license` / `base_model` override the recipe's and the source's; `rope_reports` are the run's
    extra evaluations under other rope settings (their task scores and the serving-rope line)."""
    from solar_quant.formats.gptq_runtime import partial_group_linears

    folder = Path(folder)
    record, cfg = _read_folder(folder)
    keep_recipe = recipe_text is not None
    if recipe is None and (folder / RECIPE_COPY).is_file():
        from solar_quant.recipe import load_recipe

        recipe, recipe_text, recipe_name = load_recipe(folder / RECIPE_COPY), (folder / RECIPE_COPY).read_text(), \
            (recipe_name or RECIPE_COPY)
    source = record.get("source") or {}
    model = recipe.model if recipe else None
    base_model = base_model or (model.base_model if model else None) or source.get("model_id")
    license = license or (model.license if model else None) or source.get("license")
    model_name = (model.name if model and model.name != "model" else None) or \
        (base_model.rsplit("/", 1)[-1] if base_model else None) or source.get("name") or "the source checkpoint"
    method, options = record["method"], record.get("options") or {}
    rows, protocol, plots = [], None, []
    if report:
        rows, protocol, sources = card_section(report, folder, eval_dir or folder)
        for src in sources:
            if src.resolve() != (folder / src.name).resolve():
                shutil.copyfile(src, folder / src.name)
            plots.append(src.name)
    plan_variant = variant_of({**options, "method": method})
    shape = LlamaShape.from_config(cfg)
    variant = {"name": folder.name, "method": method, "options": options, "rope": read_rope(cfg),
               "partial_groups": partial_group_linears(folder),
               "partial_blocks": {n: k for n, (_, k) in shape.linear_shapes().items() if k % BNB_BLOCKSIZE}}
    recipe_text = without_local_paths(recipe_text) if recipe_text is not None else None
    text = render_card(recipe_name=recipe_name, recipe_text=recipe_text, model_name=model_name, license=license,
                       base_model=base_model, variant=variant, record=record,
                       fit_rows=fit_rows(shape, plan_variant),
                       fit_note=fit_note(plan_variant, folder.name), eval_rows=rows, eval_protocol=protocol,
                       plots=plots, folder_bytes=_folder_bytes(folder),
                       tasks_text=tasks_section(report, folder, rope_reports or {}) if report else None,
                       serving_rope=serving_rope_line(variant["rope"], cfg, report, folder, rope_reports or {}))
    from solar_quant.checkpoint.writer import atomic_write_bytes
    from solar_quant.signals import deferred

    # one writer per folder, as while it was staged; Ctrl-C/SIGTERM never leave a card the manifest does not cover
    with OutputLock(folder), deferred():
        if keep_recipe:
            atomic_write_bytes(folder / RECIPE_COPY, recipe_text.encode())
        atomic_write_bytes(folder / "README.md", text.encode())
        write_manifest(folder)
    return folder / "README.md"


def _read_folder(folder: Path) -> tuple[dict, dict]:
    if not folder.is_dir():
        raise InputError(f"{folder}: no such folder; pass a variant folder written by `solar-quant quantize` or `run`")
    try:
        record = json.loads((folder / RECORD_NAME).read_text())
        cfg = json.loads((folder / "config.json").read_text())
    except FileNotFoundError as e:
        raise InputError(f"{folder}: no {Path(e.filename).name}; pass a variant folder written by "
                         "`solar-quant quantize` or `run`") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{folder}: {RECORD_NAME} or config.json is not valid JSON ({e})") from None
    if not isinstance(record, dict) or record.get("method") not in registry.methods():
        raise InputError(f"{folder}/{RECORD_NAME}: no known quantization method recorded; pass a folder written by "
                         "`solar-quant quantize`")
    return record, cfg


def _folder_bytes(folder: Path) -> int:
    """The folder's size as published (the card itself excluded: it cannot count its own bytes)."""
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file() and p.name != "README.md")


_QUOTED = re.compile(r"""(?P<q>["'])(?P<path>(?:/|~[/\\]|[A-Za-z]:[\\/])[^"'\n]*)(?P=q)""")


def without_local_paths(text: str) -> str:
    """A recipe with every absolute local path shortened to its last component; the record's
    sha256s identify what the paths pointed at."""
    return _QUOTED.sub(lambda m: m["q"] + (re.split(r"[\\/]", m["path"].rstrip("/\\"))[-1] or "/") + m["q"], text)


def _entry(report: dict, folder: Path) -> dict | None:
    """The report's entry for `folder`, by name (reports written before names only: by path)."""
    for m in report.get("models", []):
        if m.get("role") == "variant" and m.get("name") == folder.name:
            return m
    for m in report.get("models", []):
        if m.get("path") and Path(m["path"]).resolve() == folder.resolve():
            return m
    return None


def eval_row_for(report: dict, folder: Path) -> dict:
    """The summary-table numbers of one variant: short-context ppl, ratio, KL, top-1, and each long context."""
    m = _entry(report, folder)
    if m is None:
        return {}
    s = m["short"]
    row = {"ppl": s.get("ppl"), "ppl_ratio": s.get("ppl_ratio"), "kl_mean": s.get("kl_mean"), "top1": s.get("top1")}
    for c, sec in (m.get("long") or {}).items():
        row[f"ratio@{c}"] = sec["overall"].get("ppl_ratio")
    failed = [g["check"] for g in report.get("gates", {}).get("results", []) if g["model"] == m["name"] and not g["passed"]]
    row["gates"] = "FAIL: " + ", ".join(failed) if failed else "pass"
    return row


def card_section(report: dict, folder: Path, eval_dir: Path) -> tuple[list[dict], dict, list[Path]]:
    """(rows for the card's quality table, protocol line, the long-context plots)."""
    try:
        base = next(m for m in report["models"] if m["role"] == "baseline")
        p = report["protocol"]
    except (KeyError, TypeError, StopIteration):
        raise InputError(f"{eval_dir}: the report has no baseline or protocol; pass a report.json written by "
                         "`solar-quant eval`") from None
    mine = _entry(report, folder)
    if mine is None:
        names = ", ".join(m.get("name", "?") for m in report["models"] if m.get("role") == "variant")
        raise InputError(f"{folder}: the report does not cover this folder (its variants: {names}); pass the "
                         "report.json of an eval that included it")
    rows = []
    for m in (base, mine):
        s = m["short"]
        rows.append({"model": "fp16 baseline" if m is base else m["name"], "section": "short", "ppl": s.get("ppl"),
                     "ppl ratio": s.get("ppl_ratio"), "KL mean": s.get("kl_mean"), "KL p99": s.get("kl_p99"),
                     "top-1": s.get("top1")})
        for c, sec in (m.get("long") or {}).items():
            o = sec["overall"]
            rows.append({"model": "fp16 baseline" if m is base else m["name"], "section": f"context {c}",
                         "ppl": o.get("ppl"), "ppl ratio": o.get("ppl_ratio"), "KL mean": o.get("kl_mean"),
                         "KL p99": o.get("kl_p99"), "top-1": o.get("top1")})
        for c, depths in (m.get("passkey") or {}).items():
            rows.append({"model": "fp16 baseline" if m is base else m["name"], "section": f"passkey {c}",
                         "ppl": None, "ppl ratio": None, "KL mean": None, "KL p99": None,
                         "top-1": ", ".join(f"depth {d}: {v['accuracy']:.2f}" for d, v in depths.items())})
    short = p["sections"]["short"]
    text_name = re.split(r"[\\/]", p["text"]["source"])[-1] if p["text"]["source"].startswith("/") else p["text"]["source"]
    protocol = {"text": f"{text_name} (sha256 {p['text']['sha256'][:16]}…, {p['tokens']} tokens)",
                "seqlen": short["seqlen"], "stride": short["stride"], "scored tokens": short["scored_tokens"],
                "KL": f"{p['kl']['method']} k={p['kl']['k']}", "rope override": p.get("rope_override") or "none",
                "trained length": p.get("trained_length") or "as configured", "dtype": p["dtype"],
                "device": p["device"]}
    contexts = [str(sec["context"]) for name, sec in p["sections"].items() if name != "short"]
    plots = [Path(eval_dir) / f"{kind}_by_position_c{contexts[-1]}.png" for kind in ("ppl", "kl")] if contexts else []
    return rows, protocol, [p for p in plots if p.is_file()]


def _pct(x) -> str:
    return "" if x is None or x != x else f"{100 * x:.1f}"


def _task_avg(entry: dict | None) -> float | None:
    tasks = (entry or {}).get("tasks") or {}
    scores = [t["score"] for t in tasks.values() if t.get("score") == t.get("score")]
    return sum(scores) / len(scores) if scores and len(scores) == len(tasks) else None


def tasks_section(report: dict, folder: Path, rope_reports: dict[str, dict]) -> str | None:
    """The card's task table: published fp16, our fp16, this variant (delta, interval, flips), and
    this variant under each extra rope the recipe evaluated (e.g. as vLLM serves it)."""
    base = next(m for m in report["models"] if m["role"] == "baseline")
    mine = _entry(report, folder)
    if not base.get("tasks") or mine is None:
        return None
    p = report["protocol"]
    extra = {rope: _entry(r, folder) for rope, r in rope_reports.items()}
    head = ["task", "metric", "published fp16", f"fp16 (ours, rope {p.get('rope_override') or 'as configured'})",
            "this variant", "Δ [95 % CI]", "flips"] + [f"this variant, rope {rope}" for rope in extra]
    rows = []
    for label, b in base["tasks"].items():
        t = mine["tasks"][label]
        row = [label, b["metric"], _pct(b.get("reference")), f"{_pct(b['score'])} ± {_pct(b['stderr'])}",
               f"{_pct(t['score'])} ± {_pct(t['stderr'])}",
               f"{100 * t['delta']:+.1f} [{100 * t['low']:+.1f}, {100 * t['high']:+.1f}]", f"{_pct(t['flips'])} %"]
        for rope, e in extra.items():
            x = (e or {}).get("tasks", {}).get(label)
            row.append(f"{_pct(x['score'])} (Δ {100 * x['delta']:+.1f}, flips {_pct(x['flips'])} %)" if x else "")
        rows.append(row)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]
    tp = p["tasks"]
    from solar_quant.evaluate.behaviour import h4_average

    if h4_average(base["tasks"]) is not None:
        published = {k.lower(): v for k, v in (tp.get("reference") or {}).items()}.get("h4")
        avg = [f"fp16 (ours) {_pct(h4_average(base['tasks']))}", f"this variant {_pct(h4_average(mine['tasks']))}"]
        avg += [f"this variant, rope {rope} {_pct(h4_average((e or {}).get('tasks') or {}))}" for rope, e in extra.items()]
        lines.append("")
        lines.append("H4 average: " + (f"published fp16 {published:.1f}, " if published is not None else "") + ", ".join(avg) + ".")
    note = (f"Scores in percent; lm-eval {tp['lm_eval']}, limit {tp['limit'] or 'none'}, seeds {tp['seeds']['fewshot_random_seed']} "
            "(few-shot). Flips: share of items whose correct/incorrect outcome differs from fp16's on the same items.")
    if tp.get("reference_source"):
        note += f" Published: {tp['reference_source']}."
    return "\n".join(lines) + "\n\n" + note


def serving_rope_line(rope: dict, cfg: dict, report: dict | None, folder: Path, rope_reports: dict[str, dict]) -> str | None:
    """Which rope each runtime applies to this folder, and what the static one costs where measured."""
    from solar_quant.rope import static_ntk_base

    if rope.get("rope_type") != "dynamic" or not rope.get("factor"):
        return None
    f = float(rope["factor"])
    dim = int(cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"])
    theta = float(rope["rope_theta"])
    line = (f"Rope per runtime: transformers applies dynamic NTK ×{f:g}, unchanged up to the trained "
            f"{cfg.get('max_position_embeddings')} tokens and rescaled per sequence past them; vLLM's "
            f"`DynamicNTKScalingRotaryEmbedding` (releases before its May 2026 fix, PR 41277) uses one static base "
            f"{static_ntk_base(theta, f, dim):.4g} (×{static_ntk_base(1.0, f, dim):.3g}) at every length, the base "
            f"transformers reaches only at {f:g}× the trained length; releases after the fix keep base {theta:g}.")
    key = f"ntk-static:{f:g}"
    other = rope_reports.get(key)
    if report and other:
        here, there = _entry(report, folder), _entry(other, folder)
        a, b = _task_avg(here), _task_avg(there)
        ra, rb = (here or {}).get("short", {}).get("ppl"), (there or {}).get("short", {}).get("ppl")
        parts = []
        if a is not None and b is not None:
            parts.append(f"mean task score {100 * a:.1f} under transformers' rope vs {100 * b:.1f} under `{key}`")
        if ra is not None and rb is not None:
            parts.append(f"short-context perplexity {ra:.4g} vs {rb:.4g}")
        if parts:
            line += " Measured by this recipe (`eval --rope-scaling " + key + "`): " + "; ".join(parts) + "."
    return line
