"""Per-token negative log-likelihoods and perplexity: pure functions on tensors."""

from __future__ import annotations

import math

import torch


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    """Log-softmax over the vocabulary, computed in fp32 whatever the model's dtype."""
    return torch.log_softmax(logits.float(), dim=-1)


def token_nll(logp: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """-log p(target) per row; `logp` [n, V], `targets` [n] -> [n] fp32."""
    return -logp.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)


def perplexity(nll: torch.Tensor) -> float:
    """exp(mean NLL) over all scored tokens (accumulated in fp64)."""
    if nll.numel() == 0:
        return float("nan")
    return math.exp(nll.double().mean().item())
