"""Write each variant's model card (README.md) from the recipe, its record, plan and eval."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from solar_quant import registry
from solar_quant.architecture import LlamaShape
from solar_quant.card import render_card
from solar_quant.checkpoint.lock import OutputLock
from solar_quant.checkpoint.manifest import write_manifest
from solar_quant.checkpoint.writer import atomic_write_bytes
from solar_quant.registry import Variant
from solar_quant.recipe import Recipe, VariantSection
from solar_quant.rope import read_rope

FIT_GPUS = ("1x24GB", "1x48GB", "1x80GB", "2x80GB")
FIT_CONTEXTS = (4096, 10240)


def variant_of(options) -> Variant:
    """The `plan` variant that a recipe's quantize options produce (its method entry says)."""
    return registry.method(options.method).variant(options)


def fit_rows(shape: LlamaShape, variant: Variant) -> list[dict]:
    """For each context and GPU set: bytes and whether it fits (smallest set first)."""
    from solar_quant.gpus import parse_gpus
    from solar_quant.plan import plan

    rows = []
    for context in FIT_CONTEXTS:
        for spec in FIT_GPUS:
            (row,) = plan(shape, parse_gpus(spec), context=context, batch=1, variants=[variant], logits="last")
            rows.append({"context": context, "gpus": spec, "weights_gb": row.weight_bytes / 1e9,
                         "kv_cache_gb": row.kv_bytes / 1e9, "total_gb": row.total_bytes / 1e9,
                         "fits": f"yes ({len(row.gpus)} GPU)" if row.fits else "no"})
    return rows


def write_card(recipe: Recipe, recipe_path: Path, model_path: Path, v: VariantSection, folder: Path,
               report: dict | None, eval_dir: Path, rope_reports: dict[str, dict] | None = None) -> Path:
    record = json.loads((folder / "solar_quant.json").read_text())
    cfg = json.loads((folder / "config.json").read_text())
    shape = LlamaShape.from_config(cfg)
    rows, protocol, plots = [], None, []
    if report:
        rows, protocol, sources = card_section(report, folder, eval_dir)
        for src in sources:
            shutil.copyfile(src, folder / src.name)
            plots.append(src.name)
    variant = {"name": v.name, "method": v.quantize.method, "options": v.quantize.model_dump(), "rope": read_rope(cfg),
               "k_not_divisible": any(w.get("kind") == "partial_groups" for w in record.get("warnings") or [])}
    text = render_card(recipe_name=recipe_path.name, recipe_text=recipe_path.read_text(),
                       model_name=recipe.model.name, license=recipe.model.license, variant=variant, record=record,
                       fit_rows=fit_rows(shape, variant_of(v.quantize)), eval_rows=rows, eval_protocol=protocol,
                       plots=plots, folder_bytes=sum(p.stat().st_size for p in folder.iterdir() if p.is_file()),
                       tasks_text=tasks_section(report, folder, rope_reports or {}) if report else None,
                       serving_rope=serving_rope_line(variant["rope"], cfg, report, folder, rope_reports or {}))
    with OutputLock(folder):  # one writer per folder, as while it was staged
        atomic_write_bytes(folder / "README.md", text.encode())
        write_manifest(folder)
    return folder / "README.md"


def _entry(report: dict, folder: Path) -> dict | None:
    for m in report.get("models", []):
        if Path(m.get("path", "")).resolve() == Path(folder).resolve():
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
    base = next(m for m in report["models"] if m["role"] == "baseline")
    mine = _entry(report, folder)
    rows = []
    for m in (base, mine):
        if m is None:
            continue
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
    p = report["protocol"]
    short = p["sections"]["short"]
    protocol = {"text": f"{p['text']['source']} (sha256 {p['text']['sha256'][:16]}…, {p['tokens']} tokens)",
                "seqlen": short["seqlen"], "stride": short["stride"], "scored tokens": short["scored_tokens"],
                "KL": f"{p['kl']['method']} k={p['kl']['k']}", "rope override": p.get("rope_override") or "none",
                "trained length": p.get("trained_length") or "as configured", "dtype": p["dtype"],
                "device": p["device"]}
    contexts = [str(sec["context"]) for name, sec in p["sections"].items() if name != "short"]
    plots = [eval_dir / f"{kind}_by_position_c{contexts[-1]}.png" for kind in ("ppl", "kl")] if contexts else []
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
