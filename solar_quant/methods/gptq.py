"""GPTQ (Frantar et al., 2022) as pure functions: Hessian accumulation and the quantizer.

`gptq_quantize` follows IST-DASLab's `gptq.py` line by line and keeps the paper's names
(`W`, `H`, `Hinv`, `Err1`, `blocksize`, `percdamp`), with auto-gptq's act-order and
static-group handling. Tensors in, tensors out: no modules, files or progress bars; the work
runs on `W.device`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from solar_quant.errors import NumericsError
from solar_quant.methods.grid import QuantSpec, dequantize, group_params, quantize

__all__ = ["QuantSpec", "QuantizedWeight", "accumulate_hessian", "gptq_quantize", "assemble"]

MAX_DAMP = 1.0  # the largest fraction of mean(diag(H)) the automatic retry may reach
DAMP_GROWTH = 10.0


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


def accumulate_hessian(H: Tensor | None, count: int, X: Tensor) -> tuple[Tensor, int]:
    """Fold the activations `X` [..., K] into the running Hessian `H = 2/n * sum x x^T`.

    `count` is the number of rows (tokens) already in `H`. H is updated in place when given
    (a 70B down_proj Hessian is 3.3 GB) and returned with the new count; float32 throughout."""
    X = X.reshape(-1, X.shape[-1]).to(torch.float32)
    rows = X.shape[0]
    if H is None:
        H = torch.zeros(X.shape[1], X.shape[1], dtype=torch.float32, device=X.device)
    if rows == 0:
        return H, count
    total = count + rows
    H.mul_(count / total)
    X = X * (2.0 / total) ** 0.5
    H.addmm_(X.t(), X)
    return H, total


def assemble(codes: Tensor, scales: Tensor, zeros: Tensor, g_idx: Tensor, **extra) -> QuantizedWeight:
    """Build a QuantizedWeight from codes [N, K] (original order) and per-group parameters."""
    g = g_idx.long()
    intweight = codes.to(torch.int32)
    dequant = dequantize(intweight.to(torch.float32), scales[g].t(), zeros[g].t().to(torch.float32))
    return QuantizedWeight(intweight=intweight, scales=scales, zeros=zeros, g_idx=g_idx.to(torch.int32),
                           dequant=dequant, **extra)


def gptq_quantize(W: Tensor, H: Tensor, spec: QuantSpec, *, blocksize: int = 128, percdamp: float = 0.01,
                  actorder: bool = False, static_groups: bool = False,
                  log: Callable[[str], None] | None = None) -> QuantizedWeight:
    """Quantize `W` [N, K] (Linear.weight) given the Hessian `H` [K, K] of its inputs.

    Columns are quantized one at a time (in descending diag(H) order with `actorder`); each
    column's rounding error is spread over the columns not yet quantized through the inverse
    Hessian, `blocksize` columns at a time with lazy batch updates. Groups are fitted to the
    already-updated weights, or with `static_groups` to the original column groups up front.
    When groups are fitted on the fly, the block size is rounded to a multiple of the group
    size so that no group straddles a block and its grid sees all earlier updates (the lazy
    updates make the result independent of the block size up to float rounding).
    """
    W = W.to(torch.float32).clone()
    H = H.to(device=W.device, dtype=torch.float32).clone()
    rows, columns = W.shape
    _check_inputs(W, H)
    maxq = spec.maxq
    G = spec.group_width(columns)

    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0

    groups = None
    if static_groups and spec.group_size != -1:
        groups = [group_params(W[:, i:i + G], spec) for i in range(0, columns, G)]

    perm = None
    if actorder:
        perm = torch.argsort(torch.diag(H), descending=True, stable=True)
        W = W[:, perm]
        H = H[perm][:, perm]

    Hinv, damp_used, retries = _damped_inverse_cholesky(H, percdamp, log)
    del H

    if spec.group_size != -1 and groups is None:
        blocksize = max(G, blocksize // G * G)
    codes = torch.zeros_like(W)
    Losses = torch.zeros(rows, dtype=torch.float32, device=W.device)
    n_groups = spec.n_groups(columns)
    scales = torch.zeros(n_groups, rows, dtype=torch.float32, device=W.device)
    zeros = torch.zeros(n_groups, rows, dtype=torch.int32, device=W.device)
    if spec.group_size == -1:
        scale, zero = group_params(W, spec)
        scales[0], zeros[0] = scale, zero

    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        count = i2 - i1

        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Losses1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]

        for i in range(count):
            w = W1[:, i]
            d = Hinv1[i, i]

            if spec.group_size != -1:
                if groups is not None:
                    column = i1 + i if perm is None else int(perm[i1 + i])
                    scale, zero = groups[column // G]
                elif (i1 + i) % G == 0:
                    scale, zero = group_params(W1[:, i:i + G], spec)
                    scales[(i1 + i) // G], zeros[(i1 + i) // G] = scale, zero

            q = quantize(w.unsqueeze(1), scale.unsqueeze(1), zero.unsqueeze(1), maxq).flatten()
            codes[:, i1 + i] = q
            Q1[:, i] = dequantize(q, scale, zero)
            Losses1[:, i] = (w - Q1[:, i]) ** 2 / d**2 / 2

            err1 = (w - Q1[:, i]) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1

        Losses += torch.sum(Losses1, 1)
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])

    if groups is not None:
        for j, (scale, zero) in enumerate(groups):
            scales[j], zeros[j] = scale, zero
    g_idx = _group_index(columns, G, perm, static=groups is not None)
    if perm is not None:
        codes = codes[:, torch.argsort(perm)]
    stats = {"loss": float(Losses.sum()), "cholesky_retries": retries, "dead_columns": int(dead.sum()),
             "damp_used": damp_used}
    return assemble(codes, scales, zeros, g_idx, damp_used=damp_used, stats=stats)


def _group_index(columns: int, G: int, perm: Tensor | None, *, static: bool) -> Tensor:
    """g_idx[k]: the group of original column k. Act-order without static groups forms the
    groups in quantization order, so column perm[i] belongs to group i // G."""
    device = perm.device if perm is not None else None
    order = torch.arange(columns, dtype=torch.int32, device=device)
    if perm is None or static:
        return order // G
    g_idx = torch.empty_like(order)
    g_idx[perm] = order // G
    return g_idx


