"""The bitsandbytes checkpoint layout transformers 5 writes, and its inverse.

Per quantized Linear `<m>` (see docs/background.md, "bitsandbytes serialization"):
- 8-bit: `<m>.weight` int8 [out, in], `<m>.SCB` fp32 [out], `<m>.weight_format` uint8 0.
- 4-bit: `<m>.weight` uint8 [out*in/2, 1], `<m>.weight.absmax`, `<m>.weight.quant_map` [16],
  `<m>.weight.quant_state.bitsandbytes__{nf4,fp4}` (packed JSON: quant_type, blocksize, dtype,
  shape); with double quant also `<m>.weight.nested_absmax`, `<m>.weight.nested_quant_map`.
Everything else stays 16-bit under its own name. config.json carries `quantization_config`,
the `BitsAndBytesConfig.to_dict()` of the settings used.
"""

from __future__ import annotations

import json
import re

import torch

from solar_quant.errors import OptionError
from solar_quant.options import BnbOptions

QUANT_STATE_KEY = "weight.quant_state.bitsandbytes__"
DEFAULT_SKIP = ("lm_head",)  # what transformers skips when llm_int8_skip_modules is null


def quantization_config(opts: BnbOptions) -> dict:
    """What `BitsAndBytesConfig(...).to_dict()` gives for these options, keys sorted as written.

    The default skip list (lm_head) is written as null, as transformers writes it when the
    user leaves `llm_int8_skip_modules` unset and it skips lm_head by itself.
    """
    eight = opts.method == "bnb-int8"
    cfg = {
        "_load_in_4bit": not eight, "_load_in_8bit": eight,
        "bnb_4bit_compute_dtype": opts.compute_dtype, "bnb_4bit_quant_storage": "uint8",
        "bnb_4bit_quant_type": "fp4" if eight else opts.method.removeprefix("bnb-"),
        "bnb_4bit_use_double_quant": opts.double_quant,
        "llm_int8_enable_fp32_cpu_offload": False, "llm_int8_has_fp16_weight": False,
        "llm_int8_skip_modules": None if tuple(opts.skip_modules) == DEFAULT_SKIP else list(opts.skip_modules),
        "llm_int8_threshold": 6.0, "load_in_4bit": not eight, "load_in_8bit": eight,
        "quant_method": "bitsandbytes",
    }
    return dict(sorted(cfg.items()))


def should_quantize(module: str, skip_modules: tuple[str, ...]) -> bool:
    """transformers' rule (`should_convert_module`): a pattern skips a module when it matches
    from the start up to a module boundary (also as a regex), or as a suffix."""
    boundary = r"(?:(?<=\.)|(?=\.|$))"
    for key in skip_modules:
        try:
            if re.match(rf"(?:{key}){boundary}", module) or module.endswith(key):
                return False
        except re.error as e:
            raise OptionError(f"--skip-modules {key!r}: not a valid module name or pattern ({e})") from None
    return True


def module_name(weight_name: str) -> str:
    return weight_name.removesuffix(".weight")


def linear_tensors(module: str, parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Full checkpoint names for the parts one quantizer returned for `module`."""
    return {f"{module}.{suffix}": t for suffix, t in parts.items()}


def linear_parts(module: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of `linear_tensors`: the parts of `module` among a checkpoint's tensors."""
    prefix = f"{module}."
    return {n[len(prefix):]: t for n, t in tensors.items()
            if n.startswith(prefix) and (n == prefix + "weight" or n[len(prefix):] in ("SCB", "weight_format")
                                         or n.startswith(prefix + "weight."))}


def unpack_quant_state(packed: torch.Tensor) -> dict:
    """The JSON that bitsandbytes packs into `quant_state.bitsandbytes__*` (uint8 bytes)."""
    return json.loads(bytes(packed.tolist()).decode("utf-8"))


def dequantize_linear(parts: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rebuild the [out, in] weight a saved bnb Linear represents (what its forward multiplies by)."""
    import bitsandbytes.functional as F

    if "SCB" in parts:
        return F.int8_vectorwise_dequant(parts["weight"], parts["SCB"]).to(dtype)
    state = F.QuantState.from_dict({k.removeprefix("weight."): v for k, v in parts.items() if k != "weight"},
                                   device=parts["weight"].device)
    return F.dequantize_4bit(parts["weight"], state).to(dtype)


def bits_per_weight(parts: dict[str, torch.Tensor], numel: int) -> float:
    """Stored bits per original weight value, counting every tensor of the Linear."""
    return 8 * sum(t.numel() * t.element_size() for t in parts.values()) / numel
