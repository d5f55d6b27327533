"""bitsandbytes LLM.int8() and 4-bit (NF4/FP4) quantization of one weight, as pure functions.

Each function takes one Linear weight [out, in] and returns the tensors that bitsandbytes'
own `Linear8bitLt` / `Linear4bit` put in a state dict, keyed relative to the module
(`weight`, `SCB`, `weight.absmax`, ...). The numbers come from `bitsandbytes.functional`
itself, fed the same fp16 input transformers feeds it when it loads a model in fp16 and
quantizes, so the bytes equal what `save_pretrained` writes.

Both quantizers are local: int8 scales each row, 4-bit scales each block of 64 values.
We therefore feed bitsandbytes bounded chunks (whole rows, whole blocks) and join the
results, which is bit-identical to one call on the whole tensor while keeping the fp32
temporaries of its CPU kernels to a few chunk sizes instead of several tensor sizes.
"""

from __future__ import annotations

import torch

BLOCKSIZE = 64  # transformers' Linear4bit default
NESTED_BLOCKSIZE = 256  # bitsandbytes' fixed block size for double-quantized absmax
INT8_WEIGHT_FORMAT_ROW = 0  # bitsandbytes' code for row-major int8 weights
CHUNK_ELEMENTS = 1 << 23  # 8M values per bitsandbytes call: its CPU kernels hold ~4 fp32 copies (~128 MB)
STORE_DTYPE = torch.float16  # transformers loads the source in fp16 before quantizing; so do we


def quantize_linear(weight: torch.Tensor, method: str, double_quant: bool = False,
                    device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """One Linear weight -> the module-relative tensors bitsandbytes serializes for it under
    `method` ("bnb-int8", "bnb-nf4" or "bnb-fp4")."""
    if method == "bnb-int8":
        return quantize_int8(weight, device=device)
    return quantize_4bit(weight, method.removeprefix("bnb-"), double_quant, device=device)


def quantize_int8(weight: torch.Tensor, device: str | torch.device = "cpu",
                  chunk_elements: int = CHUNK_ELEMENTS) -> dict[str, torch.Tensor]:
    """LLM.int8() row-wise absmax: {weight int8 [out,in], SCB fp32 [out], weight_format uint8 0}."""
    import bitsandbytes.functional as F

    _check_matrix(weight)
    rows = max(1, chunk_elements // weight.shape[1])
    codes, scales = [], []
    for start in range(0, weight.shape[0], rows):
        chunk = weight[start:start + rows].to(device=device, dtype=torch.float16).contiguous()
        cb, scb, _ = F.int8_vectorwise_quant(chunk)
        codes.append(cb.cpu())
        scales.append(scb.cpu())
    return {"weight": _join(codes), "SCB": _join(scales),
            "weight_format": torch.tensor(INT8_WEIGHT_FORMAT_ROW, dtype=torch.uint8)}


def quantize_4bit(weight: torch.Tensor, quant_type: str, double_quant: bool = False, blocksize: int = BLOCKSIZE,
                  device: str | torch.device = "cpu", chunk_elements: int = CHUNK_ELEMENTS) -> dict[str, torch.Tensor]:
    """Blockwise 4-bit: {weight uint8 [n/2,1], weight.absmax, weight.quant_map, weight.quant_state.bitsandbytes__T, ...}.

    `weight` is quantized in its own dtype (fp16 for a variant, as transformers loads it);
    the packed quant state records that dtype as the one to dequantize to.
    """
    import bitsandbytes.functional as F

    _check_matrix(weight)
    flat = weight.reshape(-1)
    step = max(2 * blocksize, chunk_elements - chunk_elements % (2 * blocksize))
    packed, absmax, code = [], [], None
    for start in range(0, flat.numel(), step):
        chunk = flat[start:start + step].to(device).contiguous()
        q, state = F.quantize_4bit(chunk, blocksize=blocksize, compress_statistics=False, quant_type=quant_type)
        packed.append(q.cpu())
        absmax.append(state.absmax.cpu())
        code = state.code.cpu()
    absmax_all = _join(absmax)
    state = F.QuantState(absmax=absmax_all, shape=weight.shape, dtype=weight.dtype, blocksize=blocksize,
                         code=code, quant_type=quant_type)
    if double_quant:  # exactly what quantize_4bit(compress_statistics=True) does with the whole absmax
        offset = absmax_all.mean()
        qabsmax, state2 = F.quantize_blockwise(absmax_all - offset, blocksize=NESTED_BLOCKSIZE)
        state = F.QuantState(absmax=qabsmax, shape=weight.shape, dtype=weight.dtype, blocksize=blocksize,
                             code=code, quant_type=quant_type, offset=offset, state2=state2)
    return {"weight": _join(packed), **{f"weight.{k}": v for k, v in state.as_dict(packed=True).items()}}


def _join(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _check_matrix(weight: torch.Tensor) -> None:
    if weight.dim() != 2 or weight.numel() == 0:
        raise ValueError(f"expected a non-empty 2-D Linear weight, got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise ValueError(f"expected a floating-point weight, got {weight.dtype}")
