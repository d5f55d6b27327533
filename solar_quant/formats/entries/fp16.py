"""The 16-bit format: a folder without `quantization_config`, every tensor under its own name."""

from __future__ import annotations

from solar_quant.registry import FormatEntry, Variant, register_format


def _parse(t: str, text: str, flag: str) -> Variant | None:
    return Variant("fp16") if t in ("fp16", "f16", "float16") else None


register_format(FormatEntry(
    name="fp16",
    kinds=("fp16",),
    quantized=False,
    linear_specs=lambda variant, n_out, n_in, dtype="float16": {"weight": ("F16", (n_out, n_in))},
    variant_name=lambda variant: "fp16",
    variant=lambda folder, qcfg, findings: Variant("fp16"),
    quantizes=lambda variant, module, tied: False,
    parse_variant=_parse,
    variant_forms="fp16",
    plan_defaults=("fp16",),
))
