"""Write each variant's model card (README.md) from the recipe, its record, plan and eval."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from solar_quant.architecture import LlamaShape
from solar_quant.card import render_card
from solar_quant.checkpoint.manifest import write_manifest
from solar_quant.formats.sizes import Variant
from solar_quant.recipe import Recipe, VariantSection
from solar_quant.rope import read_rope

FIT_GPUS = ("1x24GB", "1x48GB", "1x80GB", "2x80GB")
FIT_CONTEXTS = (4096, 10240)


def variant_of(options) -> Variant:
    """The `plan` variant that a recipe's quantize options produce."""
    if options.method.startswith("bnb-"):
        return Variant(options.method, double_quant=options.double_quant, bits=8 if options.method == "bnb-int8" else 4)
    return Variant("gptq", bits=options.bits, group_size=options.group_size, act_order=options.act_order)


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
               report: dict | None) -> Path:
    record = json.loads((folder / "solar_quant.json").read_text())
    cfg = json.loads((folder / "config.json").read_text())
    shape = LlamaShape.from_config(cfg)
    rows, protocol, plot = [], None, None
    if report:
        from solar_quant.evaluate.report import card_section

        rows, protocol, plot_src = card_section(report, folder)
        if plot_src and Path(plot_src).is_file():
            plot = "long_context.png"
            shutil.copyfile(plot_src, folder / plot)
    variant = {"name": v.name, "method": v.quantize.method, "options": v.quantize.model_dump(), "rope": read_rope(cfg),
               "k_not_divisible": bool(record.get("group_size_warnings"))}
    text = render_card(recipe_name=recipe_path.name, recipe_text=recipe_path.read_text(),
                       model_name=recipe.model.name, license=recipe.model.license, variant=variant, record=record,
                       fit_rows=fit_rows(shape, variant_of(v.quantize)), eval_rows=rows, eval_protocol=protocol,
                       plot_name=plot, folder_bytes=sum(p.stat().st_size for p in folder.iterdir() if p.is_file()))
    (folder / "README.md").write_text(text)
    write_manifest(folder)
    return folder / "README.md"


def eval_row_for(report: dict, folder: Path) -> dict:
    from solar_quant.evaluate.report import summary_row

    return summary_row(report, folder)
