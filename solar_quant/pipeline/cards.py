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
               report: dict | None, eval_dir: Path) -> Path:
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
                       plots=plots, folder_bytes=sum(p.stat().st_size for p in folder.iterdir() if p.is_file()))
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
