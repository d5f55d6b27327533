"""Round-to-nearest: the baseline GPTQ must beat, and its test oracle.

The same grid as GPTQ (`grid.py`), fitted to each group of original columns, with no error
feedback: `g_idx[k] = k // G`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from solar_quant.errors import NumericsError
from solar_quant.methods.quantized import QuantizedWeight, assemble
from solar_quant.methods.grid import QuantSpec, group_params, quantize


def rtn_quantize(W: Tensor, spec: QuantSpec) -> QuantizedWeight:
    """Quantize `W` [N, K] group by group onto the GPTQ grid, on `W.device`."""
    W = W.to(torch.float32)
    if not torch.isfinite(W).all():
        raise NumericsError("weight holds NaN or Inf values")
    rows, columns = W.shape
    G = spec.group_width(columns)
    codes = torch.empty_like(W)
    scales = torch.empty(spec.n_groups(columns), rows, dtype=torch.float32, device=W.device)
    zeros = torch.empty(spec.n_groups(columns), rows, dtype=torch.int32, device=W.device)
    for j, i in enumerate(range(0, columns, G)):
        scale, zero = group_params(W[:, i:i + G], spec)
        codes[:, i:i + G] = quantize(W[:, i:i + G], scale.unsqueeze(1), zero.unsqueeze(1), spec.maxq)
        scales[j], zeros[j] = scale, zero
    g_idx = torch.arange(columns, dtype=torch.int32, device=W.device) // G
    return assemble(codes, scales, zeros, g_idx, damp_used=0.0, stats={})
