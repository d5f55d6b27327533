"""Condense an eval report.json into a bench result: protocol, per-model rows, per-bucket rows.

    PYTHONPATH=. python bench/summarize_eval.py OUT/report.json --command "solar-quant eval ..." \
        --out bench/results/eval_smollm2.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

KEYS = ("tokens", "ppl", "ppl_ratio", "kl_mean", "kl_p99", "top1")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("report")
    ap.add_argument("--command", required=True)
    ap.add_argument("--note", default="")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    r = json.loads(Path(args.report).read_text())
    p = r["protocol"]
    doc = {
        "command": args.command, "note": args.note, "created": r["created"], "wall_s": round(r["wall_s"], 1),
        "machine": r["machine"], "versions": r["versions"],
        "protocol": {k: p[k] for k in ("text", "tokenizer", "tokens", "sections", "kl", "rope_override",
                                       "trained_length", "dtype", "device", "passkey")},
        "models": [{"name": m["name"], "role": m["role"], "quant_method": m["identity"]["quant_method"],
                    "rope": m["rope"], "notes": m.get("notes", []), "load_s": round(m.get("load_s", 0), 1),
                    "eval_s": round(m.get("eval_s", 0), 1),
                    "short": {k: m["short"].get(k) for k in KEYS},
                    "long": {c: {"overall": {k: s["overall"].get(k) for k in KEYS},
                                 "buckets": [{"positions": f"{b['start']}-{b['end']}", **{k: b.get(k) for k in KEYS}}
                                             for b in s["buckets"]]}
                             for c, s in (m.get("long") or {}).items()},
                    "passkey": {c: {d: v["accuracy"] for d, v in depths.items()}
                                for c, depths in (m.get("passkey") or {}).items()}}
                   for m in r["models"]],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
