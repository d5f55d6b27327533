"""The model card (README.md inside each variant folder): what it is, how it was made,
what it costs, how it scored against fp16, and loading code that runs on transformers 5."""

from __future__ import annotations

import json
import re

from solar_quant import registry

GIB = 1024**3  # the card's one unit, as `solar-quant plan` prints it
FIT_COLUMNS = {"context": "context", "gpus": "GPUs", "weights_gib": "weights GiB", "kv_cache_gib": "KV cache GiB",
               "overhead_gib": "overhead GiB", "total_gib": "total GiB", "fits": "fits"}



def render_card(*, recipe_name: str | None, recipe_text: str | None, model_name: str, license: str | None,
                base_model: str | None, variant: dict, record: dict, fit_rows: list[dict], fit_note: str,
                eval_rows: list[dict], eval_protocol: dict | None, plots: list[str], folder_bytes: int,
                tasks_text: str | None = None, serving_rope: str | None = None) -> str:
    """`variant` = {"name", "method", "options", "rope", "partial_groups", "partial_blocks"}; rows are
    plain dicts. `recipe_text` is None for a folder made by `quantize` (the card then shows its options).

    What is particular to the method (its description, what it streams, whether it records
    calibration, its tags) and to its format (install line, loading code, serving) comes from their entries.
    `tasks_text` (the lm-eval task table) and `serving_rope` (which rope each runtime applies) are
    added when the run measured them."""
    method = registry.method(variant["method"])
    made_by = f"from the recipe `{recipe_name}`" if recipe_text else "by `solar-quant quantize`"
    parts = [
        front_matter(license=license, base_model=base_model, variant=variant),
        f"# {variant['name']}",
        "",
        f"{method.describe(variant['options'])} of **{model_name}**, produced by solar-quant {record.get('version', '')} "
        f"{made_by}, streaming the 16-bit checkpoint one {method.streams} at a time.",
        "",
        f"Licence: {license or 'not recorded: the same as the source checkpoint'} (carried over from the source model).",
        "",
        "## Files and size",
        "",
        f"Folder size {folder_bytes / GIB:.3f} GiB ({folder_bytes:,} bytes). `manifest.json` lists the sha256 of every file; "
        "`solar-quant verify` checks them and the format's invariants. `solar_quant.json` records the tool version, "
        "options, source checkpoint identity (name and sha256)"
        + (", calibration card and per-layer quantization error." if method.needs_calibration else "."),
        "",
        "## Rope scaling",
        "",
        _rope_text(variant["rope"]),
        "",
        "## Memory: which GPUs it fits (from `solar-quant plan`)",
        "",
        fit_note,
        "",
        _table(fit_rows, list(FIT_COLUMNS), FIT_COLUMNS) if fit_rows else "_not computed_",
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
    parts += ["## Load it", "", _loading_code(variant), "", "## Serve it", "", serve, ""]
    if recipe_text:
        parts += ["## Recipe", "", "```toml", recipe_text.strip(), "```", ""]
    else:
        parts += ["## Options", "", "```json", json.dumps(record.get("options", {}), indent=2), "```", ""]
    calib = record.get("calibration")
    if calib:
        parts += ["## Calibration set", "", "```json", json.dumps(calib, indent=2)[:6000], "```", ""]
    warnings = record.get("warnings") or []
    if warnings:
        parts += ["## Warnings", ""] + [f"- {w['message'] if isinstance(w, dict) else w}" for w in warnings] + [""]
    return "\n".join(parts)


def front_matter(*, license: str | None, base_model: str | None, variant: dict) -> str:
    """The YAML block the Hub reads: licence, base model and relation, library, task, tags."""
    meta = [("license", license or "other")]
    if base_model:
        meta += [("base_model", base_model), ("base_model_relation", "quantized")]
    meta += [("library_name", "transformers"), ("pipeline_tag", "text-generation")]
    lines = ["---"] + [f"{k}: {_yaml(v)}" for k, v in meta] + ["tags:"] + [f"- {_yaml(t)}" for t in card_tags(variant)]
    return "\n".join(lines + ["---", ""])


def card_tags(v: dict) -> list[str]:
    """Tags for the method and bits (`bitsandbytes`/`gptq`, `4-bit`, `nf4`/`rtn`…), from the method's entry."""
    tags = registry.method(v["method"]).card_tags
    return ["solar-quant", "quantized", *(tags(v["options"]) if tags else ())]


_PLAIN_YAML = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/+-]*$")


def _yaml(value: str) -> str:
    """A YAML scalar: plain where it cannot be misread, else a JSON string (valid YAML)."""
    text = str(value)
    return text if _PLAIN_YAML.match(text) and text.lower() not in ("yes", "no", "true", "false", "null", "on", "off") \
        else json.dumps(text)


def _rope_text(rope: dict) -> str:
    if rope.get("rope_type") in ("dynamic", "linear"):
        return (f"`config.json` carries `rope_parameters = {json.dumps(rope)}`: transformers applies {rope['rope_type']} "
                f"scaling ×{rope.get('factor')} by itself, so inputs past the trained length work without extra arguments.")
    return f"`config.json` carries `rope_parameters = {json.dumps(rope)}` (no scaling)."


def _table(rows: list[dict], cols: list[str], labels: dict[str, str] | None = None) -> str:
    labels = labels or {}
    head = "| " + " | ".join(labels.get(c, c) for c in cols) + " |\n|" + "---|" * len(cols)
    body = ["| " + " | ".join(_fmt(r.get(c)) for c in cols) + " |" for r in rows]
    return "\n".join([head, *body])


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def _loading_code(v: dict) -> str:
    """Code that runs as written on CPU and CUDA: where a folder has layers the default kernels
    refuse, its format entry adds the lines that choose a kernel that loads them."""
    fmt = registry.format_of_method(v["method"])
    extra = fmt.card_install
    parts = fmt.card_loading(v) if fmt.card_loading else {}
    imports = "AutoModelForCausalLM, AutoTokenizer" + (f", {parts['imports']}" if parts.get("imports") else "")
    before, kwargs, after = parts.get("before", ""), parts.get("kwargs", ""), parts.get("after", "")
    settings = ("# Quantization and rope settings are read from config.json; "
                + ("only the kernel is chosen here.\n" if kwargs else "nothing else to pass.\n"))
    return f"""```bash
{extra}
```

```python
import torch
from transformers import {imports}

path = "{v['name']}"  # this folder
tokenizer = AutoTokenizer.from_pretrained(path)
{settings}{before}model = AutoModelForCausalLM.from_pretrained(path, device_map="auto", dtype=torch.float16{kwargs})
{after}prompt = "### User:\\nThomas is healthy, but he has to go to the hospital. What could be the reasons?\\n\\n### Assistant:\\n"
inputs = tokenizer(prompt, return_tensors="pt").to(model.device)
out = model.generate(**inputs, max_new_tokens=256, do_sample=False)
print(tokenizer.decode(out[0][inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```

The seed's `load_in_8bit=True` / `rope_scaling={{"type": "dynamic", "factor": 2}}` arguments fail on
transformers 5 (`TypeError`); this folder needs neither."""


def _serving(v: dict) -> str:
    fmt = registry.format_of_method(v["method"])
    return fmt.card_serving(v) if fmt.card_serving else ""
