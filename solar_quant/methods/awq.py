"""Activation-aware equalization (AWQ, Lin et al. 2024) as pure functions: per-input-channel
scales from calibration statistics, the search over their exponent, and the exact folds.

A linear `y = W x` computes the same outputs as `(W diag(s)) (x / s)`. When `x / s` can be
produced for free by the tensor before it (a norm's weight, the rows of the linear that feeds
it), the weights that get quantized are `W diag(s)`: channels with large activations get larger
weight columns, so their rounding error shrinks relative to what they contribute. With
`s = mean|x| ** α` (normalised so that sqrt(max·min) = 1), α = 0 is plain quantization; the
search tries `grid` exponents in [0, 1] and keeps the one whose quantized linears reproduce the
full-precision outputs best over the calibration inputs:

    err(α) = Σ_linears tr(ΔW H ΔWᵀ),  ΔW = Q(W diag(s)) diag(1/s) − W,  H = Σ x xᵀ

(the output error ‖ΔW X‖², through the inputs' Gram matrix, so no activations are kept). Q is
round-to-nearest on the target grid, as in AWQ's own search, whatever solver quantizes later.

The four pairs of a Llama layer (`PAIRS`): input_layernorm → q/k/v, v_proj rows → o_proj
columns, post_attention_layernorm → gate/up, up_proj rows → down_proj columns. v → o with
grouped-query attention (GQA): o_proj reads num_heads·head_dim channels, v_proj writes
num_kv_heads·head_dim, and query head h reads KV head h // (num_heads / num_kv_heads)
(transformers' `repeat_kv`). Dividing v channel (k, d) by s_v makes every query head sharing
KV head k see it divided, so the fold is exact only if o's columns of all those heads are
multiplied by the same s_v: o's column scale is s_v repeated over the group (`expand_kv_scales`).
The statistics of v channel (k, d) are o's input statistics of (h, d) averaged over the sharing
heads (`kv_mean_abs`); the search then runs on o_proj with the repeated scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from solar_quant.errors import NumericsError
from solar_quant.methods.grid import QuantSpec, dequantize, group_range, quantize, range_params, stored_scales
from solar_quant.methods.rtn import rtn_quantize

__all__ = ["PAIRS", "Pair", "ScaleChoice", "channel_scales", "output_error", "search_scales", "kv_mean_abs",
           "expand_kv_scales", "check_scales", "fold_scales", "scale_columns", "rtn_values", "ALPHA_GRID"]

ALPHA_GRID = 20  # exponents tried: i / (grid - 1), i = 0 .. grid - 1
SCALE_FLOOR = 1e-4  # AWQ's clamp on the statistics, so a dead channel does not get scale 0


@dataclass(frozen=True)
class Pair:
    """One fold: `prev` (a norm's weight or a linear's rows) is divided by s, `linears`' columns multiplied."""

    name: str
    prev: str  # module path inside the decoder layer
    linears: tuple[str, ...]
    stats_of: str  # the linear whose inputs give the statistics and the Gram matrix
    gqa: bool = False  # v_proj -> o_proj: scales live per KV channel and repeat over query heads


PAIRS = (
    Pair("attn_in", "input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "self_attn.q_proj"),
    Pair("attn_out", "self_attn.v_proj", ("self_attn.o_proj",), "self_attn.o_proj", gqa=True),
    Pair("mlp_in", "post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj"), "mlp.gate_proj"),
    Pair("mlp_out", "mlp.up_proj", ("mlp.down_proj",), "mlp.down_proj"),
)


@dataclass(frozen=True)
class ScaleChoice:
    """The search's result for one pair: the scales folded (float32, on the prev side's channels),
    the chosen exponent, and the output error at it and at α = 0 (plain quantization)."""

    scales: Tensor
    alpha: float
    error: float
    error_plain: float


def channel_scales(mean_abs: Tensor, alpha: float) -> Tensor:
    """s = max(mean|x|, floor) ** α, normalised so that sqrt(max(s) · min(s)) = 1 (AWQ's choice)."""
    s = mean_abs.to(torch.float32).clamp_min(SCALE_FLOOR).pow(alpha)
    return s / (s.max() * s.min()).sqrt()


def output_error(Ws: list[Tensor], H: Tensor, s: Tensor, spec: QuantSpec) -> float:
    """Σ tr(ΔW H ΔWᵀ) with ΔW = Q(W diag(s)) diag(1/s) − W, Q round-to-nearest on `spec`'s grid."""
    total = 0.0
    for W in Ws:
        W = W.to(torch.float32)
        dW = rtn_values(W * s, spec).div_(s).sub_(W)
        total += float((dW @ H).mul_(dW).sum())
    return total


