"""A quantized Linear weight as every method returns it (GPTQ, RTN) and every packer reads it."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from solar_quant.methods.grid import dequantize, stored_scales

__all__ = ["QuantizedWeight", "assemble"]


@dataclass
class QuantizedWeight:
    """A quantized Linear weight, in original column order.

    dequant[n, k] == scales[g_idx[k], n] * (intweight[n, k] - zeros[g_idx[k], n])."""

    intweight: Tensor  # int32 [N, K], codes 0..2^bits-1
    scales: Tensor  # float32 [n_groups, N], values exactly representable in float16
    zeros: Tensor  # int32 [n_groups, N], the true zero point
    g_idx: Tensor  # int32 [K], group of each column
    dequant: Tensor  # float32 [N, K]
    damp_used: float = 0.0  # fraction of mean(diag(H)) added to the diagonal
    stats: dict = field(default_factory=dict)


def assemble(codes: Tensor, scales: Tensor, zeros: Tensor, g_idx: Tensor, **extra) -> QuantizedWeight:
    """Build a QuantizedWeight from codes [N, K] (original order) and per-group parameters; the
    scales are rounded to the float16 values the file keeps, and `dequant` is computed from those."""
    g = g_idx.long()
    scales = stored_scales(scales)
    intweight = codes.to(torch.int32)
    dequant = dequantize(intweight.to(torch.float32), scales[g].t(), zeros[g].t().to(torch.float32))
    return QuantizedWeight(intweight=intweight, scales=scales, zeros=zeros, g_idx=g_idx.to(torch.int32),
                           dequant=dequant, **extra)
