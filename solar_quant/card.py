"""The model card (README.md inside each variant folder): what it is, how it was made,
what it costs, how it scored against fp16, and loading code that runs on transformers 5."""

from __future__ import annotations

import json
import re

BNB_METHODS = ("bnb-int8", "bnb-nf4", "bnb-fp4")
BNB_BLOCKSIZE = 64
GIB = 1024**3  # the card's one unit, as `solar-quant plan` prints it
FIT_COLUMNS = {"context": "context", "gpus": "GPUs", "weights_gib": "weights GiB", "kv_cache_gib": "KV cache GiB",
               "overhead_gib": "overhead GiB", "total_gib": "total GiB", "fits": "fits"}


def render_card(*, recipe_name: str | None, recipe_text: str | None, model_name: str, license: str | None,
                base_model: str | None, variant: dict, record: dict, fit_rows: list[dict], fit_note: str,
                eval_rows: list[dict], eval_protocol: dict | None, plots: list[str], folder_bytes: int) -> str:
    """`variant` = {"name", "method", "options", "rope", "partial_groups"}; rows are plain dicts.
    `recipe_text` is None for a folder made by `quantize` (the card then shows its options)."""
    made_by = f"from the recipe `{recipe_name}`" if recipe_text else "by `solar-quant quantize`"
    parts = [
        front_matter(license=license, base_model=base_model, variant=variant),
        f"# {variant['name']}",
        "",
        f"{_describe(variant)} of **{model_name}**, produced by solar-quant {record.get('version', '')} "
        f"{made_by}, streaming the 16-bit checkpoint one "
        f"{'tensor' if variant['method'] in BNB_METHODS else 'decoder layer'} at a time.",
        "",
        f"Licence: {license or 'not recorded: the same as the source checkpoint'} (carried over from the source model).",
        "",
        "## Files and size",
        "",
        f"Folder size {folder_bytes / GIB:.3f} GiB ({folder_bytes:,} bytes). `manifest.json` lists the sha256 of every file; "
        "`solar-quant verify` checks them and the format's invariants. `solar_quant.json` records the tool version, "
        "options, source checkpoint identity (name and sha256)"
        + (", calibration card and per-layer quantization error." if variant["method"] == "gptq" else "."),
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
    parts += ["## Load it", "", _loading_code(variant), "", "## Serve it", "", _serving(variant), ""]
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
    """Tags for the method and bits: `bitsandbytes`/`gptq`, `4-bit`, the data type or `rtn`."""
    m, o = v["method"], v["options"]
    if m == "bnb-int8":
        tags = ["bitsandbytes", "8-bit", "int8"]
    elif m in BNB_METHODS:
        tags = ["bitsandbytes", "4-bit", m[4:]] + (["double-quant"] if o.get("double_quant") else [])
    else:
        tags = ["gptq", f"{o.get('bits')}-bit"] + (["rtn"] if m == "rtn" else [])
    return ["solar-quant", "quantized", *tags]


_PLAIN_YAML = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/+-]*$")


def _yaml(value: str) -> str:
    """A YAML scalar: plain where it cannot be misread, else a JSON string (valid YAML)."""
    text = str(value)
    return text if _PLAIN_YAML.match(text) and text.lower() not in ("yes", "no", "true", "false", "null", "on", "off") \
        else json.dumps(text)


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
    refuse, it chooses the kernel that loads them (the variant dict lists those layers)."""
    bnb = v["method"] in BNB_METHODS
    extra = "pip install 'transformers>=5.24' accelerate bitsandbytes" if bnb else \
        "pip install 'transformers>=5.24' accelerate optimum gptqmodel"
    imports, before, kwargs, after = "AutoModelForCausalLM, AutoTokenizer", "", "", ""
    settings = "# Quantization and rope settings are read from config.json; nothing else to pass.\n"
    partial = v.get("partial_groups") or {}
    if not bnb and partial:
        o = v["options"]
        imports += ", GPTQConfig"
        settings = "# Quantization and rope settings are read from config.json; only the kernel is chosen here.\n"
        before = (f"# Some linears' inputs ({_ks(partial)}) are not a multiple of the group size {o.get('group_size')}: the "
                  "default CPU kernel and\n# Marlin refuse them; GPTQModel's torch kernel loads them on CPU and CUDA.\n"
                  f"kernel = GPTQConfig(bits={o.get('bits')}, group_size={o.get('group_size')}, "
                  f"desc_act={bool(o.get('act_order'))}, sym={bool(o.get('sym', True))}, backend=\"gptq_torch\")\n")
        kwargs = ", quantization_config=kernel"
    blocks = v.get("partial_blocks") or {}
    if bnb and v["method"] != "bnb-int8" and blocks:
        after = (f"# bitsandbytes' AVX-512-bf16 CPU kernel cannot repack layers whose inputs ({_ks(blocks)}) are not a "
                 f"multiple of its\n# blocksize {BNB_BLOCKSIZE}; those layers keep the generic kernel (same weights).\n"
                 "for m in model.modules():\n"
                 f"    if getattr(m, \"support_avx512bf16_for_cpu\", False) and m.in_features % {BNB_BLOCKSIZE}:\n"
                 "        m.support_avx512bf16_for_cpu = False\n")
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


def _ks(linears: dict[str, int]) -> str:
    return ", ".join(str(k) for k in sorted(set(linears.values())))


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
    if v.get("partial_groups"):
        lines.append("Note: some layers' input size is not a multiple of the group size; vLLM's Marlin kernels refuse "
                     "such layers (use `--quantization gptq` with the exllama/triton path or transformers).")
    return "\n".join(lines)
