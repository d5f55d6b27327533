"""The model card (README.md inside each variant folder): what it is, how it was made,
what it costs, how it scored against fp16, and loading code that runs on transformers 5."""

from __future__ import annotations

import json

BNB_METHODS = ("bnb-int8", "bnb-nf4", "bnb-fp4")


def render_card(*, recipe_name: str, recipe_text: str, model_name: str, license: str | None, variant: dict,
                record: dict, fit_rows: list[dict], eval_rows: list[dict], eval_protocol: dict | None,
                plots: list[str], folder_bytes: int, tasks_text: str | None = None,
                serving_rope: str | None = None) -> str:
    """`variant` = {"name", "method", "options", "rope"}; `fit_rows`/`eval_rows` are plain dicts."""
    parts = [
        f"# {variant['name']}",
        "",
        f"{_describe(variant)} of **{model_name}**, produced by solar-quant {record.get('version', '')} "
        f"from the recipe `{recipe_name}`, streaming the 16-bit checkpoint one "
        f"{'tensor' if variant['method'] in BNB_METHODS else 'decoder layer'} at a time.",
        "",
        f"Licence: {license or 'same as the source checkpoint'} (carried over from the source model).",
        "",
        "## Files and size",
        "",
        f"Folder size {folder_bytes / 1e9:.3f} GB ({folder_bytes:,} bytes). `manifest.json` lists the sha256 of every file; "
        "`solar-quant verify` checks them and the format's invariants. `solar_quant.json` records the tool version, "
        "options, source checkpoint identity" + (", calibration card and per-layer quantization error." if variant["method"] == "gptq" else "."),
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


def _describe(v: dict) -> str:
    o = v["options"]
    m = v["method"]
    if m == "bnb-int8":
        return "A bitsandbytes LLM.int8() (8-bit) variant"
    if m in ("bnb-nf4", "bnb-fp4"):
        return f"A bitsandbytes {m[4:].upper()} 4-bit variant" + (" with double quantization" if o.get("double_quant") else "")
    g = o.get("group_size")
    grouping = "no grouping" if g == -1 else f"group size {g}"
    name = "GPTQ" if m == "gptq" else "round-to-nearest (RTN), GPTQ v1 layout,"
    clip = f"clipping search (norm {o['mse']}), " if o.get("mse") else ""
    return (f"A {name} {o.get('bits')}-bit variant ({grouping}, {'act-order, ' if o.get('act_order') else ''}{clip}"
            f"{'symmetric' if o.get('sym', True) else 'asymmetric'})")


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
    extra = "pip install 'transformers>=5.24' accelerate bitsandbytes" if v["method"] in BNB_METHODS else \
        "pip install 'transformers>=5.24' accelerate optimum gptqmodel"
    note = ""
    if v["method"] not in BNB_METHODS and v.get("k_not_divisible"):
        note = ("\n# Some layers' input size is not a multiple of the group size: on CPU pick the kernel that handles it:\n"
                "# from transformers import GPTQConfig\n"
                f"# model = AutoModelForCausalLM.from_pretrained(path, quantization_config=GPTQConfig(bits={v['options'].get('bits')}, backend=\"gptq_torch\"))\n")
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
    rope = v["rope"]
    max_len = 10240 if rope.get("rope_type") == "dynamic" else None
    if v["method"] in BNB_METHODS:
        return ("vLLM loads pre-quantized bitsandbytes folders: "
                f"`vllm serve {v['name']} --quantization bitsandbytes{' --max-model-len %d' % max_len if max_len else ''}`. "
                "TGI quantizes with bitsandbytes at load time from the 16-bit source instead "
                "(`--quantize bitsandbytes-nf4` / `bitsandbytes`), so serve this folder with transformers or vLLM.")
    lines = [f"vLLM: `vllm serve {v['name']} --quantization gptq{' --max-model-len %d' % max_len if max_len else ''}`.",
             f"TGI: `text-generation-launcher --model-id /data/{v['name']} --quantize gptq"
             + (f" --rope-scaling {rope['rope_type']} --rope-factor {rope.get('factor')} --max-total-tokens {max_len}" if max_len else "") + "`."]
    if v.get("k_not_divisible"):
        lines.append("Note: some layers' input size is not a multiple of the group size; vLLM's Marlin kernels refuse "
                     "such layers (use `--quantization gptq` with the exllama/triton path or transformers).")
    return "\n".join(lines)
