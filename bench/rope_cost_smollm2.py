"""What vLLM's static NTK base costs the fp16 model itself: the same items and prompts scored
under `--rope-scaling dynamic:2` (transformers) and `--rope-scaling ntk-static:2` (vLLM's static base).

Reads the two baseline caches that `eval` wrote (task items, greedy answers, short-context NLL)
and pairs them item by item, as `eval` pairs a variant with its baseline.

    PYTHONPATH=. python bench/rope_cost_smollm2.py DYN_OUT/baseline-cache STATIC_OUT/baseline-cache \
        --command "..." --out bench/results/rope_cost_smollm2.json
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
from safetensors.torch import load_file

from solar_quant.evaluate import generation as gen
from solar_quant.evaluate.paired import flips, paired_bootstrap


def load(cache: str) -> tuple[dict, float]:
    root = Path(cache)
    (behaviour,) = root.glob("behaviour-*.json")
    (short,) = root.glob("short-*.safetensors")
    nll = load_file(str(short))["nll"].double()
    return json.loads(behaviour.read_text())["value"], math.exp(nll.mean().item())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("dynamic")
    ap.add_argument("static")
    ap.add_argument("--command", required=True)
    ap.add_argument("--note", default="")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    (dyn, ppl_d), (sta, ppl_s) = load(args.dynamic), load(args.static)
    tasks = {}
    for label, d in dyn["tasks"].items():
        s = sta["tasks"][label]
        assert d["doc_ids"] == s["doc_ids"], label
        boot = paired_bootstrap(np.asarray(d["items"]), np.asarray(s["items"]))
        tasks[label] = {"n": d["n"], "dynamic": d["score"], "ntk_static": s["score"], "stderr": d["stderr"],
                        **boot, **flips(np.asarray(d["items"]), np.asarray(s["items"])),
                        "items_per_s": {"dynamic": d["items_per_s"], "ntk_static": s["items_per_s"]}}
    answers = [{"id": a["id"], **gen.compare(a["tokens_ids"], b["tokens_ids"]), "tokens": len(b["tokens_ids"])}
               for a, b in zip(dyn["generation"], sta["generation"])]
    doc = {"command": args.command, "note": args.note, "ppl": {"dynamic": ppl_d, "ntk_static": ppl_s},
           "tasks": tasks, "generation": answers, "generation_summary": gen.summary(answers)}
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    print("| task | items | fp16 dynamic:2 | fp16 ntk-static:2 | Δ [95 % CI] | flips |")
    print("|---|---|---|---|---|---|")
    for label, t in tasks.items():
        print(f"| {label} | {t['n']} | {100 * t['dynamic']:.1f} | {100 * t['ntk_static']:.1f} | "
              f"{100 * t['delta']:+.1f} [{100 * t['low']:+.1f}, {100 * t['high']:+.1f}] | {100 * t['flips']:.1f} % |")
    g = doc["generation_summary"]
    print(f"\nppl @512: {ppl_d:.3f} vs {ppl_s:.3f}; answers identical {g['identical']}/{g['prompts']}, "
          f"identical share {g['identical_share_mean']:.3f}, median first divergence {g['first_divergence_median']}")


if __name__ == "__main__":
    main()
