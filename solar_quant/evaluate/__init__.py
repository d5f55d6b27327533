"""Evaluation against the fp16 baseline: perplexity, KL, long context, passkey, reports."""
