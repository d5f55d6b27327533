"""Our GPTQ against GPTQModel 7.6.0 over many calibration draws: the paired ratios ours / theirs
of perplexity and mean KL per draw, pooled per configuration as a geometric mean with a 95 %
confidence interval (Student t over the log ratios of the draws).

One draw cannot settle a 1 % difference: GPTQModel against itself at calibration batch size 2
instead of 1 (`gptqmodel_batch_spread.py`) moves its own perplexity by 0.84 % and its KL by 1.2 %.
Each draw here is one `gptq_vs_gptqmodel.py` run on other samples of the bundled set
(`--calib-seed S`): the same token ids for both tools, scored on the same held-out text.

    PYTHONPATH=. python bench/peer_draws.py [--since bbc5e96] [--out bench/results/peer_draws.json]

Reads bench/results/gptq_vs_gptqmodel*.json and bench/results/draws/*.json. A pair counts only when
our run was made at or after --since (the commit whose solver is being measured; earlier runs are
of an older solver) and both runs have scores; rep 1 of each configuration and draw.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib  # noqa: E402

# two-sided 95 % Student t quantiles by degrees of freedom
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
       11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
       20: 2.086, 25: 2.060, 30: 2.042}


def t95(df: int) -> float:
    return T95.get(df) or T95[max(k for k in T95 if k <= df)]


def descends_from(commit: str | None, since: str) -> bool:
    if not commit:
        return False
    r = subprocess.run(["git", "merge-base", "--is-ancestor", since, commit], cwd=benchlib.ROOT,
                       capture_output=True)
    return r.returncode == 0


def pairs(files: list[Path], since: str) -> list[dict]:
    out, seen = [], set()
    for path in files:
        doc = json.loads(path.read_text())
        seed = doc.get("protocol", {}).get("calibration", {}).get("seed")
        if seed is None:
            continue
        runs, scores = doc.get("runs", {}), doc.get("scores", {})
        for rid, run in runs.items():
            if run.get("impl") != "ours" or run.get("rep") != 1:
                continue
            cfg = run["config"]
            tid = f"{cfg}-theirs-1"
            if tid not in runs or rid not in scores or tid not in scores:
                continue
            if not descends_from(run.get("commit"), since) or (cfg, seed) in seen:
                continue
            seen.add((cfg, seed))
            a, b = scores[rid], scores[tid]
            out.append({"config": cfg, "seed": seed, "file": str(path.relative_to(benchlib.ROOT)),
                        "ours_commit": run.get("commit"), "ours": {"ppl": a["ppl"], "kl": a["kl_mean"]},
                        "theirs": {"ppl": b["ppl"], "kl": b["kl_mean"]},
                        "ppl_ratio": a["ppl"] / b["ppl"], "kl_ratio": a["kl_mean"] / b["kl_mean"]})
    return sorted(out, key=lambda p: (p["config"], p["seed"]))


def pooled(ratios: list[float]) -> dict:
    logs = [math.log(r) for r in ratios]
    n = len(logs)
    mean = statistics.fmean(logs)
    row = {"n": n, "geo_mean": math.exp(mean), "min": min(ratios), "max": max(ratios),
           "worse_than_1pct": sum(r > 1.01 for r in ratios)}
    if n >= 2:
        sd = statistics.stdev(logs)
        half = t95(n - 1) * sd / math.sqrt(n)
        row.update({"sd_log": sd, "ci95": [math.exp(mean - half), math.exp(mean + half)]})
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--since", default="bbc5e96")
    ap.add_argument("--out", type=Path, default=benchlib.ROOT / "bench" / "results" / "peer_draws.json")
    args = ap.parse_args()
    res = benchlib.ROOT / "bench" / "results"
    files = sorted(res.glob("gptq_vs_gptqmodel*.json")) + sorted((res / "draws").glob("*.json"))
    ps = pairs(files, args.since)
    by_cfg: dict[str, list[dict]] = {}
    for p in ps:
        by_cfg.setdefault(p["config"], []).append(p)
    summary = {cfg: {"seeds": [p["seed"] for p in v], "ppl": pooled([p["ppl_ratio"] for p in v]),
                     "kl": pooled([p["kl_ratio"] for p in v])} for cfg, v in by_cfg.items()}
    summary["all"] = {"seeds": None, "ppl": pooled([p["ppl_ratio"] for p in ps]),
                      "kl": pooled([p["kl_ratio"] for p in ps])}
    doc = {"command": "PYTHONPATH=. python " + " ".join(["bench/peer_draws.py", *sys.argv[1:]]),
           "since": args.since, "commit": benchlib.git_commit(),
           "protocol": "per draw: gptq_vs_gptqmodel.py with --calib-seed S (its protocol block in each file); "
                       "ratio = ours-1 / theirs-1; pooled: geometric mean, 95 % CI by Student t on log ratios",
           "pairs": ps, "summary": summary}
    benchlib.write_json(args.out, doc)

    def cell(s: dict) -> str:
        ci = f" [{s['ci95'][0]:.3f}, {s['ci95'][1]:.3f}]" if "ci95" in s else ""
        return f"{s['geo_mean']:.3f}{ci} ({s['min']:.3f}–{s['max']:.3f}; >1 % worse in {s['worse_than_1pct']})"

    print("| config | draws | ppl ours/theirs: geo mean [95 % CI] (range) | mean KL ours/theirs |")
    print("|---|---|---|---|")
    for cfg, s in summary.items():
        print(f"| {cfg} | {s['ppl']['n']} | {cell(s['ppl'])} | {cell(s['kl'])} |")


if __name__ == "__main__":
    main()
