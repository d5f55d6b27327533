"""The model card (README.md inside each variant folder): what it is, how it was made,
what it costs, how it scored against fp16, and loading code that runs on transformers 5."""

from __future__ import annotations

import json

from solar_quant import registry


def render_card(*, recipe_name: str, recipe_text: str, model_name: str, license: str | None, variant: dict,
                record: dict, fit_rows: list[dict], eval_rows: list[dict], eval_protocol: dict | None,
                plots: list[str], folder_bytes: int, tasks_text: str | None = None,
                serving_rope: str | None = None) -> str:
    """`variant` = {"name", "method", "options", "rope"}; `fit_rows`/`eval_rows` are plain dicts.

    What is particular to the method (its description, what it streams, whether it records
    calibration) and to its format (install line, loading note, serving) comes from their entries.
    `tasks_text` (the lm-eval task table) and `serving_rope` (which rope each runtime applies) are
    added when the run measured them."""
    method = registry.method(variant["method"])
    parts = [
        f"# {variant['name']}",
        "",
        f"{method.describe(variant['options'])} of **{model_name}**, produced by solar-quant {record.get('version', '')} "
        f"from the recipe `{recipe_name}`, streaming the 16-bit checkpoint one "
        f"{method.streams} at a time.",
        "",
        f"Licence: {license or 'same as the source checkpoint'} (carried over from the source model).",
        "",
        "## Files and size",
        "",
        f"Folder size {folder_bytes / 1e9:.3f} GB ({folder_bytes:,} bytes). `manifest.json` lists the sha256 of every file; "
        "`solar-quant verify` checks them and the format's invariants. `solar_quant.json` records the tool version, "
        "options, source checkpoint identity" + (", calibration card and per-layer quantization error." if method.needs_calibration else "."),
        "",
        "## Rope scaling",
        "",
        _rope_text(variant["rope"]),
        "",
        "## Memory: which GPUs it fits (from `solar-quant plan`)",
        "",
        _table(fit_rows, ["context", "gpus", "weights_gb", "kv_cache_gb", "total_gb", "fits"]) if fit_rows else "_not computed_",
        "",
        "## Quality against fp16",
        "",
        _table(eval_rows, list(eval_rows[0].keys())) if eval_rows else "_not evaluated_",
        "",
    ]
    if eval_protocol:
        parts += ["Protocol: " + ", ".join(f"{k} = {v}" for k, v in eval_protocol.items()), ""]
    if plots:
        parts += ["Long context, by position (baseline and this variant, with the run's other variants):", "",
                  " ".join(f"![{name}]({name})" for name in plots), ""]
    if tasks_text:
        parts += ["## Task scores against fp16 (lm-eval)", "", tasks_text, ""]
    serve = _serving(variant) + (f"\n\n{serving_rope}" if serving_rope else "")
    parts += ["## Load it", "", _loading_code(variant), "", "## Serve it", "", serve, "",
              "## Recipe", "", "```toml", recipe_text.strip(), "```", ""]
    calib = record.get("calibration")
    if calib:
        parts += ["## Calibration set", "", "```json", json.dumps(calib, indent=2)[:6000], "```", ""]
    warnings = record.get("warnings") or []
    if warnings:
        parts += ["## Warnings", ""] + [f"- {w['message'] if isinstance(w, dict) else w}" for w in warnings] + [""]
    return "\n".join(parts)


def _rope_text(rope: dict) -> str:
    if rope.get("rope_type") in ("dynamic", "linear"):
        return (f"`config.json` carries `rope_parameters = {json.dumps(rope)}`: transformers applies {rope['rope_type']} "
                f"scaling ×{rope.get('factor')} by itself, so inputs past the trained length work without extra arguments.")
    return f"`config.json` carries `rope_parameters = {json.dumps(rope)}` (no scaling)."


def _table(rows: list[dict], cols: list[str]) -> str:
    head = "| " + " | ".join(cols) + " |\n|" + "---|" * len(cols)
    body = ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join([head, *body])


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def _loading_code(v: dict) -> str:
    fmt = registry.format_of_method(v["method"])
    extra = fmt.card_install
    note = fmt.card_loading_note(v) if fmt.card_loading_note else ""
    return f"""```bash
{extra}
```

```python
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

path = "{v['name']}"  # this folder
tokenizer = AutoTokenizer.from_pretrained(path)
# Quantization and rope settings are read from config.json; nothing else to pass.
model = AutoModelForCausalLM.from_pretrained(path, device_map="auto", dtype=torch.float16){note}
prompt = "### User:\\nThomas is healthy, but he has to go to the hospital. What could be the reasons?\\n\\n### Assistant:\\n"
inputs = tokenizer(prompt, return_tensors="pt").to(model.device)
out = model.generate(**inputs, max_new_tokens=256, do_sample=False)
print(tokenizer.decode(out[0][inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```

The seed's `load_in_8bit=True` / `rope_scaling={{"type": "dynamic", "factor": 2}}` arguments fail on
transformers 5 (`TypeError`); this folder needs neither."""


def _serving(v: dict) -> str:
    fmt = registry.format_of_method(v["method"])
    return fmt.card_serving(v) if fmt.card_serving else ""
