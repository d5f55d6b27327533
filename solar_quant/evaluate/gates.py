"""Pass/fail gates for CI: short-context ratio, KL and top-1, the worst long-context bucket,
and per task the score drop and the share of flipped items."""

from __future__ import annotations

from solar_quant.options import EvalOptions

# (option field, flag, metric key, "max" or "min")
SHORT_GATES = (("max_ppl_ratio", "--max-ppl-ratio", "ppl_ratio", "max"),
               ("max_kld", "--max-kld", "kl_mean", "max"),
               ("min_top1", "--min-top1", "top1", "min"))
BUCKET_GATES = (("max_ppl_ratio_bucket", "--max-ppl-ratio-bucket", "ppl_ratio"),
                ("max_kld_bucket", "--max-kld-bucket", "kl_mean"))
TASK_GATES = (("max_task_drop", "--max-task-drop", "drop"), ("max_flips", "--max-flips", "flips"))


def _result(model: str, check: str, flag: str, value: float, limit: float, kind: str) -> dict:
    passed = value <= limit if kind == "max" else value >= limit
    if value != value:  # NaN never passes
        passed = False
    return {"model": model, "check": check, "flag": flag, "value": value, "limit": limit, "passed": passed}


def check_gates(report: dict, opts: EvalOptions) -> dict:
    """Every requested gate for every variant; `passed` is False if any result failed."""
    results = []
    for m in (m for m in report["models"] if m["role"] == "variant"):
        for field, flag, key, kind in SHORT_GATES:
            limit = getattr(opts, field)
            if limit is not None:
                results.append(_result(m["name"], key, flag, m["short"][key], limit, kind))
        for field, flag, key in BUCKET_GATES:
            limit = getattr(opts, field)
            if limit is None:
                continue
            for context, section in (m.get("long") or {}).items():
                worst = max(section["buckets"], key=lambda b: b[key] if b[key] == b[key] else float("inf"))
                results.append(_result(m["name"], f"{key} (context {context}, positions {worst['start']}-{worst['end']})",
                                       flag, worst[key], limit, "max"))
        for field, flag, key in TASK_GATES:
            limit = getattr(opts, field, None)
            if limit is None:
                continue
            for label, t in (m.get("tasks") or {}).items():
                results.append(_result(m["name"], f"{key} ({label})", flag, t[key], limit, "max"))
    return {"results": results, "passed": all(r["passed"] for r in results)}