def rtn_values(W: Tensor, spec: QuantSpec) -> Tensor:
    """`rtn_quantize(W, spec).dequant`, the same float32 values, with every group of a row done
    at once (the search calls it 20 times per linear; rtn_quantize loops over the groups)."""
    rows, columns = W.shape
    G = spec.group_width(columns)
    if spec.mse:
        return rtn_quantize(W, spec).dequant
    full = columns - columns % G
    if full == columns:
        return _rtn_groups(W, G, spec)
    parts = [_rtn_groups(W[:, :full], G, spec)] if full else []
    return torch.cat(parts + [_rtn_groups(W[:, full:], columns - full, spec)], dim=1)  # the partial last group


def _rtn_groups(W: Tensor, G: int, spec: QuantSpec) -> Tensor:
    """Round-to-nearest of W [N, K], K a multiple of G, every G columns of a row one group."""
    rows, columns = W.shape
    x = W.reshape(rows * (columns // G), G)  # one group per row, as group_params takes them
    xmin, xmax = group_range(x, spec)
    scale, zero = range_params(xmin, xmax, spec)
    scale, zero = scale[:, None], zero.to(torch.int32).to(torch.float32)[:, None]
    codes = quantize(x, scale, zero, spec.maxq)  # rtn_quantize's codes come from the float32 scale
    return dequantize(codes, stored_scales(scale), zero).reshape(rows, columns)


def search_scales(Ws: list[Tensor], H: Tensor, mean_abs: Tensor, spec: QuantSpec, *, grid: int = ALPHA_GRID,
                  kv_groups: int = 1, head_dim: int = 0) -> ScaleChoice:
    """The exponent α in {i / (grid-1)} whose scales minimise `output_error` (α = 0 wins ties).

    `Ws`: the linears reading the scaled input (their columns are multiplied); `H`: the Gram
    matrix of that input; `mean_abs`: mean |x| per channel of it. With `kv_groups` > 1 (v → o
    under GQA), `mean_abs` is the o_proj input's and the returned scales are per KV channel
    (num_kv_heads · head_dim), repeated over `kv_groups` query heads where the columns are scaled."""
    spec = QuantSpec(spec.bits, spec.group_size, spec.sym)  # AWQ searches on the plain grid
    H = H.to(torch.float32)
    stats = kv_mean_abs(mean_abs, kv_groups, head_dim) if kv_groups > 1 else mean_abs
    best = None
    for i in range(grid):
        alpha = i / (grid - 1) if grid > 1 else 0.0
        s = channel_scales(stats, alpha)
        s_cols = expand_kv_scales(s, kv_groups, head_dim) if kv_groups > 1 else s
        err = output_error(Ws, H, s_cols, spec)
        if i == 0:
            plain = err
        if best is None or err < best[0]:
            best = (err, alpha, s)
    return ScaleChoice(scales=best[2], alpha=best[1], error=best[0], error_plain=plain)


def kv_mean_abs(mean_abs: Tensor, kv_groups: int, head_dim: int) -> Tensor:
    """o_proj's input statistics [num_heads · head_dim] → per KV channel [num_kv_heads · head_dim],
    averaged over the `kv_groups` query heads that share each KV head."""
    return mean_abs.reshape(-1, kv_groups, head_dim).mean(dim=1).reshape(-1)


def expand_kv_scales(s: Tensor, kv_groups: int, head_dim: int) -> Tensor:
    """Per-KV-channel scales [num_kv_heads · head_dim] → o_proj column scales [num_heads · head_dim]:
    query head h gets KV head h // kv_groups's scales (transformers' `repeat_kv` order)."""
    return s.reshape(-1, 1, head_dim).expand(-1, kv_groups, head_dim).reshape(-1)


def check_scales(s: Tensor, where: str) -> None:
    """NumericsError naming the first channel whose scale is non-finite or not positive."""
    bad = ~torch.isfinite(s) | (s <= 0)
    if bad.any():
        c = int(bad.nonzero()[0, 0])
        raise NumericsError(f"{where}: equalization scale of channel {c} is {float(s[c])} (non-finite or not "
                            "positive); check the calibration data and the source weights of this layer")


def fold_scales(prev: Tensor, linears: list[Tensor], s: Tensor, *, kv_groups: int = 1, head_dim: int = 0
                ) -> tuple[Tensor, list[Tensor]]:
    """The folded tensors: `prev` / s (a norm weight [K], or a linear's rows [K, ·]) and each
    linear's columns × s (repeated over the query heads with `kv_groups` > 1). Float32 in and out;
    the function the pipeline applies and `verify --source` recomputes."""
    s = s.to(torch.float32)
    prev = prev.to(torch.float32)
    new_prev = prev / s if prev.dim() == 1 else prev / s[:, None]
    return new_prev, scale_columns(linears, s, kv_groups=kv_groups, head_dim=head_dim)


def scale_columns(linears: list[Tensor], s: Tensor, *, kv_groups: int = 1, head_dim: int = 0) -> list[Tensor]:
    """The linears' half of `fold_scales`: each one's columns × s (repeated over the query heads
    with `kv_groups` > 1), float32."""
    s = s.to(torch.float32)
    s_cols = expand_kv_scales(s, kv_groups, head_dim) if kv_groups > 1 else s
    return [W.to(torch.float32) * s_cols for W in linears]
