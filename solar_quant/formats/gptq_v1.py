"""The GPTQ v1 tensor layout (auto-gptq's, GPTQModel's "gptq" checkpoint_format), exactly invertible.

For a Linear with K inputs, N outputs, b bits and ceil(K/G) groups:

- `qweight` int32 [ceil(K*b/32), N]: the codes of each output column as one little-endian bit
  stream along K, code k at bit b*k. For 2/4/8 bits a code never crosses a word (4-bit: word
  k//8, bit 4*(k%8)); 3-bit packs 32 codes into 3 words, codes 10 and 21 straddling word
  boundaries, exactly as auto-gptq's and GPTQModel's `pack` loops do.
- `qzeros` int32 [ceil(K/G), ceil(N*b/32)]: the same stream along N of (zero - 1) & (2^b - 1).
  Symmetric 4-bit (zero 8) gives 0x77777777.
- `scales` float16 [ceil(K/G), N]; `g_idx` int32 [K].
- Runtime: W[n, k] = scales[g_idx[k], n] * (q[k, n] - ((stored_zero[g_idx[k], n] + 1) & (2^b - 1))).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from solar_quant import TOOL_NAME, __version__
from solar_quant.methods.quantized import QuantizedWeight

if TYPE_CHECKING:  # options import pydantic; the packing needs torch alone (bench/gpu_layer_70b.py)
    from solar_quant.options import GptqOptions

WORD_BITS = 32
_U32 = (1 << WORD_BITS) - 1


def pack(q: QuantizedWeight, bits: int) -> dict[str, Tensor]:
    """The four tensors of one quantized Linear, ready to be saved as `<module>.<name>`."""
    maxq = (1 << bits) - 1
    stored_zeros = (q.zeros.to(torch.int64) - 1) & maxq
    return {
        "qweight": pack_codes(q.intweight.t(), bits),
        "qzeros": pack_codes(stored_zeros.t(), bits).t().contiguous(),
        "scales": q.scales.to(torch.float16).contiguous(),
        "g_idx": q.g_idx.to(torch.int32).contiguous(),
    }


def unpack(tensors: dict[str, Tensor], bits: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Inverse of `pack`: (intweight int32 [N, K], true zeros int32 [n_groups, N],
    scales float16 [n_groups, N], g_idx int32 [K])."""
    maxq = (1 << bits) - 1
    scales, g_idx = tensors["scales"], tensors["g_idx"]
    n_groups, N = scales.shape
    K = g_idx.shape[0]
    intweight = unpack_codes(tensors["qweight"], bits, K).t().contiguous()
    stored_zeros = unpack_codes(tensors["qzeros"].t(), bits, N).t()
    zeros = ((stored_zeros + 1) & maxq).contiguous()
    return intweight, zeros, scales, g_idx


def dequantize(tensors: dict[str, Tensor], bits: int) -> Tensor:
    """float32 [N, K] weight from the packed tensors alone, as a runtime computes it."""
    return dequantize_unpacked(*unpack(tensors, bits))


def dequantize_unpacked(intweight: Tensor, zeros: Tensor, scales: Tensor, g_idx: Tensor) -> Tensor:
    """`dequantize` from what `unpack` returns."""
    g = g_idx.long()
    return scales.to(torch.float32)[g].t() * (intweight - zeros[g].t()).to(torch.float32)


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """Pack codes [R, C] (0..2^bits-1) along R into int32 [ceil(R*bits/32), C]."""
    maxq = (1 << bits) - 1
    values = codes.to(torch.int64)
    if values.numel() and (values.min() < 0 or values.max() > maxq):
        raise ValueError(f"codes must lie in 0..{maxq} for {bits}-bit packing")
    R, C = values.shape
    pad = -R % WORD_BITS
    if pad:
        values = torch.cat([values, values.new_zeros(pad, C)])
    values = values.reshape(-1, WORD_BITS, C)  # 32 codes fill exactly `bits` words
    words = values.new_zeros(values.shape[0], bits, C)
    for j in range(WORD_BITS):
        word, shift = divmod(bits * j, WORD_BITS)
        words[:, word] |= (values[:, j] << shift) & _U32
        if shift + bits > WORD_BITS:
            words[:, word + 1] |= values[:, j] >> (WORD_BITS - shift)
    words = words.reshape(-1, C)[: math.ceil(R * bits / WORD_BITS)]
    return _to_int32(words)


def unpack_codes(packed: Tensor, bits: int, rows: int) -> Tensor:
    """Inverse of `pack_codes`: int32 [rows, C] from int32 [ceil(rows*bits/32), C]."""
    maxq = (1 << bits) - 1
    words = packed.to(torch.int64) & _U32
    C = words.shape[1]
    pad = -words.shape[0] % bits
    if pad:
        words = torch.cat([words, words.new_zeros(pad, C)])
    words = words.reshape(-1, bits, C)
    codes = words.new_empty(words.shape[0], WORD_BITS, C)
    for j in range(WORD_BITS):
        word, shift = divmod(bits * j, WORD_BITS)
        value = words[:, word] >> shift
        if shift + bits > WORD_BITS:
            value = value | (words[:, word + 1] << (WORD_BITS - shift))
        codes[:, j] = value & maxq
    return codes.reshape(-1, C)[:rows].to(torch.int32)


def _to_int32(words: Tensor) -> Tensor:
    """Reinterpret unsigned 32-bit values held in int64 as int32 (two's complement)."""
    return torch.where(words >= 1 << 31, words - (1 << WORD_BITS), words).to(torch.int32).contiguous()


def quantization_config(opts: GptqOptions, *, damp_used: float | None = None) -> dict:
    """config.json's `quantization_config`, identical to `quantize_config.json`.

    `damp_used`: the largest damping fraction any linear needed (after automatic retries)."""
    meta = {
        "quantizer": [f"{TOOL_NAME}:{__version__}"],
        "method": opts.method,
        "damp_auto_increment": 10.0,
        "block_size": opts.block_size,
        "mse": opts.mse,
    }
    if damp_used is not None:
        meta["damp_used"] = damp_used
    return {
        "bits": opts.bits,
        "group_size": opts.group_size,
        "desc_act": opts.act_order,
        "sym": opts.sym,
        "lm_head": False,
        "quant_method": "gptq",
        "checkpoint_format": "gptq",
        "pack_dtype": "int32",
        "damp_percent": opts.damp,
        "true_sequential": opts.true_sequential,
        "static_groups": opts.static_groups,
        "meta": meta,
    }
