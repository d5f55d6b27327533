"""Which variant keeps the most quality: the order `plan` recommends from, with its evidence.

Variants fall into tiers, best first; the tiers come from measurements (this project's on
SmolLM2-135M, bench/README.md, and the published Llama-2-70B numbers collected in the project's
notes), the order inside a tier from the grid's granularity (smaller groups and
un-quantized scales first), which is a rule, not a measurement. The order assumes GPTQ variants
are made as the project's recipes make them (act-order + clipping search): without those, plain
GPTQ 4-bit g128 scored below bnb-nf4 on SmolLM2 (ppl x1.363 vs x1.257).
"""

from __future__ import annotations

from dataclasses import dataclass

# (tier name, evidence): the sources a recommendation cites.
TIERS: tuple[tuple[str, str], ...] = (
    ("16-bit", "the reference itself"),
    ("8-bit", "bnb-int8 ppl x1.018, KL 0.015 vs fp16 on SmolLM2-135M (bench/results/eval_smollm2.json); "
              "Llama-2-70B: llama.cpp Q6_K ppl +0.16 % (6-bit; 8-bit is closer still)"),
    ("4-bit GPTQ, groups <= 128", "Llama-2-70B wikitext-2 ppl @2048 (AWQ paper): fp16 3.32, INT4-g128 GPTQ 3.42 "
                                  "(+3.0 %), RTN 3.46; SmolLM2-135M GPTQ 4-bit g128 act-order + clipping "
                                  "ppl x1.153-1.170 vs bnb-nf4 x1.240-1.257 (bench/README.md, README demo)"),
    ("4-bit bitsandbytes", "bnb-nf4 ppl x1.240-1.257 on SmolLM2-135M (bench/README.md); nf4 before fp4 and "
                           "without double quant first (coarser constants): not measured here"),
    ("4-bit, one group per row", "coarser than nf4's 64-blocks: placed by grid granularity, not measured here"),
    ("3-bit GPTQ, grouped", "Llama-2-70B INT3-g128 GPTQ ppl 3.88 (+16.9 %), RTN 3.98 (AWQ paper); SmolLM2-135M "
                            "3-bit g128 act-order + clipping ppl x1.440 (bench/README.md)"),
    ("3-bit, one group per row", "coarser than grouped 3-bit: placed by grid granularity, not measured here"),
    ("2-bit", "Llama-2-70B W2G128 GPTQ 11-task average 28.47 vs fp16 66.12 (AutoRound's published table)"),
    ("unranked", "no quality measurement for this format"),
)


@dataclass(frozen=True)
class Rank:
    tier: int
    within: tuple  # smaller is better inside the tier

    @property
    def tier_name(self) -> str:
        return TIERS[self.tier][0]

    @property
    def evidence(self) -> str:
        return TIERS[self.tier][1]


def rank(variant) -> Rank:
    """The quality rank of a `formats.sizes.Variant` (method, bits, group_size, double_quant, act_order)."""
    method, bits = variant.method, getattr(variant, "bits", 16)
    if method == "fp16":
        return Rank(0, ())
    if method == "bnb-int8":
        return Rank(1, (1, 0))
    if method in ("bnb-nf4", "bnb-fp4"):
        return Rank(3, (method != "bnb-nf4", bool(getattr(variant, "double_quant", False))))
    if method == "gptq":
        group = variant.group_size
        grouped = 0 < group <= 128
        size_key = group if group > 0 else 1 << 30
        within = (0, size_key, not getattr(variant, "act_order", False))
        if bits == 8:
            return Rank(1, within)
        if bits == 4:
            return Rank(2 if grouped else 4, within)
        if bits == 3:
            return Rank(5 if grouped else 6, within)
        if bits == 2:
            return Rank(7, within)
    return Rank(len(TIERS) - 1, ())


def order_key(variant) -> tuple:
    r = rank(variant)
    return (r.tier, r.within)


def best(rows):
    """The fitting plan row of the best quality (ties: the first given), or None."""
    fitting = [r for r in rows if r.fits]
    return min(fitting, key=lambda r: order_key(r.variant)) if fitting else None


GPTQ_ASSUMPTION = ("GPTQ rows assume act-order + the clipping search, as the recipes make them (plain GPTQ 4-bit g128 "
                   "scored below bnb-nf4 on SmolLM2: ppl x1.363 vs x1.257, bench/README.md)")


def figures_for(logits: str) -> str:
    if logits == "last":
        return "serving: generation, last-token logits only (--logits last)"
    return "evaluation: every position's logits scored (--logits all); serving needs less: --logits last"


def recommendation(rows, gpus_text: str, context: int, batch: int, logits: str) -> dict:
    """What `plan` recommends: the best-quality fitting variant, the next ones, and why."""
    chosen = best(rows)
    ordered = sorted(rows, key=lambda r: order_key(r.variant))
    doc = {"figures_for": figures_for(logits), "gptq_assumption": GPTQ_ASSUMPTION,
           "order": [r.variant.name for r in ordered], "variant": None}
    if chosen is None:
        doc["why"] = f"no variant fits {gpus_text} at context {context} x batch {batch}"
        return doc
    r = rank(chosen.variant)
    doc.update(variant=chosen.variant.name, total_bytes=chosen.total_bytes, gpus_used=len(chosen.gpus),
               tier=r.tier_name, evidence=r.evidence,
               next=[x.variant.name for x in ordered if x.fits and x is not chosen][:2],
               why=f"the best-quality variant that fits {gpus_text} at context {context} x batch {batch}")
    return doc


def recommendation_lines(doc: dict) -> list[str]:
    gib = 1024**3
    lines = [f"figures for {doc['figures_for']}"]
    if doc["variant"] is None:
        return lines + [f"recommended: none ({doc['why']})"]
    lines.append(f"recommended: {doc['variant']}, {doc['why']} ({doc['total_bytes'] / gib:.2f} GiB on "
                 f"{doc['gpus_used']} GPU(s)); next: {', '.join(doc['next']) or 'none'}")
    lines.append(f"  quality tier '{doc['tier']}': {doc['evidence']}")
    lines.append(f"  order, best first: {', '.join(doc['order'])}; inside a tier by grid granularity (a rule, "
                 "not a measurement)")
    if doc["variant"].startswith("gptq"):
        lines.append(f"  {doc['gptq_assumption']}")
    return lines
