"""GPTQ's column loop as one compiled region per run of columns that share a grid.

`gptq.gptq_quantize` quantizes a 128-column block one column at a time: per column a handful of
small ops (quantize, dequantize, the error, the rank-1 update of the block's later columns). On a
GPU each op is a kernel launch and the loop is bound by launches (a 70B layer's solve: 9.1 s on an
H100, bench/README.md). `segment` is the same loop over `m` columns as one pure function of
tensors, so `torch.compile` (Inductor: Triton on CUDA, C++ on CPU) turns it into one region. It
spells out the eager loop's ops in the eager loop's order (no reassociation, no fused multiply-add:
Inductor compiles C++ with `-ffp-contract=off`), so the codes are identical to the eager loop's
(tests/test_gptq_fused.py checks that bit for bit).

The eager loop stays the reference and the fallback: when compiling fails (no C++ compiler, a
device Inductor does not support, any compile error) `CompiledColumns` logs one line and returns
None from then on, and `gptq_quantize` finishes the block with its eager loop.

Measured on a 2-core AVX2 CPU (bench/results/gptq_fused_cpu.json): compiling takes minutes per
shape and the compiled C++ loop is slower than eager, so the pipeline's default is the eager loop
on CPU and the compiled one on CUDA (`column_loop_for`).
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["COLUMN_LOOP_ENV", "COLUMN_LOOPS", "CompiledColumns", "column_loop_choice", "column_loop_for",
           "compiled_columns", "segment"]

COLUMN_LOOP_ENV = "SOLAR_QUANT_COLUMN_LOOP"  # "auto" (default), "eager" or "compiled"
COLUMN_LOOPS = ("auto", "eager", "compiled")


def segment(W1: Tensor, Hinv1: Tensor, S: Tensor, Z: Tensor, maxq: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Quantize the first `m = S.shape[1]` columns of `W1` [N, n] (a block's not yet quantized
    columns) with per-column scales `S` and zero points `Z` [N, m], spreading each column's error
    over the later columns through `Hinv1` [n, n] (upper Cholesky factor of H^-1 for these columns).

    Returns (dequantized columns [N, m], scaled errors Err1 [N, m], the updated columns W1[:, m:]).
    `maxq` is a 0-d float32 tensor (a tensor, so that the bit widths share one compiled region)."""
    W1 = W1.clone()
    m = S.shape[1]
    Q, E = [], []
    for i in range(m):
        w = W1[:, i]
        s, z = S[:, i], Z[:, i]
        q = torch.clamp(torch.round(w / s) + z, min=torch.zeros_like(maxq), max=maxq)  # grid.quantize
        dq = (q - z) * s  # grid.dequantize
        err = (w - dq) / Hinv1[i, i]
        W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]  # = addr_(err, Hinv1[i, i:], alpha=-1)
        Q.append(dq)
        E.append(err)
    return torch.stack(Q, dim=1), torch.stack(E, dim=1), W1[:, m:]


class CompiledColumns:
    """`segment` under `torch.compile`, the rows dimension dynamic (one compiled region per
    (block width, run length) serves every linear). Calling it returns `segment`'s result, or
    None once compiling has failed (logged once, through the `log` given to that call)."""

    def __init__(self, compile: Callable = torch.compile):
        self._compile = compile
        self._fn: Callable | None = None
        self.failure: str | None = None
        self.calls = 0  # runs of columns done by the compiled region

    def __call__(self, W1: Tensor, Hinv1: Tensor, S: Tensor, Z: Tensor, maxq: Tensor,
                 log: Callable[[str], None] | None = None) -> tuple[Tensor, Tensor, Tensor] | None:
        if self.failure is not None:
            return None
        try:
            if self._fn is None:
                self._fn = self._compile(segment, fullgraph=True, dynamic=False)
            for t in (W1, S, Z):
                if t.shape[0] > 1:
                    torch._dynamo.mark_dynamic(t, 0)
            result = self._fn(W1, Hinv1, S, Z, maxq)
        except Exception as e:  # noqa: BLE001 - any compiler failure means: run the eager loop
            self.failure = _reason(e)
            if log is not None:
                log(f"compiled GPTQ column loop unavailable on {W1.device.type} ({self.failure}); "
                    f"using the eager loop (same codes)")
            return None
        self.calls += 1
        return result


def _reason(e: BaseException) -> str:
    """The innermost cause's type and first line (Inductor wraps the compiler's own error)."""
    while getattr(e, "inner_exception", None) is not None or e.__cause__ is not None:
        e = getattr(e, "inner_exception", None) or e.__cause__
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0] if lines else ''}"[:300]


_COMPILED: CompiledColumns | None = None


def compiled_columns() -> CompiledColumns:
    """The process's one `CompiledColumns` (its compiled regions and a failure are kept)."""
    global _COMPILED
    if _COMPILED is None:
        _COMPILED = CompiledColumns()
    return _COMPILED


def column_loop_choice(choice: str | None = None) -> str:
    """`choice` (default: $SOLAR_QUANT_COLUMN_LOOP, else "auto") normalised to one of COLUMN_LOOPS;
    ValueError naming the variable otherwise."""
    choice = (choice or os.environ.get(COLUMN_LOOP_ENV) or "auto").strip().lower()
    if choice not in COLUMN_LOOPS:
        raise ValueError(f"{COLUMN_LOOP_ENV}={choice!r} is not a column loop; use one of {', '.join(COLUMN_LOOPS)}")
    return choice


def column_loop_for(device: torch.device, choice: str | None = None) -> str:
    """"eager" or "compiled" for `device`: `column_loop_choice(choice)`; "auto" is compiled on
    CUDA and eager elsewhere (on CPU the compiled loop was slower)."""
    choice = column_loop_choice(choice)
    if choice == "auto":
        return "compiled" if device.type == "cuda" else "eager"
    return choice
