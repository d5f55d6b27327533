"""The bitsandbytes format entry (LLM.int8, nf4, fp4 as transformers 5 saves them): config keys,
tensor layout, invariants, inspect, eval loading and card text.

The layout of one quantized Linear (checked against transformers' `save_pretrained` in
tests/test_plan.py):
- LLM.int8: `weight` I8 [out, in], `SCB` F32 [out], `weight_format` U8 scalar.
- 4-bit (nf4 / fp4), blocksize 64: `weight` U8 [ceil(n/2), 1] (n = out*in),
  `weight.absmax` F32 [ceil(n/64)], `weight.quant_map` F32 [16] and
  `weight.quant_state.bitsandbytes__<type>` U8 = the JSON of the non-tensor fields, packed
  as bitsandbytes 0.50.2's `QuantState.as_dict(packed=True)` does (`json.dumps`, UTF-8).
  Double quant: absmax becomes U8, plus `weight.nested_absmax` F32 [ceil(blocks/256)] and
  `weight.nested_quant_map` F32 [256]; the JSON gains nested_blocksize, nested_dtype and
  nested_offset (the mean of the absmax values, a data-dependent float: see NESTED_OFFSET).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

from solar_quant.errors import OptionError
from solar_quant.registry import FormatEntry, Variant, register_format

BLOCKSIZE = 64
NESTED_BLOCKSIZE = 256
# nested_offset is the mean absmax of a weight, a float32 value written with Python's repr,
# so its length depends on the data (mostly 17-20 characters for offsets in 0.01-0.2).
# Plans assume this typical value (19 characters); a real file differs from the plan by a
# few bytes per Linear (tests/test_plan.py bounds it).
NESTED_OFFSET = 0.04391330108046532
KINDS = ("bnb-int8", "bnb-nf4", "bnb-fp4")
DTYPE_NAMES = ("float16", "bfloat16", "float32")
# A stored bitsandbytes weight may be at most this much worse than a fresh quantization of its source
# (a variant made on a GPU may round a few ties differently).
ERROR_SLACK = 1.01


def quant_type(variant: Variant) -> str:
    return variant.kind.removeprefix("bnb-")


# -- tensor layout (plan, verify) -------------------------------------------------------------
def quant_state_json(quant_type: str, out_features: int, in_features: int, dtype: str = "float16",
                     double_quant: bool = False, nested_offset: float = NESTED_OFFSET) -> bytes:
    """The packed quant_state bytes, key for key as bitsandbytes 0.50.2 writes them."""
    fields: dict = {"quant_type": quant_type, "blocksize": BLOCKSIZE, "dtype": dtype,
                    "shape": [out_features, in_features]}
    if double_quant:
        fields.update({"nested_blocksize": NESTED_BLOCKSIZE, "nested_dtype": "float32",
                       "nested_offset": float(nested_offset)})
    return json.dumps(fields).encode("utf-8")


def linear_specs(variant: Variant, n_out: int, n_in: int, dtype: str = "float16") -> dict:
    if variant.kind == "bnb-int8":
        return {"weight": ("I8", (n_out, n_in)), "SCB": ("F32", (n_out,)), "weight_format": ("U8", ())}
    kind = quant_type(variant)
    n = n_out * n_in
    blocks = -(-n // BLOCKSIZE)
    state = quant_state_json(kind, n_out, n_in, dtype, variant.double_quant)
    specs: dict = {"weight": ("U8", ((n + 1) // 2, 1))}
    if variant.double_quant:
        specs["weight.absmax"] = ("U8", (blocks,))
        specs["weight.nested_absmax"] = ("F32", (-(-blocks // NESTED_BLOCKSIZE),))
        specs["weight.nested_quant_map"] = ("F32", (256,))
    else:
        specs["weight.absmax"] = ("F32", (blocks,))
    specs["weight.quant_map"] = ("F32", (16,))
    specs[f"weight.quant_state.bitsandbytes__{kind}"] = ("U8", (len(state),))
    return specs


def variant_name(variant: Variant) -> str:
    return variant.kind + ("-dq" if variant.double_quant else "")


def parse_variant(t: str, text: str, flag: str) -> Variant | None:
    if t in KINDS:
        return Variant(t, bits=8 if t == "bnb-int8" else 4)
    if t in ("bnb-nf4-dq", "bnb-fp4-dq"):
        return Variant(t[:-3], double_quant=True, bits=4)
    return None


# -- config (verify, inspect) ----------------------------------------------------------------
def variant_from_config(folder: Path, q: dict, findings: list[str]) -> Variant | None:
    where = folder / "config.json"
    eight, four = q.get("load_in_8bit"), q.get("load_in_4bit")
    if bool(eight) == bool(four):
        findings.append(f"{where}: quantization_config must set exactly one of load_in_8bit / load_in_4bit "
                        f"(found {eight!r} / {four!r})")
        return None
    skip = q.get("llm_int8_skip_modules")
    skip = ("lm_head",) if skip is None else tuple(skip) if isinstance(skip, list) else None
    if skip is None:
        findings.append(f"{where}: quantization_config.llm_int8_skip_modules must be a list or null")
        return None
    if eight:
        return Variant("bnb-int8", bits=8, skip_modules=skip)
    kind = q.get("bnb_4bit_quant_type")
    if kind not in ("nf4", "fp4"):
        findings.append(f"{where}: quantization_config.bnb_4bit_quant_type {kind!r} (expected nf4 or fp4)")
        return None
    return Variant(f"bnb-{kind}", double_quant=bool(q.get("bnb_4bit_use_double_quant")), bits=4, skip_modules=skip)


def quantizes(variant: Variant, module: str, tied: bool) -> bool:
    """transformers' rule: the skip list's modules stay 16-bit, and so does a tied lm_head."""
    from solar_quant.formats.bnb import should_quantize

    if module == "lm_head" and tied:
        return False
    return should_quantize(module, variant.skip_modules)


def inspect_summary(q: dict) -> dict:
    kind = "int8" if q.get("load_in_8bit") else q.get("bnb_4bit_quant_type", "4bit")
    return {"method": "bitsandbytes", "kind": kind, "double_quant": bool(q.get("bnb_4bit_use_double_quant"))}


# -- invariants (verify) ----------------------------------------------------------------------
def check_linear(reader, module: str, n_out: int, n_in: int, variant: Variant) -> list[str]:
    """SCB / absmax finite and >= 0, weight_format 0, packed quant-state JSON parses and agrees."""
    import torch

    if variant.kind == "bnb-int8":
        out = []
        scb = reader.get(f"{module}.SCB")
        if not bool(torch.isfinite(scb).all()) or not bool((scb >= 0).all()):
            out.append("SCB: row scales must be finite and >= 0")
        fmt = reader.get(f"{module}.weight_format")
        if int(fmt) != 0:
            out.append(f"weight_format: {int(fmt)}, expected 0 (row-major int8)")
        return out
    return _check_4bit(reader, module, n_out, n_in, variant)


def _check_4bit(reader, module: str, n_out: int, n_in: int, variant: Variant) -> list[str]:
    import torch

    kind = quant_type(variant)
    name = f"weight.quant_state.bitsandbytes__{kind}"
    try:
        state = json.loads(bytes(reader.get(f"{module}.{name}").tolist()).decode("utf-8"))
        if not isinstance(state, dict):
            raise ValueError("not an object")
    except (UnicodeDecodeError, ValueError) as e:
        return [f"{name}: packed quant state is not valid JSON ({e})"]
    out = []
    want = {"quant_type": kind, "blocksize": BLOCKSIZE, "shape": [n_out, n_in]}
    if variant.double_quant:
        want["nested_blocksize"] = NESTED_BLOCKSIZE
    for key, value in want.items():
        if state.get(key) != value:
            out.append(f"{name}: {key} {state.get(key)!r}, expected {value!r}")
    if state.get("dtype") not in DTYPE_NAMES:
        out.append(f"{name}: dtype {state.get('dtype')!r}, expected float16, bfloat16 or float32")
    if variant.double_quant:
        offset = state.get("nested_offset")
        if not isinstance(offset, (int, float)) or not math.isfinite(offset):
            out.append(f"{name}: nested_offset {offset!r} is not a finite number")
    floats = ["weight.quant_map"] + (["weight.nested_absmax", "weight.nested_quant_map"]
                                     if variant.double_quant else ["weight.absmax"])
    for suffix in floats:
        t = reader.get(f"{module}.{suffix}")
        if not bool(torch.isfinite(t).all()) or (suffix.endswith("absmax") and not bool((t >= 0).all())):
            out.append(f"{suffix}: values must be finite{' and >= 0' if suffix.endswith('absmax') else ''}")
    return out


def compare_linear(reader, src, module: str, variant: Variant, record: dict, layer: int, local: str, W,
                   where: Path) -> list[str]:
    """The stored weight is no worse than a fresh quantization of the same source weight."""
    from solar_quant.formats import bnb as fmt
    from solar_quant.formats.checks import rel_error
    from solar_quant.methods.bnb import STORE_DTYPE, quantize_linear

    tensors = {n: reader.get(n) for n in reader.tensors if n.startswith(f"{module}.")}
    stored = fmt.dequantize_linear(fmt.linear_parts(module, tensors))
    fresh = fmt.dequantize_linear(quantize_linear(W.to(STORE_DTYPE), variant.kind, variant.double_quant))
    error, fresh_error = rel_error(stored, W), rel_error(fresh, W)
    if error > ERROR_SLACK * fresh_error + 1e-6:
        return [f"{where}: {module}: de-quantized weight has relative error {error:.6g} against the source, a fresh "
                f"{variant} quantization gives {fresh_error:.6g}; the weights were altered"]
    return []


# -- loading (eval) ----------------------------------------------------------------------------
BNB_CPU_KERNEL_ENV = "SOLAR_QUANT_BNB_CPU_KERNEL"  # auto (bitsandbytes decides) | generic


def bnb_cpu_kernel_allowed() -> bool:
    """Whether bitsandbytes' AVX-512-bf16 4-bit CPU path may run: the CPU has it and
    SOLAR_QUANT_BNB_CPU_KERNEL does not ask for the generic kernel (dequantize, then a plain
    matmul), which every x86-64 machine runs the same way."""
    choice = os.environ.get(BNB_CPU_KERNEL_ENV, "auto").strip().lower() or "auto"
    if choice not in ("auto", "generic"):
        raise OptionError(f"{BNB_CPU_KERNEL_ENV}={choice!r}: expected auto or generic")
    if choice == "generic":
        return False
    from bitsandbytes.functional import has_avx512bf16

    return bool(has_avx512bf16())


def after_load(model, device, dtype) -> list[str]:
    """On CPU run bnb 4-bit layers in the eval dtype (fp16 matmuls are slow there); weights unchanged.

    Returns notes for the report describing what runs differently from the folder's own settings,
    and which 4-bit kernel runs: bitsandbytes repacks weights for its AVX-512-bf16 kernel (bf16
    activations) where the CPU has it, and dequantizes them for a plain matmul elsewhere."""
    if device.type != "cpu":
        return []
    import bitsandbytes as bnb

    allowed = bnb_cpu_kernel_allowed()
    changed, unpacked, packed, generic, int8 = 0, 0, 0, 0, 0
    for module in model.modules():
        int8 += isinstance(module, bnb.nn.Linear8bitLt)
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        if module.compute_dtype != dtype:
            module.compute_dtype = dtype
            changed += 1
        # bnb 0.50's AVX512-bf16 repacking assumes in_features % blocksize == 0 and fails otherwise;
        # such layers keep the generic kernel (same weights, same math).
        state = getattr(module.weight, "quant_state", None)
        use = allowed and not (state is not None and module.in_features % state.blocksize)
        unpacked += allowed and not use
        module.support_avx512bf16_for_cpu = use
        packed += use
        generic += not use
    notes = [f"bnb 4-bit compute dtype set to {str(dtype).removeprefix('torch.')} on cpu"] if changed else []
    if int8:
        notes.append("bnb int8 layers cast their inputs to float16 for the int8 matmul (as bitsandbytes does)")
    if unpacked:
        notes.append(f"{unpacked} bnb 4-bit layer(s) with in_features not a multiple of the blocksize use the generic cpu kernel")
    if packed or generic:
        notes.append(bnb_kernel_note(packed, generic))
    return notes


def bnb_kernel_note(packed: int, generic: int) -> str:
    """The report's line naming the 4-bit CPU kernels that ran (numbers differ slightly between them)."""
    parts = ([f"AVX-512-bf16 (bf16 activations) on {packed} layer(s)"] if packed else []) + \
        ([f"generic (dequantize + matmul) on {generic} layer(s)"] if generic else [])
    return "bnb 4-bit cpu kernel: " + ", ".join(parts)


