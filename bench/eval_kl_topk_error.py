"""Measure how far KL on the baseline's top-k + rest partition falls below the exact KL.

    PYTHONPATH=. python bench/eval_kl_topk_error.py BASELINE VARIANT [VARIANT...] --text FILE \
        --seqlen 512 --max-tokens 512 --k 16 64 256 --out bench/results/kl_topk_error.json

Runs `evaluate` once per k and once with k = vocab (exact KL, full fp32 log-probs cached) on
the same tokens and reports, per variant, mean and p99 KL and their relative error.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from solar_quant.evaluate.run import evaluate
from solar_quant.options import EvalOptions


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("baseline")
    ap.add_argument("variants", nargs="+")
    ap.add_argument("--text", required=True)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=512)
    ap.add_argument("--k", type=int, nargs="+", default=[16, 64, 256])
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    vocab = json.loads((Path(args.baseline) / "config.json").read_text())["vocab_size"]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for k in [vocab, *args.k]:
            start = time.monotonic()
            opts = EvalOptions(text=args.text, seqlen=args.seqlen, max_tokens=args.max_tokens, kl_topk=k,
                               passkey_trials=0)
            report = evaluate(args.baseline, args.variants, opts, f"{tmp}/k{k}", log=lambda *_: None,
                              show=lambda *_: None)
            results[k] = {m["name"]: m["short"] for m in report["models"] if m["role"] == "variant"}
            results[k]["_wall_s"] = time.monotonic() - start
            results[k]["_tokens"] = report["protocol"]["sections"]["short"]["scored_tokens"]
    exact = results[vocab]
    rows = []
    for k in args.k:
        for name, s in results[k].items():
            if name.startswith("_"):
                continue
            e = exact[name]
            rows.append({"variant": name, "k": k, "kl_mean": s["kl_mean"], "kl_mean_exact": e["kl_mean"],
                         "kl_mean_rel_error": (e["kl_mean"] - s["kl_mean"]) / e["kl_mean"],
                         "kl_p99": s["kl_p99"], "kl_p99_exact": e["kl_p99"],
                         "kl_p99_rel_error": (e["kl_p99"] - s["kl_p99"]) / e["kl_p99"]})
    doc = {"baseline": args.baseline, "text": args.text, "seqlen": args.seqlen, "max_tokens": args.max_tokens,
           "scored_tokens": exact["_tokens"], "vocab": vocab, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    for r in rows:
        print(f"{r['variant']:40s} k={r['k']:4d} KL {r['kl_mean']:.6f} exact {r['kl_mean_exact']:.6f} "
              f"({100 * r['kl_mean_rel_error']:.3f}% low)  p99 {r['kl_p99']:.5f} exact {r['kl_p99_exact']:.5f}")


if __name__ == "__main__":
    main()
