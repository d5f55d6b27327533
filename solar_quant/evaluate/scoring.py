"""Run a model over scoring windows and hand each chunk of log-probs to a consumer.

The decoder runs once per window; the lm_head then runs on `LOGIT_CHUNK` positions at a
time, so full-vocabulary logits never exist for a whole long window at once.
"""

from __future__ import annotations

from typing import Callable

import torch

from solar_quant.evaluate.kl import CompactDist, compact, kl_compact, top1_agreement
from solar_quant.evaluate.memory import LOGIT_CHUNK
from solar_quant.evaluate.perplexity import log_probs, token_nll
from solar_quant.evaluate.windows import Window

# consumer(positions [n] target positions inside the window, targets [n], logp [n, V])
Consumer = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]


def input_device(model: torch.nn.Module) -> torch.device:
    return model.get_input_embeddings().weight.device


def score_window(model: torch.nn.Module, ids: torch.Tensor, window: Window, consume: Consumer,
                 chunk: int = LOGIT_CHUNK) -> None:
    """Targets window.score_from..length-1 of `ids[start:start+length]`, chunk by chunk."""
    tokens = ids[window.start: window.start + window.length]
    with torch.inference_mode():
        x = tokens.unsqueeze(0).to(input_device(model))
        hidden = model.model(input_ids=x, use_cache=False).last_hidden_state[0]
        for lo in range(window.score_from, window.length, chunk):
            hi = min(lo + chunk, window.length)
            logits = model.lm_head(hidden[lo - 1: hi - 1])
            consume(torch.arange(lo, hi), tokens[lo:hi], log_probs(logits).cpu())


class BaselineCollector:
    """Keeps per-token NLL, argmax and the top-k compact distribution of the baseline."""

    def __init__(self, k: int):
        self.k = k
        self.parts: dict[str, list[torch.Tensor]] = {n: [] for n in ("positions", "nll", "top1", "idx", "logp", "log_rest")}

    def __call__(self, positions, targets, logp) -> None:
        dist = compact(logp, self.k)
        for name, t in (("positions", positions), ("nll", token_nll(logp, targets)), ("top1", logp.argmax(-1)),
                        ("idx", dist.idx), ("logp", dist.logp), ("log_rest", dist.log_rest)):
            self.parts[name].append(t)

    def tensors(self) -> dict[str, torch.Tensor]:
        cast = {"positions": torch.int32, "top1": torch.int32, "idx": torch.int32}
        return {n: torch.cat(v).to(cast.get(n, torch.float32)).contiguous() for n, v in self.parts.items()}


class VariantCollector:
    """Compares each chunk with the cached baseline, in the same token order."""

    def __init__(self, base: dict[str, torch.Tensor]):
        self.base, self.cursor = base, 0
        self.parts: dict[str, list[torch.Tensor]] = {n: [] for n in ("positions", "nll", "kl", "agree")}

    def __call__(self, positions, targets, logp) -> None:
        lo, hi = self.cursor, self.cursor + len(targets)
        self.cursor = hi
        b = self.base
        dist = CompactDist(b["idx"][lo:hi].long(), b["logp"][lo:hi], b["log_rest"][lo:hi])
        self.parts["positions"].append(positions)
        self.parts["nll"].append(token_nll(logp, targets))
        self.parts["kl"].append(kl_compact(dist, logp))
        self.parts["agree"].append(top1_agreement(b["top1"][lo:hi], logp))

    def tensors(self) -> dict[str, torch.Tensor]:
        return {n: torch.cat(v) for n, v in self.parts.items()}
