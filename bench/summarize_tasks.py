"""Condense `eval --tasks/--generate` reports into a bench result and print the README tables.

    PYTHONPATH=. python bench/summarize_tasks.py dynamic:2=A1/report.json,A2/report.json ntk-static:2=B1/report.json \
        --command "..." --note "..." --out bench/results/tasks_smollm2.json

Keeps per model and rope: each task's score, stderr, items/s, delta with its paired interval,
flips (lost/gained), the generation comparison per prompt with both answers' text, the short
perplexity; and the protocol (task list, limit, seeds, lm-eval version, task files' sha256,
prompt file sha256, template, rope per model). Absolute paths are cut to the folder name.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

TASK_KEYS = ("metric", "shots", "n", "score", "stderr", "lm_eval_score", "items_per_s", "seconds",
             "delta", "low", "high", "flips", "lost", "gained")
GEN_KEYS = ("id", "tokens", "first_divergence", "identical_share", "base_loglik", "base_loglik_of_variant", "text")


def _name(path: str) -> str:
    return Path(path).name


def condense(r: dict) -> dict:
    p = r["protocol"]
    tasks = dict(p.get("tasks") or {})
    tasks["task_dirs"] = [_name(d) for d in tasks.get("task_dirs", [])]
    gen = dict(p.get("generation") or {})
    return {
        "created": r["created"], "wall_s": round(r["wall_s"], 1), "machine": r["machine"], "versions": r["versions"],
        "protocol": {"rope_override": p["rope_override"], "dtype": p["dtype"], "device": p["device"],
                     "short": p["sections"]["short"], "tasks": tasks, "generation": gen},
        "models": [{"name": m["name"], "role": m["role"], "quant_method": m["identity"]["quant_method"],
                    "rope": m["rope"], "notes": m.get("notes", []), "load_s": round(m.get("load_s", 0), 1),
                    "eval_s": round(m.get("eval_s", 0), 1), "ppl": m["short"]["ppl"],
                    "ppl_ratio": m["short"].get("ppl_ratio"), "kl_mean": m["short"].get("kl_mean"),
                    "tasks": {k: {x: t.get(x) for x in TASK_KEYS} for k, t in (m.get("tasks") or {}).items()},
                    "generation": [{x: g.get(x) for x in GEN_KEYS} for g in m.get("generation") or []],
                    "generation_summary": m.get("generation_summary")}
                   for m in r["models"]],
    }


def pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def table(runs: dict) -> str:
    lines = ["| rope | model | " + " | ".join(next(iter(runs.values()))["models"][0]["tasks"]) +
             " | mean | ppl @512 | identical answers | median first divergence | fp16 log-lik of answers |",
             "|" + "---|" * (7 + len(next(iter(runs.values()))["models"][0]["tasks"]))]
    for rope, doc in runs.items():
        for m in doc["models"]:
            cells = []
            for t in m["tasks"].values():
                cell = f"{pct(t['score'])} ± {pct(t['stderr'])}"
                if t.get("delta") is not None:
                    cell += f" (Δ {100 * t['delta']:+.1f} [{100 * t['low']:+.1f}, {100 * t['high']:+.1f}], flips {pct(t['flips'])} %)"
                cells.append(cell)
            mean = sum(t["score"] for t in m["tasks"].values()) / len(m["tasks"])
            g = m.get("generation_summary") or {}
            own = [x["base_loglik"] for x in m["generation"] if x.get("base_loglik") is not None]
            ll = g.get("base_loglik_of_variant_mean") if g else (sum(own) / len(own) if own else None)
            lines.append(f"| {rope} | {m['name']} | " + " | ".join(cells) + f" | {pct(mean)} | {m['ppl']:.2f} | "
                         + (f"{g['identical']}/{g['prompts']}" if g else "–") + " | "
                         + (str(g.get("first_divergence_median")) if g else "–") + " | "
                         + (f"{ll:.3f}" if ll is not None else "–") + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("reports", nargs="+", help="ROPE=path/to/report.json")
    ap.add_argument("--command", required=True)
    ap.add_argument("--note", default="")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    runs = {}
    for item in args.reports:
        rope, _, paths = item.partition("=")
        docs = [condense(json.loads(Path(path).read_text())) for path in paths.split(",")]
        # one report per variant, run in parallel against one cached baseline: keep the baseline once
        merged = docs[0]
        merged["wall_s"] = [d["wall_s"] for d in docs]
        merged["models"] = docs[0]["models"][:1] + [m for d in docs for m in d["models"] if m["role"] == "variant"]
        runs[rope] = merged
    doc = {"command": args.command, "note": args.note, "runs": runs}
    Path(args.out).write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
    print(table(runs))


if __name__ == "__main__":
    main()