# -- the model card --------------------------------------------------------------------------
def card_loading(v: dict) -> dict:
    """bitsandbytes 0.50's AVX-512-bf16 CPU path cannot repack a 4-bit layer whose inputs are not a
    multiple of the blocksize (not SmolLM2's or SOLAR's shapes; the tiny test model's 160): the
    card's code keeps such layers on the generic kernel, so it runs on every CPU."""
    blocks = v.get("partial_blocks") or {}
    if v["method"] == "bnb-int8" or not blocks:
        return {}
    ks = ", ".join(str(k) for k in sorted(set(blocks.values())))
    return {"after": (f"# bitsandbytes' AVX-512-bf16 CPU kernel cannot repack layers whose inputs ({ks}) are not a "
                      f"multiple of its\n# blocksize {BLOCKSIZE}; those layers keep the generic kernel (same weights).\n"
                      "for m in model.modules():\n"
                      f"    if getattr(m, \"support_avx512bf16_for_cpu\", False) and m.in_features % {BLOCKSIZE}:\n"
                      "        m.support_avx512bf16_for_cpu = False\n")}


def card_serving(v: dict) -> str:
    max_len = 10240 if v["rope"].get("rope_type") == "dynamic" else None
    return ("vLLM loads pre-quantized bitsandbytes folders: "
            f"`vllm serve {v['name']} --quantization bitsandbytes{' --max-model-len %d' % max_len if max_len else ''}`. "
            "TGI quantizes with bitsandbytes at load time from the 16-bit source instead "
            "(`--quantize bitsandbytes-nf4` / `bitsandbytes`), so serve this folder with transformers or vLLM.")


register_format(FormatEntry(
    name="bitsandbytes",
    kinds=KINDS,
    quantized=True,
    linear_specs=linear_specs,
    variant_name=variant_name,
    variant=variant_from_config,
    quantizes=quantizes,
    variable_length=(".quant_state.bitsandbytes__",),  # packed JSON
    inspect=inspect_summary,
    check_linear=check_linear,
    compare_linear=compare_linear,
    parse_variant=parse_variant,
    variant_forms="bnb-int8, bnb-nf4, bnb-fp4, bnb-nf4-dq, bnb-fp4-dq",
    plan_defaults=("bnb-int8", "bnb-nf4", "bnb-nf4-dq", "bnb-fp4"),
    after_load=after_load,
    card_install="pip install 'transformers>=5.24' accelerate bitsandbytes",
    card_serving=card_serving,
    card_loading=card_loading,
))
