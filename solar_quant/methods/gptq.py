"""GPTQ (Frantar et al., 2022) as pure functions: Hessian accumulation and the quantizer.

`gptq_quantize` follows IST-DASLab's `gptq.py` line by line and keeps the paper's names
(`W`, `H`, `Hinv`, `Err1`, `blocksize`, `percdamp`), with auto-gptq's act-order and
static-group handling. Tensors in, tensors out: no modules, files or progress bars; the work
runs on `W.device`.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from solar_quant.errors import NumericsError
from solar_quant.methods.clip_hessian import group_blocks, hessian_group_params, schur_blocks
from solar_quant.methods.grid import QuantSpec, group_params, quantize
from solar_quant.methods.quantized import QuantizedWeight, assemble

__all__ = ["QuantSpec", "QuantizedWeight", "accumulate_hessian", "gptq_quantize", "gptq_quantize_shared", "assemble",
           "split_rows", "stacked_rows"]

MAX_DAMP = 1.0  # the largest fraction of mean(diag(H)) the automatic retry may reach
DAMP_GROWTH = 10.0


def accumulate_hessian(H: Tensor | None, count: int, X: Tensor) -> tuple[Tensor, int]:
    """Fold the activations `X` [..., K] into the running Hessian `H = 2/n * sum x x^T`.

    `count` is the number of rows (tokens) already in `H`. H is float32, updated in place when
    given (a 70B down_proj Hessian is 3.3 GB) and returned with the new count. fp16/bf16 inputs
    on a GPU are multiplied on tensor cores with float32 accumulation and output (the inputs
    are exact there; only the summation order differs from a float32 product, ~2e-5 relative
    at the 70B's shapes: bench/README.md), everything else in float32."""
    X = X.reshape(-1, X.shape[-1])
    H, total = running_mean_start(H, count, X)
    if total == count:
        return H, count
    XtX = _half_gram(X)
    if XtX is not None:
        H.add_(XtX, alpha=2.0 / total)
        return H, total
    X = X.to(torch.float32) * (2.0 / total) ** 0.5
    H.addmm_(X.t(), X)
    return H, total


def running_mean_start(M: Tensor | None, count: int, X: Tensor) -> tuple[Tensor, int]:
    """A running [K, K] mean over tokens made ready for the rows of `X` [rows, K]: float32 zeros
    when None, else scaled in place by count / (count + rows); returned with the new count (the
    caller adds 2/total times its product of X)."""
    if M is None:
        M = torch.zeros(X.shape[1], X.shape[1], dtype=torch.float32, device=X.device)
    rows = X.shape[0]
    if rows:
        M.mul_(count / (count + rows))
    return M, count + rows


def _half_gram(X: Tensor) -> Tensor | None:
    """XᵀX in float32 from half-precision CUDA inputs, or None where that kernel is missing."""
    if X.device.type != "cuda" or X.dtype not in (torch.float16, torch.bfloat16):
        return None
    try:
        return torch.mm(X.t(), X, out_dtype=torch.float32)
    except (TypeError, RuntimeError, NotImplementedError):  # torch without mm(out_dtype=...) for this device
        return None


def gptq_quantize(W: Tensor, H: Tensor, spec: QuantSpec, *, blocksize: int = 128, percdamp: float = 0.01,
                  actorder: bool = False, static_groups: bool = False,
                  log: Callable[[str], None] | None = None, fused: Callable | None = None) -> QuantizedWeight:
    """Quantize `W` [N, K] (Linear.weight) given the Hessian `H` [K, K] of its inputs.

    Columns are quantized one at a time (in descending diag(H) order with `actorder`); each
    column's rounding error is spread over the columns not yet quantized through the inverse
    Hessian, `blocksize` columns at a time with lazy batch updates. Groups are fitted to the
    already-updated weights, or with `static_groups` to the original column groups up front.
    With `spec.clip` ("hessian", "hessian-diag") each group's clipping is searched under its
    diagonal block of `H` (undamped; in quantization order: the permuted columns with act-order);
    with "gptq-loss" under the block that GPTQ's own loss sees once the later columns compensate,
    ((H^-1)_gg)^-1 of the damped H over the columns not yet quantized (`clip_hessian.schur_blocks`;
    static groups, fitted before any column is quantized, use H's blocks).
    When groups are fitted on the fly, the block size is rounded to a multiple of the group
    size so that no group straddles a block and its grid sees all earlier updates (the lazy
    updates make the result independent of the block size up to float rounding).

    `fused` (a `gptq_fused.CompiledColumns`): runs each block's columns, one run per grid, as
    one compiled region; the loop below finishes a block wherever it returns None (compiling
    failed), so the codes are the eager loop's either way.
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
        blocks = group_blocks(H, G) if spec.clip else None
        groups = [_fit(W[:, i:i + G], blocks[j] if blocks else None, spec) for j, i in enumerate(range(0, columns, G))]

    perm = None
    if actorder:
        perm = torch.argsort(torch.diag(H), descending=True, stable=True)
        W = W[:, perm]
        H = H[perm][:, perm]
    blocks = group_blocks(H, G) if spec.clip in ("hessian", "hessian-diag") and groups is None else None

    Hinv, damp_used, retries = _damped_inverse_cholesky(H, percdamp, log)
    if spec.clip == "gptq-loss" and groups is None:
        blocks = schur_blocks(Hinv, G)
    del H

    if spec.group_size != -1 and groups is None:
        blocksize = max(G, blocksize // G * G)
    Q = torch.zeros_like(W)  # dequantized values; the codes are read back from them per group below
    Losses = torch.zeros(rows, dtype=torch.float32, device=W.device)
    n_groups = spec.n_groups(columns)
    scales = torch.zeros(n_groups, rows, dtype=torch.float32, device=W.device)
    zeros = torch.zeros(n_groups, rows, dtype=torch.int32, device=W.device)
    scale = zero = None  # the grid of the column at hand
    if spec.group_size == -1:
        scale, zero = _fit(W, blocks[0] if blocks else None, spec)
        scales[0], zeros[0] = scale, zero

    static_column = perm.tolist() if (groups is not None and perm is not None) else None
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        count = i2 - i1

        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]

        start = 0
        if fused is not None:
            start = _compiled_block(fused, W1, Q1, Err1, Hinv1, i1, spec, G, groups, static_column, scale, zero,
                                    scales, zeros, log, blocks)
        # The column loop is thousands of small ops (on a GPU, bound by launches): every
        # statement below is one kernel; the losses are summed per block from Err1.
        for i in range(start, count):
            w = W1[:, i]
            d = Hinv1[i, i]

            if spec.group_size != -1:
                if groups is not None:
                    column = i1 + i if static_column is None else static_column[i1 + i]
                    scale, zero = groups[column // G]
                elif (i1 + i) % G == 0:
                    scale, zero = _fit(W1[:, i:i + G], blocks[(i1 + i) // G] if blocks else None, spec)
                    scales[(i1 + i) // G], zeros[(i1 + i) // G] = scale, zero

            q = quantize(w, scale, zero, maxq)
            torch.mul(q - zero, scale, out=Q1[:, i])  # dequantize(q, scale, zero), written in place
            err1 = torch.div(w - Q1[:, i], d, out=Err1[:, i])
            W1[:, i:].addr_(err1, Hinv1[i, i:], alpha=-1)

        Q[:, i1:i2] = Q1
        Losses += torch.sum(Err1 * Err1, 1) / 2  # (w - q)^2 / d^2 / 2 per column
        W[:, i2:] -= Err1.matmul(Hinv[i1:i2, i2:])

    if groups is not None:
        for j, (scale, zero) in enumerate(groups):
            scales[j], zeros[j] = scale, zero
    g_idx = _group_index(columns, G, perm, static=groups is not None, device=W.device)
    if perm is not None:
        Q = Q[:, torch.argsort(perm)]
    codes = _codes_of(Q, scales, zeros, g_idx)
    stats = {"loss": float(Losses.sum()), "cholesky_retries": retries, "dead_columns": int(dead.sum()),
             "damp_used": damp_used, "row_losses": Losses}
    return assemble(codes, scales, zeros, g_idx, damp_used=damp_used, stats=stats)


def _compiled_block(fused: Callable, W1: Tensor, Q1: Tensor, Err1: Tensor, Hinv1: Tensor, i1: int, spec: QuantSpec,
                    G: int, groups, static_column, scale, zero, scales: Tensor, zeros: Tensor, log,
                    blocks: list[Tensor] | None = None) -> int:
    """The block's columns through `fused`, one call per run of columns that share a grid
    (a group fitted on the fly: its G columns; otherwise the whole block), with the grids the
    eager loop would use; W1, Q1, Err1 (and `scales`/`zeros` for groups fitted here) are filled
    in place. Returns the number of columns done: all of them, or where a call returned None."""
    rows, count = W1.shape
    maxq = torch.tensor(float(spec.maxq), device=W1.device)
    on_the_fly = spec.group_size != -1 and groups is None
    step = G if on_the_fly else count
    for a in range(0, count, step):
        b = min(a + step, count)
        if on_the_fly:
            scale, zero = _fit(W1[:, a:b], blocks[(i1 + a) // G] if blocks else None, spec)
        if groups is not None:
            cols = [i1 + i if static_column is None else static_column[i1 + i] for i in range(a, b)]
            S = torch.stack([groups[c // G][0] for c in cols], dim=1)
            Z = torch.stack([groups[c // G][1] for c in cols], dim=1)
        else:
            S = scale[:, None].expand(rows, b - a).contiguous()
            Z = zero[:, None].expand(rows, b - a).contiguous()
        # contiguous: the compiled regions are specialised on strides; one serves every matrix
        done = fused(W1[:, a:].contiguous(), Hinv1[a:, a:].contiguous(), S, Z, maxq, log=log)
        if done is None:
            return a
        Q1[:, a:b], Err1[:, a:b], W1[:, b:] = done
        if on_the_fly:
            scales[(i1 + a) // G], zeros[(i1 + a) // G] = scale, zero
    return count


def gptq_quantize_shared(weights: list[Tensor], H: Tensor, spec: QuantSpec, **kwargs) -> list[QuantizedWeight]:
    """`gptq_quantize` for several weights that read the same inputs (q/k/v; gate/up), hence share `H`.

    GPTQ treats every output row on its own given `H^-1` (and act-order's permutation depends
    on `H` alone), so the rows are stacked and solved in one pass: one damped inverse and one
    column loop instead of one per weight, with the same result for each row."""
    if len(weights) == 1:
        return [gptq_quantize(weights[0], H, spec, **kwargs)]
    fused = gptq_quantize(torch.cat([W.to(torch.float32) for W in weights]), H, spec, **kwargs)
    return split_rows(fused, [W.shape[0] for W in weights])


def stacked_rows(weights: list[Tensor], rows: slice) -> Tensor:
    """Rows `rows` of the weights stacked as `gptq_quantize_shared` stacks them: one share of a
    solve split by rows (every row is quantized from its own weights and the shared `H^-1`)."""
    return torch.cat([W.to(torch.float32) for W in weights])[rows]


def split_rows(q: QuantizedWeight, sizes: list[int]) -> list[QuantizedWeight]:
    """The row blocks of a quantized stacked weight, each with its own loss."""
    parts, start = [], 0
    row_losses = q.stats.get("row_losses")
    shared = {k: v for k, v in q.stats.items() if k != "row_losses"}
    for n in sizes:
        rows = slice(start, start + n)
        stats = dict(shared)
        if row_losses is not None:
            stats["loss"] = float(row_losses[rows].sum())
        parts.append(QuantizedWeight(intweight=q.intweight[rows], scales=q.scales[:, rows], zeros=q.zeros[:, rows],
                                     g_idx=q.g_idx, dequant=q.dequant[rows], damp_used=q.damp_used, stats=stats))
        start += n
    return parts


def _fit(x: Tensor, H_gg: Tensor | None, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """A group's grid: searched under its Hessian block when `spec.clip` asks, else `group_params`."""
    if spec.clip:
        return hessian_group_params(x, H_gg, spec)
    return group_params(x, spec)


def _codes_of(Q: Tensor, scales: Tensor, zeros: Tensor, g_idx: Tensor) -> Tensor:
    """The codes behind dequantized values Q = scale * (q - zero): q - zero is an integer of at
    most 255 in magnitude, and the float32 product and quotient are off by a few ulps, far from
    the half-way points where rounding could go wrong."""
    g = g_idx.long()
    return torch.round(Q / scales[g].t()) + zeros[g].t()


def _group_index(columns: int, G: int, perm: Tensor | None, *, static: bool, device: torch.device) -> Tensor:
    """g_idx[k]: the group of original column k. Act-order without static groups forms the
    groups in quantization order, so column perm[i] belongs to group i // G."""
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

    H is damped in place (the caller owns this copy; a 70B down_proj Hessian is 3.3 GB). When a
    factorization fails, damping grows tenfold (logged) up to MAX_DAMP; beyond that
    NumericsError. Returns (Hinv, the damping fraction used, the number of retries)."""
    return _damped(H, percdamp, _inverse_cholesky, log)


def damped_cholesky(H: Tensor, percdamp: float, log: Callable[[str], None] | None = None
                    ) -> tuple[Tensor, float, int]:
    """Lower Cholesky factor of H + damp*I, damped in place and retried as GPTQ's own solve is
    (`_damped_inverse_cholesky`). Returns (L, the damping fraction used, the number of retries)."""
    return _damped(H, percdamp, _cholesky, log)


def _damped(H: Tensor, percdamp: float, factor: Callable[[Tensor], Tensor | None],
            log: Callable[[str], None] | None) -> tuple[Tensor, float, int]:
    """`factor(H + damp*I)` with damp = percdamp * mean(diag(H)), H damped in place; damping grows
    tenfold (logged) while `factor` gives None, up to MAX_DAMP, beyond that NumericsError."""
    mean_diag = torch.mean(torch.diag(H))
    diag = torch.arange(H.shape[0], device=H.device)
    fraction, added, retries = percdamp, 0.0, 0
    while True:
        H[diag, diag] += (fraction - added) * mean_diag
        added = fraction
        result = factor(H)
        if result is not None:
            return result, fraction, retries
        if fraction * DAMP_GROWTH > MAX_DAMP * (1 + 1e-9):
            raise NumericsError(f"Cholesky factorization failed even with damping {fraction:g} × mean(diag(H)); "
                                f"the Hessian is not positive semi-definite")
        if log is not None:
            log(f"Cholesky failed with damping {fraction:g}; retrying with {fraction * DAMP_GROWTH:g}")
        fraction *= DAMP_GROWTH
        retries += 1


def _cholesky(H: Tensor) -> Tensor | None:
    L, info = torch.linalg.cholesky_ex(H)
    return L if info.item() == 0 else None


def _inverse_cholesky(H: Tensor) -> Tensor | None:
    L, info = torch.linalg.cholesky_ex(H)
    if info.item() != 0:
        return None
    Hinv = torch.cholesky_inverse(L)
    del L
    U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
    if info.item() != 0 or not torch.isfinite(U).all():
        return None
    return U
