"""Coordinate descent on GPTQ's codes: each code moved to the grid point that minimises the layer loss
with every other code held fixed (QuantEase, Behdin et al. 2023), started from GPTQ's solution.

GPTQ picks each column's codes once, greedily: a column is rounded, its error is pushed onto the
columns not yet quantized, and it is never revisited, although the columns quantized after it
changed the best choice for it. The loss both minimise is the layer's output error on the
calibration inputs,

    f(Q) = tr((W - Q) H (W - Q)^T),   H = 2/n sum x x^T (+ GPTQ's damping),

a sum of independent quadratics, one per output row. With every code but (i, j) fixed it is a
one-dimensional parabola in Q_ij with its minimum at Q_ij + G_ij / H_jj, G = (W - Q) H; the best
grid point is the one nearest to it (clamped to the grid's range), and taking it never raises f.
A sweep visits every column once, for all rows at a time; `sweeps` of them descend from GPTQ's
codes. The grid (each group's scale and zero point: GPTQ's, clipping search included) stays as it is,
so the output is the same GPTQ v1 layout with other codes.

G is kept up to date lazily, as GPTQ keeps its weights: inside a block of columns only the
block's own columns of G are updated after each column (a rank-1 update of [N, B]), and the
block's code changes reach every column of G at the block's end in one matrix product, so a
sweep costs one [N, K] x [K, K] product.

Pure tensors in and out; the work runs on `W.device`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from solar_quant.methods.grid import dequantize, quantize
from solar_quant.methods.quantized import QuantizedWeight, assemble

__all__ = ["refine_codes", "damped"]


def damped(H: Tensor, damp: float) -> Tensor:
    """H + damp * mean(diag(H)) * I as GPTQ solves it (its mean counts a dead column, diag 0, as 1),
    a float32 copy; dead columns keep their 0 (no input reached them, their codes stay)."""
    H = H.to(torch.float32).clone()
    d = torch.diagonal(H)
    live = d > 0
    mean = torch.where(live, d, torch.ones_like(d)).mean()
    d.add_(torch.where(live, damp * mean, torch.zeros_like(d)))
    return H


def refine_codes(W: Tensor, H: Tensor, q: QuantizedWeight, bits: int, *, sweeps: int = 2,
                 blocksize: int = 128) -> QuantizedWeight:
    """`sweeps` rounds of coordinate descent on the codes of `q` (a quantization of `W` [N, K]) under
    the loss tr((W - Q) H (W - Q)^T), `H` [K, K] as given (damp it first: `damped`), columns in order.
    Columns whose H_jj is 0 (no input reached them) keep their codes. Stops early after a sweep
    that changed no code.

    Returns a QuantizedWeight with the same scales, zeros and g_idx, its codes refined; its stats
    are `q`'s plus "refine": {"sweeps": sweeps run, "changed": codes changed, "loss_before",
    "loss_after"} (the loss summed over rows)."""
    W = W.to(torch.float32)
    H = H.to(device=W.device, dtype=torch.float32)
    rows, columns = W.shape
    if H.shape != (columns, columns):
        raise ValueError(f"Hessian has shape {tuple(H.shape)}, expected ({columns}, {columns})")
    if sweeps < 0:
        raise ValueError(f"sweeps must be >= 0, got {sweeps}")
    # Column-major copies ([K, N]): the loop reads and writes one column of every row at a time.
    g = q.g_idx.long()
    St = q.scales[g].contiguous()  # [K, N] the stored (float16-exact) grid of each weight
    Zt = q.zeros[g].to(torch.float32).contiguous()
    Ct = q.intweight.t().to(torch.float32).contiguous()
    Qt = q.dequant.t().to(torch.float32).clone(memory_format=torch.contiguous_format)  # never `q`'s own storage
    Wt = W.t()
    Gt = H @ (Wt - Qt)  # [K, N] = ((W - Q) H)^T, H symmetric
    before = float(((Wt - Qt) * Gt).sum())
    maxq = 2**bits - 1
    done, changed = 0, 0
    for _ in range(sweeps):
        start = Ct.clone()
        for b1 in range(0, columns, blocksize):
            b2 = min(b1 + blocksize, columns)
            Hb = H[b1:b2, b1:b2]
            Gb = Gt[b1:b2].clone()
            Db = torch.zeros(b2 - b1, rows, dtype=torch.float32, device=W.device)
            h = torch.diagonal(Hb).tolist()
            for t, j in enumerate(range(b1, b2)):
                if h[t] <= 0:
                    continue
                # the grid point nearest to this column's minimiser Q + G / H_jj, every row at once
                c = quantize(Qt[j] + Gb[t] / h[t], St[j], Zt[j], maxq)
                new = dequantize(c, St[j], Zt[j])
                d = torch.sub(new, Qt[j], out=Db[t])  # exactly 0 where the code stays
                Qt[j] = new
                Ct[j] = c
                Gb[t + 1:].addr_(Hb[t + 1:, t], d, alpha=-1)
            Gt.addmm_(H[:, b1:b2], Db, alpha=-1)  # e -= D on the block's columns: G^T -= H[:, block] D
        moved = int((Ct != start).sum())
        done += 1
        changed += moved
        if moved == 0:
            break
    after = float(((Wt - Qt) * Gt).sum()) if done else before  # G kept current: no product to redo
    codes = Ct.t()
    stats = dict(q.stats)
    stats["refine"] = {"sweeps": done, "changed": changed, "loss_before": before, "loss_after": after}
    return assemble(codes, q.scales, q.zeros, q.g_idx, damp_used=q.damp_used, stats=stats)
