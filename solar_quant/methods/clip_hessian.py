"""Hessian-weighted clipping search: each group's grid chosen by the error the layer's output sees.

GPTQ's `mse` search (`grid.py`) picks, per output row and group, the shrunk range p * [xmin, xmax]
(p = 1, 0.99, ..., 0.21) whose grid minimises sum |w - q|**2.4 over the group: every input
column weighs the same. The output error of a linear is what GPTQ minimises, and for a row's
rounding error e over the group's columns it is, to second order, the quadratic form

    e H_gg e^T

with H_gg the group's diagonal block of the layer Hessian H = 2/n sum x x^T. This search keeps
the p that minimises that form ("hessian"), or its cheaper diagonal variant sum_j H_jj e_j^2
("hessian-diag", the same cost as the mse search). Columns that carry large activations (the
ones AWQ protects) then weigh more than the rest when the clipping trades outliers against
resolution.

The candidates and the grid are `grid.py`'s (the same p, the same zero point, the same float16
range clamp); only the measure of a candidate differs. Ties go to the widest range, as there.
Pure tensors in and out; the work runs on `x.device`.

Inside GPTQ a group's rounding error is partly undone by the columns quantized after it, so the
error the layer's output keeps is not e H_gg e^T but e ((H_RR^-1)_gg)^-1 e^T, with R the columns
not yet quantized (the group first): "gptq-loss" searches under that block. With U the upper
Cholesky factor of H^-1 that GPTQ already holds, (H_RR^-1)_gg = U_gg^T U_gg (`schur_blocks`); its
diagonal, 1 / U_jj^2 for a lone column, is the weighting of GPTQ's reported loss.
"""

from __future__ import annotations

import torch
from torch import Tensor

from solar_quant.methods.grid import QuantSpec, clipped_search, group_range, range_params


def hessian_group_params(x: Tensor, H_gg: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """Scale and zero point per row of the group `x` [N, g], searched under the Hessian block `H_gg`.

    `H_gg` [g, g] is the group's diagonal block of the layer Hessian; `spec.clip` "hessian" uses it
    whole, "hessian-diag" only its diagonal (a [g] vector is taken as that diagonal). Returns
    (scale float32 [N], zero int32 [N]) like `grid.group_params`."""
    x = x.float()
    weight = _weighting(H_gg.to(device=x.device, dtype=torch.float32), spec.clip, x.shape[1])
    xmin, xmax = group_range(x, spec)
    scale, zero = range_params(xmin, xmax, spec)
    scale, zero = clipped_search(x, xmin, xmax, scale, zero, spec, lambda e: quadratic_error(e, weight))
    return scale, zero.to(torch.int32)


def quadratic_error(e: Tensor, weight: Tensor) -> Tensor:
    """e H e^T per row of `e` [..., g]: `weight` a [g, g] block, or a [g] diagonal."""
    if weight.dim() == 1:
        return (e * e * weight).sum(dim=-1)
    return ((e @ weight) * e).sum(dim=-1)


def group_blocks(H: Tensor, group_width: int) -> list[Tensor]:
    """The diagonal blocks H[i:i+G, i:i+G] of `H` [K, K] in column order (the last may be partial), cloned."""
    K = H.shape[0]
    return [H[i:i + group_width, i:i + group_width].clone() for i in range(0, K, group_width)]


def schur_blocks(Hinv: Tensor, group_width: int) -> list[Tensor]:
    """Per group of `Hinv` [K, K] (GPTQ's upper Cholesky factor U of the damped H^-1), the block
    (U_gg^T U_gg)^-1 = ((H_RR^-1)_gg)^-1 under which the group's error reaches the output when the
    columns after it compensate (see the module text)."""
    K = Hinv.shape[0]
    out = []
    for i in range(0, K, group_width):
        U = Hinv[i:i + group_width, i:i + group_width].to(torch.float64)
        out.append(torch.cholesky_inverse(U, upper=True).to(torch.float32))
    return out


def _weighting(H_gg: Tensor, clip: str, g: int) -> Tensor:
    if clip not in ("hessian", "hessian-diag", "gptq-loss"):
        raise ValueError(f"hessian_group_params needs spec.clip 'hessian', 'hessian-diag' or 'gptq-loss', got {clip!r}")
    if H_gg.dim() == 1:
        if clip != "hessian-diag":
            raise ValueError("clip 'hessian' needs the whole [g, g] block, got only its diagonal")
        weight = H_gg
    else:
        weight = torch.diagonal(H_gg).clone() if clip == "hessian-diag" else H_gg
    if weight.shape[0] != g:
        raise ValueError(f"Hessian block covers {weight.shape[0]} columns, the group {g}")
    return weight
