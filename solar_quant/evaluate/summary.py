"""Aggregate per-token results into the numbers a report shows: overall and per position bucket."""

from __future__ import annotations

import math

import torch

from solar_quant.evaluate.kl import percentile
from solar_quant.evaluate.perplexity import perplexity


def summarize(nll: torch.Tensor, kl: torch.Tensor | None = None, agree: torch.Tensor | None = None,
              base_nll: torch.Tensor | None = None) -> dict:
    """tokens, mean NLL, perplexity; with a baseline: ratio, mean/p99 KL and top-1 agreement."""
    out = {"tokens": int(nll.numel()), "nll": nll.double().mean().item() if nll.numel() else math.nan,
           "ppl": perplexity(nll)}
    if base_nll is not None:
        out["ppl_ratio"] = out["ppl"] / perplexity(base_nll)
    if kl is not None:
        out["kl_mean"] = kl.double().mean().item() if kl.numel() else math.nan
        out["kl_p99"] = percentile(kl, 99)
        out["kl_max"] = kl.max().item() if kl.numel() else math.nan
    if agree is not None:
        out["top1"] = agree.double().mean().item() if agree.numel() else math.nan
    return out


def bucketize(positions: torch.Tensor, edges: list[tuple[int, int]], nll: torch.Tensor,
              kl: torch.Tensor | None = None, agree: torch.Tensor | None = None,
              base: dict | None = None) -> list[dict]:
    """`summarize` over target positions in each [start, end) bucket."""
    rows = []
    for lo, hi in edges:
        m = (positions >= lo) & (positions < hi)
        bm = None if base is None else (base["positions"] >= lo) & (base["positions"] < hi)
        rows.append({"start": lo, "end": hi, **summarize(
            nll[m], None if kl is None else kl[m], None if agree is None else agree[m],
            None if base is None else base["nll"][bm])})
    return rows
