"""The uniform integer grid that GPTQ and RTN round onto: per-group scale and zero point.

A group of weights `x` is stored as codes `q = clamp(round(x / scale) + zero, 0, maxq)` and read
back as `scale * (q - zero)`, with `maxq = 2**bits - 1`. The parameters follow GPTQ's own
quantizer (IST-DASLab `quant.py`, per output row):

- the range is the group's min/max widened to include 0;
- symmetric: the range is mirrored around 0 and `zero = (maxq + 1) / 2` (auto-gptq's choice);
- asymmetric: `scale = (max - min) / maxq`, `zero = round(-min / scale)`.

Scales stay in float32 while codes are chosen, as in GPTQ's reference code and GPTQModel (only
clamped into float16's normal range), and are rounded to float16 when stored (`stored_scales`),
because GPTQ v1 keeps them in float16. The codes do not change with that rounding (it moves a
scale by at most 2**-11 of itself, and |q - zero| <= 255); each stored weight moves by at most
2**-11 of itself. Rounding earlier, inside the GPTQ solve, is no better or worse in principle
but sends the error feedback down another path: GPTQModel's own solver then picks 1.3-15.9 % other
codes on the same weight and inputs, against none with float32 scales (tests/test_gptq_oracle.py).

One deliberate refinement, so that the file on disk reads back the same everywhere:

- an asymmetric zero point is kept >= 1. GPTQ v1 stores `zero - 1`, and runtimes disagree on
  how to read back a field that wrapped from 0 to `maxq` (GPTQModel adds 1 to the packed word
  and carries into the neighbouring field for 2/4/8 bits, exllama and vLLM add 1 per field and
  get `maxq + 1`). A group whose grid would start at 0 instead gets `zero = 1` and
  `scale = max / (maxq - 1)`, which still covers its range; only all-non-negative groups change.

Optional clipping search (`mse > 0`, GPTQ's `Quantizer(mse=True)` and GPTQModel's `mse`): the range
is shrunk by p = 1, 0.99, ..., 0.21 and each group keeps the p whose grid gives the smallest
sum of |x - dequantized|**mse over the group (2.4 in GPTQ's code). Clipping a few outliers buys a
finer grid for the rest. The same search under the group's Hessian block instead of |error|**p is
`clip_hessian.py` (`QuantSpec.clip`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

SUPPORTED_BITS = (2, 3, 4, 8)
CLIP_WEIGHTINGS = ("", "hessian", "hessian-diag", "gptq-loss")  # "": no Hessian-weighted search
_FP16 = torch.finfo(torch.float16)


@dataclass(frozen=True)
class QuantSpec:
    """What grid to quantize onto. `group_size == -1`: one group spans the whole row."""

    bits: int
    group_size: int
    sym: bool
    mse: float = 0.0  # > 0: search a clipped range under this error norm (see the module text)
    clip: str = ""  # "hessian" / "hessian-diag" / "gptq-loss": search it under a Hessian block (clip_hessian.py)

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {self.bits}")
        if self.group_size != -1 and self.group_size <= 0:
            raise ValueError(f"group_size must be positive or -1, got {self.group_size}")
        if self.mse < 0:
            raise ValueError(f"mse must be 0 (off) or a positive norm, got {self.mse}")
        if self.clip not in CLIP_WEIGHTINGS:
            raise ValueError(f"clip must be one of {CLIP_WEIGHTINGS}, got {self.clip!r}")
        if self.clip and self.mse:
            raise ValueError("clip (Hessian-weighted search) and mse (|error|**p search) are two choices of one search; "
                             "give one")

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def group_width(self, columns: int) -> int:
        """Columns per group for a row of `columns` inputs."""
        return columns if self.group_size == -1 else self.group_size

    def n_groups(self, columns: int) -> int:
        """ceil(K / G): the last group may be partial."""
        return math.ceil(columns / self.group_width(columns))


def group_params(x: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """Scale and zero point of each row of `x` [N, g] (one group per row).

    Returns (scale float32 [N], within float16's normal range; zero int32 [N]). The file keeps
    `stored_scales(scale)`."""
    x = x.float()
    xmin, xmax = group_range(x, spec)
    scale, zero = range_params(xmin, xmax, spec)
    if spec.mse > 0:
        scale, zero = _clipped_params(x, xmin, xmax, scale, zero, spec)
    return scale, zero.to(torch.int32)


def group_range(x: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """The unclipped range [xmin, xmax] of each row of `x` [N, g] (float32), widened to include 0,
    mirrored when symmetric; an all-zero row gets [-1, 1]."""
    zeros_n = torch.zeros(x.shape[0], dtype=torch.float32, device=x.device)
    xmin = torch.minimum(x.min(dim=1).values, zeros_n)
    xmax = torch.maximum(x.max(dim=1).values, zeros_n)
    if spec.sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    empty = (xmin == 0) & (xmax == 0)
    xmin = torch.where(empty, -1.0, xmin)
    xmax = torch.where(empty, 1.0, xmax)
    return xmin, xmax


def shrink_factors(device: torch.device, grid: int = 100, maxshrink: float = 0.8) -> Tensor:
    """The clipping search's candidates p = 1, 0.99, ..., 0.21 (float32)."""
    return 1 - torch.arange(int(maxshrink * grid), dtype=torch.float32, device=device) / grid


def range_params(xmin: Tensor, xmax: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor]:
    """The grid spanning [xmin, xmax] per row: (float32 scale, zero as float32)."""
    maxq = spec.maxq
    scale = (xmax - xmin) / maxq
    if spec.sym:
        scale = _in_fp16_range(scale)
        return scale, torch.full_like(scale, (maxq + 1) // 2)
    starts_at_zero = torch.round(-xmin / scale) < 1
    scale = torch.where(starts_at_zero, xmax / (maxq - 1), scale)
    scale = _in_fp16_range(scale)
    return scale, torch.round(-xmin / scale).clamp(1, maxq)


def _clipped_params(x: Tensor, xmin: Tensor, xmax: Tensor, scale: Tensor, zero: Tensor, spec: QuantSpec,
                    grid: int = 100, maxshrink: float = 0.8) -> tuple[Tensor, Tensor]:
    """Per row, the shrunk range p * [xmin, xmax] whose grid reconstructs `x` best under
    sum |error|**spec.mse (p = 1 included)."""
    return clipped_search(x, xmin, xmax, scale, zero, spec,
                          lambda e: e.abs_().pow_(spec.mse).sum(dim=2), grid, maxshrink)


def clipped_search(x: Tensor, xmin: Tensor, xmax: Tensor, scale: Tensor, zero: Tensor, spec: QuantSpec,
                   measure, grid: int = 100, maxshrink: float = 0.8) -> tuple[Tensor, Tensor]:
    """Per row, the shrunk range p * [xmin, xmax] (p = 1 included) whose grid's rounding error
    e = dequantized - x [chunk, N, g] has the smallest `measure(e)` [chunk, N] (it may overwrite e);
    `scale`/`zero` (the unclipped grid) are kept where no candidate measures finite.

    The shrink factors are tried a chunk at a time, [chunk, N, g]: on a GPU up to 2**26 elements,
    a few dozen kernels per group instead of hundreds; on a CPU up to 2**21, which stays in cache
    (SmolLM2's 1536 x 128 groups: 0.045 s per group, 0.33 s with 2**26)."""
    shrink = shrink_factors(x.device, grid, maxshrink)
    budget = 2**26 if x.device.type == "cuda" else 2**21
    chunk = max(1, min(len(shrink), budget // max(1, x.numel())))
    best = torch.full_like(scale, math.inf)
    for p in shrink.split(chunk):
        scale1, zero1 = range_params(p[:, None] * xmin, p[:, None] * xmax, spec)  # [chunk, N]
        s, z = scale1[..., None], zero1[..., None]
        err = measure(dequantize(quantize(x, s, z, spec.maxq), s, z) - x)
        err, k = err.min(dim=0)  # the first (widest) range wins ties, as in the one-by-one search
        better = err < best
        best = torch.where(better, err, best)
        scale = torch.where(better, scale1.gather(0, k[None])[0], scale)
        zero = torch.where(better, zero1.gather(0, k[None])[0], zero)
    return scale, zero


def _in_fp16_range(scale: Tensor) -> Tensor:
    """Clamp into float16's normal range, so that storing never rounds a scale to 0, a subnormal or inf."""
    return scale.clamp(_FP16.tiny, _FP16.max)


def stored_scales(scale: Tensor) -> Tensor:
    """The float16 values (kept in float32) that the file stores for float32 scales from `group_params`."""
    return _in_fp16_range(scale).to(torch.float16).to(torch.float32)


def quantize(x: Tensor, scale: Tensor, zero: Tensor, maxq: int) -> Tensor:
    """Codes of `x`; `scale`/`zero` broadcast against `x` (e.g. [N] against a column [N]).

    Returns float32 integers in 0..maxq (int conversion is left to the caller)."""
    return torch.clamp(torch.round(x / scale) + zero, 0, maxq)


def dequantize(q: Tensor, scale: Tensor, zero: Tensor) -> Tensor:
    """Values of codes `q`: `scale * (q - zero)` in float32."""
    return scale * (q - zero)
