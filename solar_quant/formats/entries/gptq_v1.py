"""The GPTQ v1 format entry: config keys, tensor layout, invariants, inspect, eval loading and card text.

The packing itself is `solar_quant.formats.gptq_v1`; this file says how the rest of the tool
recognises, sizes, checks and loads such a folder.
"""

from __future__ import annotations

import re
from pathlib import Path

from solar_quant.errors import OptionError
from solar_quant.registry import FormatEntry, Variant, register_format

CONFIG_FILE = "quantize_config.json"  # written beside config.json, equal to its quantization_config
GPTQ_EXTRA = "pip install 'solar-quant[gptq]'"
BITS = (2, 3, 4, 8)
# A recomputed GPTQ weight error may differ from the recorded 6-significant-digit figure by rounding only.
ERROR_RTOL, ERROR_ATOL = 1e-3, 1e-6
_NAME = re.compile(r"^gptq-(\d+)b-g(\d+|none|-1)(-act)?$")


# -- tensor layout (plan, verify) -------------------------------------------------------------
def linear_specs(variant: Variant, n_out: int, n_in: int, dtype: str = "float16") -> dict:
    """K = in, N = out, b bits, group G (-1: one group over all K); act-order changes only g_idx's values."""
    bits, group_size = variant.bits, variant.group_size
    groups = 1 if group_size == -1 else -(-n_in // group_size)
    return {
        "qweight": ("I32", (-(-n_in * bits // 32), n_out)),
        "qzeros": ("I32", (groups, -(-n_out * bits // 32))),
        "scales": ("F16", (groups, n_out)),
        "g_idx": ("I32", (n_in,)),
    }


def variant_name(variant: Variant) -> str:
    group = "none" if variant.group_size == -1 else str(variant.group_size)
    return f"gptq-{variant.bits}b-g{group}" + ("-act" if variant.act_order else "")


def parse_variant(t: str, text: str, flag: str) -> Variant | None:
    m = _NAME.match(t)
    if not m:
        return None
    bits, group = int(m.group(1)), m.group(2)
    if bits not in BITS:
        raise OptionError(f"{flag} {text!r}: GPTQ bits must be 2, 3, 4 or 8")
    size = -1 if group in ("none", "-1") else int(group)
    if size == 0:
        raise OptionError(f"{flag} {text!r}: group size must be positive or 'none'")
    return Variant("gptq", bits=bits, group_size=size, act_order=bool(m.group(3)))


# -- config (verify) ---------------------------------------------------------------------------
def variant_from_config(folder: Path, q: dict, findings: list[str]) -> Variant | None:
    from solar_quant.formats.checks import read_json

    where = folder / "config.json"
    other = read_json(folder / CONFIG_FILE, findings)
    if other is not None and other != q:
        keys = sorted(k for k in set(q) | set(other) if q.get(k) != other.get(k))
        findings.append(f"{folder / CONFIG_FILE}: disagrees with config.json quantization_config on "
                        + ", ".join(f"{k} ({other.get(k)!r} vs {q.get(k)!r})" for k in keys))
    bits, group = q.get("bits"), q.get("group_size")
    problems = []
    if bits not in BITS or isinstance(bits, bool):
        problems.append(f"bits {bits!r} (expected 2, 3, 4 or 8)")
    if not isinstance(group, int) or isinstance(group, bool) or not (group == -1 or group > 0):
        problems.append(f"group_size {group!r} (expected a positive integer or -1)")
    for key in ("desc_act", "sym"):
        if not isinstance(q.get(key), bool):
            problems.append(f"{key} {q.get(key)!r} (expected true or false)")
    if q.get("checkpoint_format", "gptq") != "gptq":
        problems.append(f"checkpoint_format {q.get('checkpoint_format')!r} (solar-quant writes and checks 'gptq' v1)")
    if q.get("pack_dtype", "int32") != "int32":
        problems.append(f"pack_dtype {q.get('pack_dtype')!r} (expected int32)")
    if problems:
        findings.append(f"{where}: quantization_config has " + "; ".join(problems))
        return None
    return Variant("gptq", bits=bits, group_size=group, act_order=q["desc_act"], sym=q["sym"])


def quantizes(variant: Variant, module: str, tied: bool) -> bool:
    return module != "lm_head"  # GPTQ v1 as solar-quant writes it keeps lm_head 16-bit


def inspect_summary(q: dict) -> dict:
    return {"method": "gptq", "bits": q.get("bits"), "group_size": q.get("group_size"),
            "desc_act": q.get("desc_act"), "sym": q.get("sym"),
            "checkpoint_format": q.get("checkpoint_format", "gptq")}


# -- invariants (verify) -----------------------------------------------------------------------
def check_linear(reader, module: str, n_out: int, n_in: int, variant: Variant) -> list[str]:
    """qzeros hold the symmetric zero point (or an asymmetric one in 1..2^b-1), g_idx in range with
    at most G columns per group (and k // G without act-order), scales finite and > 0."""
    import torch

    from solar_quant.formats.gptq_v1 import unpack_codes

    bits, G = variant.bits, variant.group_size
    maxq = (1 << bits) - 1
    out = []
    scales = reader.get(f"{module}.scales").to(torch.float32)
    n_groups = scales.shape[0]
    if not bool(torch.isfinite(scales).all()) or not bool((scales > 0).all()):
        out.append(f"scales: {int((~(torch.isfinite(scales) & (scales > 0))).sum())} of {scales.numel()} values are "
                   "not finite and > 0")
    stored = unpack_codes(reader.get(f"{module}.qzeros").t().contiguous(), bits, n_out).t()
    if variant.sym:
        want = (1 << (bits - 1)) - 1
        wrong = int((stored != want).sum())
        if wrong:
            out.append(f"qzeros: {wrong} of {stored.numel()} zero points differ from {want} (stored zero - 1 of the "
                       f"symmetric {bits}-bit grid); the file is corrupt")
    else:
        wrapped = int((stored == maxq).sum())  # true zero point 0, stored wrapped to maxq
        if wrapped:
            out.append(f"qzeros: {wrapped} zero points are 0 (stored {maxq}); solar-quant writes 1..{maxq} and "
                       "runtimes disagree on how to read a wrapped zero")
    g_idx = reader.get(f"{module}.g_idx").to(torch.int64)
    if g_idx.numel() and (int(g_idx.min()) < 0 or int(g_idx.max()) >= n_groups):
        out.append(f"g_idx: values span {int(g_idx.min())}..{int(g_idx.max())}, outside 0..{n_groups - 1}")
        return out
    width = n_in if G == -1 else G
    counts = torch.bincount(g_idx, minlength=n_groups)
    if int(counts.max()) > width:
        out.append(f"g_idx: group {int(counts.argmax())} has {int(counts.max())} columns, more than the group size {width}")
    if not variant.act_order and not torch.equal(g_idx, torch.arange(n_in) // width):
        out.append(f"g_idx: differs from k // {width} although desc_act is false")
    return out


def compare_linear(reader, src, module: str, variant: Variant, record: dict, layer: int, local: str, W,
                   where: Path) -> list[str]:
    """The de-quantized weight's error against the source equals the one recorded at quantization time."""
    from solar_quant.formats.gptq_v1 import dequantize
    from solar_quant.formats.checks import RECORD, recorded_error, rel_error

    parts = {k: reader.get(f"{module}.{k}") for k in ("qweight", "qzeros", "scales", "g_idx")}
    error = rel_error(dequantize(parts, variant.bits), W)
    want = recorded_error(record, layer, local)
    if want is None:
        return [f"{reader.path / RECORD}: no rel_weight_error recorded for {module}"]
    if not abs(error - want) <= ERROR_RTOL * want + ERROR_ATOL:
        return [f"{where}: {module}: de-quantized weight has relative error {error:.6g} against the source, "
                f"but {want:.6g} was recorded at quantization time; the weights were altered"]
    return []


# -- loading (eval) ----------------------------------------------------------------------------
def require_runtime() -> None:
    """Import optimum and GPTQModel (quietly, `os.environ` restored: `gptq_runtime.import_gptq_runtime`)."""
    import importlib

    from solar_quant.errors import DependencyError
    from solar_quant.formats.gptq_runtime import import_gptq_runtime

    for package in ("optimum", "gptqmodel"):
        try:
            importlib.import_module(package) if package == "optimum" else import_gptq_runtime()
        except ImportError:
            raise DependencyError(f"loading a GPTQ folder needs optimum and gptqmodel, and {package} is not "
                                  f"importable; run `{GPTQ_EXTRA}`") from None


def after_load(model, device, dtype) -> list[str]:
    """On CPU each GPTQ linear dequantizes once (`gptq_runtime.dequantize_once`)."""
    if device.type != "cpu":
        return []
    from solar_quant.formats import gptq_runtime

    return gptq_runtime.dequantize_once(model)


def load_kwargs(qcfg: dict, device, config) -> dict:
    """A `GPTQConfig` whose kernel runs here: CPU kernels (and Marlin on GPU) need K % group_size == 0;
    the torch kernel handles the rest."""
    from transformers import GPTQConfig

    require_runtime()
    group = int(qcfg.get("group_size", 128))
    kwargs = dict(bits=int(qcfg["bits"]), group_size=group, desc_act=bool(qcfg.get("desc_act", False)),
                  sym=bool(qcfg.get("sym", True)))
    shapes = (config.hidden_size, config.intermediate_size)
    if device.type == "cpu" or (group > 0 and any(k % group for k in shapes)):
        kwargs["backend"] = "gptq_torch"
    return {"quantization_config": GPTQConfig(**kwargs)}


# -- the model card --------------------------------------------------------------------------
def card_loading(v: dict) -> dict:
    """Where the group size does not divide some linear's inputs (SmolLM2's 576 with g128), the
    default CPU kernel and Marlin refuse the layer: the card's code picks GPTQModel's torch kernel,
    which loads it on CPU and CUDA."""
    partial = v.get("partial_groups") or {}
    if not partial:
        return {}
    o = v["options"]
    ks = ", ".join(str(k) for k in sorted(set(partial.values())))
    return {"imports": "GPTQConfig",
            "before": (f"# Some linears' inputs ({ks}) are not a multiple of the group size {o.get('group_size')}: the "
                       "default CPU kernel and\n# Marlin refuse them; GPTQModel's torch kernel loads them on CPU and CUDA.\n"
                       f"kernel = GPTQConfig(bits={o.get('bits')}, group_size={o.get('group_size')}, "
                       f"desc_act={bool(o.get('act_order'))}, sym={bool(o.get('sym', True))}, backend=\"gptq_torch\")\n"),
            "kwargs": ", quantization_config=kernel"}


def card_serving(v: dict) -> str:
    rope = v["rope"]
    max_len = 10240 if rope.get("rope_type") == "dynamic" else None
    lines = [f"vLLM: `vllm serve {v['name']} --quantization gptq{' --max-model-len %d' % max_len if max_len else ''}`.",
             f"TGI: `text-generation-launcher --model-id /data/{v['name']} --quantize gptq"
             + (f" --rope-scaling {rope['rope_type']} --rope-factor {rope.get('factor')} --max-total-tokens {max_len}" if max_len else "") + "`."]
    if v.get("partial_groups"):
        lines.append("Note: some layers' input size is not a multiple of the group size; vLLM's Marlin kernels refuse "
                     "such layers (use `--quantization gptq` with the exllama/triton path or transformers).")
    return "\n".join(lines)


register_format(FormatEntry(
    name="gptq",
    kinds=("gptq",),
    quantized=True,
    linear_specs=linear_specs,
    variant_name=variant_name,
    variant=variant_from_config,
    quantizes=quantizes,
    inspect=inspect_summary,
    check_linear=check_linear,
    compare_linear=compare_linear,
    parse_variant=parse_variant,
    variant_forms="gptq-<2|3|4|8>b-g<size|none>[-act]",
    plan_defaults=tuple(f"gptq-{b}b-g{g}" for b in (8, 4, 3) for g in (32, 64, 128, "none")),
    load_kwargs=load_kwargs,
    require_runtime=require_runtime,
    after_load=after_load,
    install_hint=f"; run `{GPTQ_EXTRA}`",
    card_install="pip install 'transformers>=5.24' accelerate optimum gptqmodel",
    card_serving=card_serving,
    card_loading=card_loading,
))
