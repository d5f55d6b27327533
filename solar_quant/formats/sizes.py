"""The tensors each output format writes for one Linear, and so its exact bytes on disk.

Derived from what the writers put in the safetensors files (../shared/NOTES.md, checked
against transformers' `save_pretrained` in tests/test_plan.py):

- fp16: `weight` F16 [out, in].
- bitsandbytes LLM.int8: `weight` I8 [out, in], `SCB` F32 [out], `weight_format` U8 scalar.
- bitsandbytes 4-bit (nf4 / fp4), blocksize 64: `weight` U8 [ceil(n/2), 1] (n = out*in),
  `weight.absmax` F32 [ceil(n/64)], `weight.quant_map` F32 [16] and
  `weight.quant_state.bitsandbytes__<type>` U8 = the JSON of the non-tensor fields, packed
  as bitsandbytes 0.50.2's `QuantState.as_dict(packed=True)` does (`json.dumps`, UTF-8).
  Double quant: absmax becomes U8, plus `weight.nested_absmax` F32 [ceil(blocks/256)] and
  `weight.nested_quant_map` F32 [256]; the JSON gains nested_blocksize, nested_dtype and
  nested_offset (the mean of the absmax values, a data-dependent float: see NESTED_OFFSET).
- GPTQ v1 (K = in, N = out, b bits, group G; G = -1 is one group over all K):
  `qweight` I32 [ceil(K*b/32), N], `qzeros` I32 [ceil(K/G), ceil(N*b/32)],
  `scales` F16 [ceil(K/G), N], `g_idx` I32 [K]. Act-order changes only g_idx's values.

Embeddings, norms and lm_head stay 16-bit in every variant (bitsandbytes skips lm_head).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass

from solar_quant.errors import OptionError

DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "I32": 4, "I8": 1, "U8": 1}
BNB_BLOCKSIZE = 64
BNB_NESTED_BLOCKSIZE = 256
# nested_offset is the mean absmax of a weight, a float32 value written with Python's repr,
# so its length depends on the data (mostly 17-20 characters for offsets in 0.01-0.2).
# Plans assume this typical value (19 characters); a real file differs from the plan by a
# few bytes per Linear (tests/test_plan.py bounds it).
NESTED_OFFSET = 0.04391330108046532

TensorSpec = tuple[str, tuple[int, ...]]  # (safetensors dtype, shape)

VARIANT_FORMS = "fp16, bnb-int8, bnb-nf4, bnb-fp4, bnb-nf4-dq, bnb-fp4-dq, gptq-<2|3|4|8>b-g<size|none>[-act]"
_GPTQ = re.compile(r"^gptq-(\d+)b-g(\d+|none|-1)(-act)?$")


@dataclass(frozen=True)
class Variant:
    """One output format: 16-bit, a bitsandbytes kind, or GPTQ bits × group size."""

    method: str  # "fp16", "bnb-int8", "bnb-nf4", "bnb-fp4", "gptq"
    double_quant: bool = False
    bits: int = 16
    group_size: int = -1  # gptq only; -1: one group over all inputs
    act_order: bool = False  # gptq only; same bytes (g_idx is always written)

    @property
    def name(self) -> str:
        if self.method == "gptq":
            group = "none" if self.group_size == -1 else str(self.group_size)
            return f"gptq-{self.bits}b-g{group}" + ("-act" if self.act_order else "")
        return self.method + ("-dq" if self.double_quant else "")

    @property
    def quantized(self) -> bool:
        return self.method != "fp16"

    def __str__(self) -> str:
        return self.name

    @classmethod
    def parse(cls, text: str, flag: str = "--variants") -> "Variant":
        t = text.strip().lower()
        if t in ("fp16", "f16", "float16"):
            return cls("fp16")
        if t in ("bnb-int8", "bnb-nf4", "bnb-fp4"):
            return cls(t, bits=8 if t == "bnb-int8" else 4)
        if t in ("bnb-nf4-dq", "bnb-fp4-dq"):
            return cls(t[:-3], double_quant=True, bits=4)
        m = _GPTQ.match(t)
        if m:
            bits, group = int(m.group(1)), m.group(2)
            if bits not in (2, 3, 4, 8):
                raise OptionError(f"{flag} {text!r}: GPTQ bits must be 2, 3, 4 or 8")
            size = -1 if group in ("none", "-1") else int(group)
            if size == 0:
                raise OptionError(f"{flag} {text!r}: group size must be positive or 'none'")
            return cls("gptq", bits=bits, group_size=size, act_order=bool(m.group(3)))
        raise OptionError(f"{flag} {text!r}: unknown variant; expected one of {VARIANT_FORMS}")


def default_variants() -> list[Variant]:
    """The table `plan` prints when no --variants are given."""
    names = ["fp16", "bnb-int8", "bnb-nf4", "bnb-nf4-dq", "bnb-fp4"]
    names += [f"gptq-{b}b-g{g}" for b in (8, 4, 3) for g in (32, 64, 128, "none")]
    return [Variant.parse(n) for n in names]


def spec_bytes(spec: TensorSpec) -> int:
    dtype, shape = spec
    return math.prod(shape) * DTYPE_BYTES[dtype]


def bnb_quant_state_json(quant_type: str, out_features: int, in_features: int, dtype: str = "float16",
                         double_quant: bool = False, nested_offset: float = NESTED_OFFSET) -> bytes:
    """The packed quant_state bytes, key for key as bitsandbytes 0.50.2 writes them."""
    fields: dict = {"quant_type": quant_type, "blocksize": BNB_BLOCKSIZE, "dtype": dtype,
                    "shape": [out_features, in_features]}
    if double_quant:
        fields.update({"nested_blocksize": BNB_NESTED_BLOCKSIZE, "nested_dtype": "float32",
                       "nested_offset": float(nested_offset)})
    return json.dumps(fields).encode("utf-8")


def linear_tensor_specs(variant: Variant, out_features: int, in_features: int,
                        dtype: str = "float16") -> dict[str, TensorSpec]:
    """Tensor-name suffix (after `<module>.`) -> (dtype, shape) for one Linear in `variant`.

    `dtype` is the 16-bit dtype the source weight had when quantized (bnb records it).
    """
    n_out, n_in = out_features, in_features
    if variant.method == "fp16":
        return {"weight": ("F16", (n_out, n_in))}
    if variant.method == "bnb-int8":
        return {"weight": ("I8", (n_out, n_in)), "SCB": ("F32", (n_out,)), "weight_format": ("U8", ())}
    if variant.method in ("bnb-nf4", "bnb-fp4"):
        return _bnb4_specs(variant, n_out, n_in, dtype)
    if variant.method == "gptq":
        return _gptq_specs(variant.bits, variant.group_size, n_out, n_in)
    raise OptionError(f"variant {variant.method!r}: unknown method; expected one of {VARIANT_FORMS}")


def _bnb4_specs(variant: Variant, n_out: int, n_in: int, dtype: str) -> dict[str, TensorSpec]:
    quant_type = variant.method.removeprefix("bnb-")
    n = n_out * n_in
    blocks = -(-n // BNB_BLOCKSIZE)
    state = bnb_quant_state_json(quant_type, n_out, n_in, dtype, variant.double_quant)
    specs: dict[str, TensorSpec] = {"weight": ("U8", ((n + 1) // 2, 1))}
    if variant.double_quant:
        specs["weight.absmax"] = ("U8", (blocks,))
        specs["weight.nested_absmax"] = ("F32", (-(-blocks // BNB_NESTED_BLOCKSIZE),))
        specs["weight.nested_quant_map"] = ("F32", (256,))
    else:
        specs["weight.absmax"] = ("F32", (blocks,))
    specs["weight.quant_map"] = ("F32", (16,))
    specs[f"weight.quant_state.bitsandbytes__{quant_type}"] = ("U8", (len(state),))
    return specs


def _gptq_specs(bits: int, group_size: int, n_out: int, n_in: int) -> dict[str, TensorSpec]:
    groups = 1 if group_size == -1 else -(-n_in // group_size)
    return {
        "qweight": ("I32", (-(-n_in * bits // 32), n_out)),
        "qzeros": ("I32", (groups, -(-n_out * bits // 32))),
        "scales": ("F16", (groups, n_out)),
        "g_idx": ("I32", (n_in,)),
    }


def linear_bytes(variant: Variant, out_features: int, in_features: int, dtype: str = "float16") -> int:
    return sum(spec_bytes(s) for s in linear_tensor_specs(variant, out_features, in_features, dtype).values())
