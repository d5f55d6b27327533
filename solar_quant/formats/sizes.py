"""The tensors each output format writes for one Linear, and so its exact bytes on disk.

Each format's entry (`solar_quant/formats/entries/`) declares its layout; this module adds
them up. The layouts, as the writers put them in the safetensors files:

- fp16: `weight` F16 [out, in].
- bitsandbytes LLM.int8 and 4-bit (nf4 / fp4, with or without double quant): see
  `solar_quant/formats/entries/bitsandbytes.py`.
- GPTQ v1 (K = in, N = out, b bits, group G; G = -1 is one group over all K):
  `qweight` I32 [ceil(K*b/32), N], `qzeros` I32 [ceil(K/G), ceil(N*b/32)],
  `scales` F16 [ceil(K/G), N], `g_idx` I32 [K]. Act-order changes only g_idx's values.

Embeddings, norms and lm_head stay 16-bit in every variant (bitsandbytes skips lm_head).
"""

from __future__ import annotations

import math

from solar_quant import registry
from solar_quant.formats.entries.bitsandbytes import BLOCKSIZE as BNB_BLOCKSIZE
from solar_quant.formats.entries.bitsandbytes import NESTED_BLOCKSIZE as BNB_NESTED_BLOCKSIZE
from solar_quant.formats.entries.bitsandbytes import NESTED_OFFSET
from solar_quant.formats.entries.bitsandbytes import quant_state_json as bnb_quant_state_json
from solar_quant.registry import Variant

__all__ = ["Variant", "default_variants", "spec_bytes", "linear_tensor_specs", "linear_bytes", "variant_forms",
           "bnb_quant_state_json", "DTYPE_BYTES", "BNB_BLOCKSIZE", "BNB_NESTED_BLOCKSIZE", "NESTED_OFFSET"]

DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "I32": 4, "I8": 1, "U8": 1}

TensorSpec = tuple[str, tuple[int, ...]]  # (safetensors dtype, shape)


def variant_forms() -> str:
    """The names `plan --variants` accepts (each format's and method's own)."""
    return registry.variant_forms()


def default_variants() -> list[Variant]:
    """The table `plan` prints when no --variants are given."""
    return [Variant.parse(n) for n in registry.default_plan_variants()]


def spec_bytes(spec: TensorSpec) -> int:
    dtype, shape = spec
    return math.prod(shape) * DTYPE_BYTES[dtype]


def linear_tensor_specs(variant: Variant, out_features: int, in_features: int,
                        dtype: str = "float16") -> dict[str, TensorSpec]:
    """Tensor-name suffix (after `<module>.`) -> (dtype, shape) for one Linear in `variant`.

    `dtype` is the 16-bit dtype the source weight had when quantized (bnb records it).
    """
    return registry.format_of_kind(variant.kind).linear_specs(variant, out_features, in_features, dtype)


def linear_bytes(variant: Variant, out_features: int, in_features: int, dtype: str = "float16") -> int:
    return sum(spec_bytes(s) for s in linear_tensor_specs(variant, out_features, in_features, dtype).values())