def _check_inputs(W: Tensor, H: Tensor) -> None:
    columns = W.shape[1]
    if H.shape != (columns, columns):
        raise NumericsError(f"Hessian has shape {tuple(H.shape)}, expected ({columns}, {columns}) for a weight "
                            f"with {columns} inputs")
    if not torch.isfinite(W).all():
        raise NumericsError("weight holds NaN or Inf values")
    if not torch.isfinite(H).all():
        raise NumericsError("Hessian holds NaN or Inf values (activations overflowed?)")
    if not H.any():
        raise NumericsError("Hessian is all zeros: the linear got no activations during calibration")
    if (torch.diag(H) < 0).any():
        raise NumericsError("Hessian has negative diagonal entries; it is not a sum of x x^T")


def _damped_inverse_cholesky(H: Tensor, percdamp: float, log: Callable[[str], None] | None
                             ) -> tuple[Tensor, float, int]:
    """Upper Cholesky factor of (H + damp*I)^-1, with damp = percdamp * mean(diag(H)).

    When a factorization fails, damping grows tenfold (logged) up to MAX_DAMP; beyond that
    NumericsError. Returns (Hinv, the damping fraction used, the number of retries)."""
    mean_diag = torch.mean(torch.diag(H))
    diag = torch.arange(H.shape[0], device=H.device)
    fraction, retries = percdamp, 0
    while True:
        Hd = H.clone()
        Hd[diag, diag] += fraction * mean_diag
        Hinv = _inverse_cholesky(Hd)
        if Hinv is not None:
            return Hinv, fraction, retries
        if fraction * DAMP_GROWTH > MAX_DAMP * (1 + 1e-9):
            raise NumericsError(f"Cholesky factorization failed even with damping {fraction:g} × mean(diag(H)); "
                                f"the Hessian is not positive semi-definite")
        if log is not None:
            log(f"Cholesky failed with damping {fraction:g}; retrying with {fraction * DAMP_GROWTH:g}")
        fraction *= DAMP_GROWTH
        retries += 1


def _inverse_cholesky(H: Tensor) -> Tensor | None:
    L, info = torch.linalg.cholesky_ex(H)
    if info.item() != 0:
        return None
    Hinv = torch.cholesky_inverse(L)
    U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
    if info.item() != 0 or not torch.isfinite(U).all():
        return None
    return U
