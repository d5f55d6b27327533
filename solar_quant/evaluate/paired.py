"""Paired measures of one task's per-item outcomes, variant against baseline: delta with a
paired bootstrap interval, flips, and the standard error of a score.

Pure functions of arrays (one value per item, same items in the same order for both models).
A "flip" is an item whose correct/incorrect outcome differs between the two models (Dutta et
al., "Accuracy is Not All You Need", NeurIPS 2024): equal accuracies can hide many flips.
"""

from __future__ import annotations

import math

import numpy as np


def correct(values: np.ndarray) -> np.ndarray:
    """Per-item correctness: 0/1 outcomes as they are; a continuous score (TruthfulQA mc2, the
    probability mass on true answers) counts as correct when it is at least 0.5."""
    v = np.asarray(values, dtype=np.float64)
    return v >= 0.5


def group_means(values: np.ndarray, groups: np.ndarray | None) -> float:
    """Mean of the items, or with `groups` the unweighted mean of the per-group means (MMLU's 57 subjects)."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return math.nan
    if groups is None:
        return float(v.mean())
    g = np.asarray(groups)
    return float(np.mean([v[g == k].mean() for k in np.unique(g)]))


def stderr(values: np.ndarray, groups: np.ndarray | None = None) -> float:
    """Standard error of `group_means` (sample std / sqrt(n); per group combined with equal weights)."""
    v = np.asarray(values, dtype=np.float64)
    if groups is None:
        return float(v.std(ddof=1) / math.sqrt(v.size)) if v.size > 1 else math.nan
    g = np.asarray(groups)
    keys = np.unique(g)
    var = [v[g == k].var(ddof=1) / (g == k).sum() if (g == k).sum() > 1 else 0.0 for k in keys]
    return float(math.sqrt(sum(var)) / len(keys))


def flips(base: np.ndarray, variant: np.ndarray) -> dict:
    """Share of items whose correctness changes, and how many went each way."""
    b, v = correct(base), correct(variant)
    if b.shape != v.shape:
        raise ValueError(f"paired outcomes differ in length ({b.size} vs {v.size})")
    lost = int(np.sum(b & ~v))
    gained = int(np.sum(~b & v))
    n = int(b.size)
    return {"flips": (lost + gained) / n if n else math.nan, "lost": lost, "gained": gained, "paired_items": n}


def paired_bootstrap(base: np.ndarray, variant: np.ndarray, groups: np.ndarray | None = None,
                     resamples: int = 2000, seed: int = 0, level: float = 0.95) -> dict:
    """Delta (variant - baseline) of `group_means` and its percentile interval from resampling
    items with replacement, the same items for both models (within each group when given)."""
    b = np.asarray(base, dtype=np.float64)
    v = np.asarray(variant, dtype=np.float64)
    if b.shape != v.shape:
        raise ValueError(f"paired outcomes differ in length ({b.size} vs {v.size})")
    delta = group_means(v, groups) - group_means(b, groups)
    if b.size == 0:
        return {"delta": math.nan, "low": math.nan, "high": math.nan, "level": level, "resamples": resamples}
    rng = np.random.default_rng(seed)
    diff = v - b
    if groups is None:
        idx = rng.integers(0, diff.size, size=(resamples, diff.size))
        stats = diff[idx].mean(axis=1)
    else:
        g = np.asarray(groups)
        parts = []
        for k in np.unique(g):
            d = diff[g == k]
            parts.append(d[rng.integers(0, d.size, size=(resamples, d.size))].mean(axis=1))
        stats = np.mean(parts, axis=0)
    tail = (1.0 - level) / 2
    low, high = np.quantile(stats, [tail, 1.0 - tail])
    return {"delta": float(delta), "low": float(low), "high": float(high), "level": level, "resamples": resamples}
