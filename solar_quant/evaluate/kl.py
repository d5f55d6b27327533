"""KL(P_baseline || P_variant) per token, exact or against the baseline's compact top-k form.

The baseline is stored compactly per token as its k most likely tokens' log-probs plus one
"rest" bucket holding the remaining mass. KL computed on that partition (k tokens + rest) is
the KL between the two coarse-grained distributions, which by the log-sum inequality never
exceeds the full-vocabulary KL: it is a lower bound whose gap bench/README.md reports as measured.
With k >= vocab the rest bucket is empty and the result is the exact KL.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class CompactDist:
    """Top-k support of a batch of distributions: indices, log-probs, log of the rest mass."""

    idx: torch.Tensor  # [n, k] int64 (sorted by probability, descending)
    logp: torch.Tensor  # [n, k] fp32
    log_rest: torch.Tensor  # [n] fp32; -inf when the top k hold all the mass


def rest_logmass(logp: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """log of the probability mass outside `idx` for each row of full log-probs `logp`."""
    if idx.shape[-1] >= logp.shape[-1]:
        return torch.full(logp.shape[:-1], float("-inf"), dtype=logp.dtype, device=logp.device)
    return logp.scatter(-1, idx, float("-inf")).logsumexp(-1)


def compact(logp: torch.Tensor, k: int) -> CompactDist:
    """Keep the top `k` log-probs of each row of `logp` [n, V] and the log of the remaining mass."""
    k = min(k, logp.shape[-1])
    vals, idx = logp.topk(k, dim=-1, sorted=True)
    return CompactDist(idx, vals, rest_logmass(logp, idx))


def kl_compact(base: CompactDist, logq: torch.Tensor) -> torch.Tensor:
    """KL(P || Q) per row on the partition {top-k of P} + rest; `logq` [n, V] full log-probs of Q."""
    q_top = logq.gather(-1, base.idx).double()
    q_rest = rest_logmass(logq, base.idx).double()
    p_top = base.logp.double()
    kl = (p_top.exp() * (p_top - q_top)).sum(-1)
    p_rest = base.log_rest.double()
    has_rest = torch.isfinite(p_rest)
    rest_term = torch.where(has_rest, p_rest.exp() * (p_rest - q_rest), torch.zeros_like(p_rest))
    return (kl + rest_term).clamp_min(0.0).float()


def kl_full(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """Exact KL(P || Q) per row from full log-probs [n, V]."""
    p = logp.double()
    return (p.exp() * (p - logq.double())).sum(-1).clamp_min(0.0).float()


def top1_agreement(base_top1: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """1.0 where the variant's most likely token equals the baseline's, per row."""
    return (logq.argmax(-1) == base_top1.to(logq.device)).float()


def percentile(values: torch.Tensor, q: float) -> float:
    """The q-th percentile (0..100, linear interpolation) of a 1-D tensor."""
    if values.numel() == 0:
        return float("nan")
    import numpy as np

    return float(np.percentile(values.double().cpu().numpy(), q))
