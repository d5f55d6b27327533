"""The race (bench/README.md, "The race"): ours with equalization and/or Hessian-weighted clipping
against GPTQModel 7.6.0's best configuration, paired by calibration draw, pooled per configuration.

    PYTHONPATH=. python bench/race.py [--out bench/results/race.json]

Reads our draws from bench/results/race/*.json (`gptq_vs_gptqmodel.py --impls ours`, configs with
a `peer_run_of`), and the peer's runs from every bench/results/gptq_vs_gptqmodel*.json and
bench/results/draws/*.json and bench/results/race/*.json. A pair is formed only when the protocol
matches: same calibration seed, same calibration sha256 (where both files record it; a file that
does not is named in the pair as `calibration_sha256: "not recorded"`), same scoring text (sha256),
same scored tokens, same KL top-k, same fp16 perplexity. Ratios: mean KL ours / theirs, and the
perplexity excess over fp16 (ppl - ppl_fp16) ours / theirs; pooled as in `peer_draws.py`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib  # noqa: E402
from peer_draws import pooled  # noqa: E402

BARS = {4: {"kl": 0.80, "ppl_excess": 0.85}, 3: {"kl": 0.75, "ppl_excess": 0.85}}
MIN_DRAWS = 5


def _protocol(doc: dict) -> dict:
    ep = doc.get("eval_protocol", {})
    return {"text_sha256": ep.get("text", {}).get("sha256"), "tokens": ep.get("sections", {}).get("short", {}).get(
        "scored_tokens"), "kl_k": ep.get("kl", {}).get("k"), "fp16_ppl": (doc.get("fp16") or {}).get("ppl")}


def peer_runs(files: list[Path]) -> dict:
    """(config, seed, text sha) -> the peer's rep-1 run with its score and file's protocol."""
    out = {}
    for path in files:
        doc = json.loads(path.read_text())
        seed = doc.get("protocol", {}).get("calibration", {}).get("seed")
        proto = _protocol(doc)
        for rid, run in doc.get("runs", {}).items():
            score = doc.get("scores", {}).get(rid)
            if run.get("impl") != "theirs" or run.get("rep") != 1 or score is None:
                continue
            key = (run["config"], seed, proto["text_sha256"])
            out.setdefault(key, {"file": str(path.relative_to(benchlib.ROOT)), "score": score, "protocol": proto,
                                 "calibration_sha256": (doc.get("calibration") or {}).get("sha256"), "run": run})
    return out


def pairs(race_files: list[Path], peers: dict) -> tuple[list[dict], list[str]]:
    out, refused = [], []
    for path in race_files:
        doc = json.loads(path.read_text())
        seed = doc.get("protocol", {}).get("calibration", {}).get("seed")
        proto = _protocol(doc)
        configs = doc.get("protocol", {}).get("configs", {})
        for rid, run in doc.get("runs", {}).items():
            cfg = configs.get(run.get("config"), {})
            score = doc.get("scores", {}).get(rid)
            if run.get("impl") != "ours" or "peer_run_of" not in cfg or score is None:
                continue
            peer = peers.get((cfg["peer_run_of"], seed, proto["text_sha256"]))
            name = f"{run['config']} seed {seed} ({path.name})"
            if peer is None:
                refused.append(f"{name}: no peer run of {cfg['peer_run_of']} with this seed and text")
                continue
            diffs = [k for k in ("tokens", "kl_k") if peer["protocol"][k] != proto[k]]
            fp16_a, fp16_b = proto["fp16_ppl"], peer["protocol"]["fp16_ppl"]
            if fp16_a is None or fp16_b is None or abs(fp16_a - fp16_b) > 1e-6 * fp16_a:
                diffs.append("fp16_ppl")
            ours_sha, peer_sha = (doc.get("calibration") or {}).get("sha256"), peer["calibration_sha256"]
            if ours_sha and peer_sha and ours_sha != peer_sha:
                diffs.append("calibration_sha256")
            if diffs:
                refused.append(f"{name}: protocol differs from {peer['file']} in {', '.join(diffs)}")
                continue
            a, b = score, peer["score"]
            out.append({"config": run["config"], "bits": cfg["bits"], "seed": seed, "file": str(path.relative_to(benchlib.ROOT)),
                        "peer_file": peer["file"], "peer_config": cfg["peer_run_of"], "ours_commit": run.get("commit"),
                        "calibration_sha256": ours_sha if peer_sha else "not recorded in the peer's file",
                        "text_sha256": proto["text_sha256"], "fp16_ppl": fp16_a,
                        "ours": {"ppl": a["ppl"], "kl": a["kl_mean"], "wall_s": run.get("wall_s"), "cpu_s": run.get("cpu_s"),
                                 "peak_rss_mib": run.get("peak_rss_mib"), "load1_start": run.get("load1_start")},
                        "theirs": {"ppl": b["ppl"], "kl": b["kl_mean"], "wall_s": peer["run"].get("wall_s"),
                                   "cpu_s": peer["run"].get("cpu_s"), "peak_rss_mib": peer["run"].get("peak_rss_mib")},
                        "kl_ratio": a["kl_mean"] / b["kl_mean"],
                        "ppl_excess_ratio": (a["ppl"] - fp16_a) / (b["ppl"] - fp16_a),
                        "ppl_ratio": a["ppl"] / b["ppl"]})
    return sorted(out, key=lambda p: (p["text_sha256"] or "", p["config"], p["seed"])), refused


def verdict(bits: int, kl: dict, excess: dict) -> dict:
    row = {"bars": BARS.get(bits), "draws": kl["n"]}
    if kl["n"] < MIN_DRAWS or "ci95" not in kl:
        row["status"] = f"not settled: {kl['n']} draw(s) < {MIN_DRAWS}"
    for key, stats in (("kl", kl), ("ppl_excess", excess)):
        bar = BARS.get(bits, {}).get(key)
        upper = stats.get("ci95", [None, None])[1]
        row[key] = {"upper": upper, "geo_mean": stats["geo_mean"], "bar": bar,
                    "met": None if upper is None or bar is None else upper <= bar,
                    "miss_by": None if upper is None or bar is None else upper - bar}
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=benchlib.ROOT / "bench" / "results" / "race.json")
    args = ap.parse_args()
    res = benchlib.ROOT / "bench" / "results"
    race_files = sorted((res / "race").glob("*.json"))
    peers = peer_runs(sorted(res.glob("gptq_vs_gptqmodel*.json")) + sorted((res / "draws").glob("*.json")) + race_files)
    ps, refused = pairs(race_files, peers)
    groups: dict[tuple, list[dict]] = {}
    for p in ps:
        groups.setdefault((p["text_sha256"], p["config"]), []).append(p)
    summary = {}
    for (text, cfg), v in groups.items():
        kl, excess = pooled([p["kl_ratio"] for p in v]), pooled([p["ppl_excess_ratio"] for p in v])
        summary[f"{cfg} | text {text[:12]}"] = {"seeds": [p["seed"] for p in v], "kl": kl, "ppl_excess": excess,
                                                 "ppl": pooled([p["ppl_ratio"] for p in v]),
                                                 "verdict": verdict(v[0]["bits"], kl, excess)}
    doc = {"command": "PYTHONPATH=. python " + " ".join(["bench/race.py", *sys.argv[1:]]), "commit": benchlib.git_commit(),
           "rule": "bench/README.md, 'The race': upper end of the 95 % t interval of the pooled ratio <= bar; "
                   f"< {MIN_DRAWS} draws: not settled", "pairs": ps, "refused": refused, "summary": summary}
    benchlib.write_json(args.out, doc)

    def cell(s: dict) -> str:
        ci = f" [{s['ci95'][0]:.3f}, {s['ci95'][1]:.3f}]" if "ci95" in s else ""
        return f"{s['geo_mean']:.3f}{ci}"

    print("| config | text | draws | mean KL ours/theirs | ppl excess ours/theirs | ppl ours/theirs |\n|---|---|---|---|---|---|")
    for name, s in summary.items():
        cfg, text = name.split(" | text ")
        print(f"| {cfg} | {text} | {s['kl']['n']} | {cell(s['kl'])} | {cell(s['ppl_excess'])} | {cell(s['ppl'])} |")
    for line in refused:
        print(f"not paired: {line}")


if __name__ == "__main__":
    main()
