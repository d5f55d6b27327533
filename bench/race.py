"""The race (bench/README.md, "The race"): ours with equalization and/or Hessian-weighted clipping
against GPTQModel 7.6.0's best configuration and AutoRound 0.16.1, paired by calibration draw,
pooled per configuration, peer and scoring text.

    PYTHONPATH=. python bench/race.py [--out bench/results/race.json]

Reads our draws from bench/results/race/*.json (`gptq_vs_gptqmodel.py --impls ours`, configs with
`ours_extra`), and the peers' runs (impl `theirs`: GPTQModel; `autoround`) from every
bench/results/gptq_vs_gptqmodel*.json, bench/results/draws/*.json and bench/results/race/*.json.
Our config names its GPTQModel partner (`peer_run_of`) and its AutoRound partner
(`autoround_run_of`: same bits and group size). A pair is formed only when the protocol matches:
same calibration seed, same calibration sha256 (where both files record it; a file that does not
is named in the pair as `calibration_sha256: "not recorded"`), same scoring text (sha256), same
scored tokens, same KL top-k, same fp16 perplexity. Ratios: mean KL ours / peer, and the
perplexity excess over fp16 (ppl - ppl_fp16) ours / peer; pooled as in `peer_draws.py`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib  # noqa: E402
from gptq_vs_gptqmodel import autoround_config  # noqa: E402
from peer_draws import pooled  # noqa: E402

BARS = {"gptqmodel": {4: {"kl": 0.80, "ppl_excess": 0.85}, 3: {"kl": 0.75, "ppl_excess": 0.85}},
        # "no worse than AutoRound" at 4 and 3 bits; 2-bit g64 is reported against it without a bar
        "autoround": {4: {"kl": 1.00, "ppl_excess": 1.00}, 3: {"kl": 1.00, "ppl_excess": 1.00}}}
PEER_IMPLS = {"theirs": "gptqmodel", "autoround": "autoround"}  # run impl -> peer
PEER_KEYS = {"gptqmodel": "peer_run_of", "autoround": "autoround_run_of"}  # peer -> our config's field
MIN_DRAWS = 5


def _protocol(doc: dict) -> dict:
    ep = doc.get("eval_protocol", {})
    return {"text_sha256": ep.get("text", {}).get("sha256"), "tokens": ep.get("sections", {}).get("short", {}).get(
        "scored_tokens"), "kl_k": ep.get("kl", {}).get("k"), "fp16_ppl": (doc.get("fp16") or {}).get("ppl")}


def peer_runs(files: list[Path]) -> dict:
    """(config, seed, text sha) -> every rep-1 run of a peer (GPTQModel or AutoRound) with its score
    and file's protocol, in file order (`_pair` takes the one made from our calibration ids)."""
    out = {}
    for path in files:
        doc = json.loads(path.read_text())
        seed = doc.get("protocol", {}).get("calibration", {}).get("seed")
        proto = _protocol(doc)
        for rid, run in doc.get("runs", {}).items():
            score = doc.get("scores", {}).get(rid)
            if run.get("impl") not in PEER_IMPLS or run.get("rep") != 1 or score is None:
                continue
            key = (run["config"], seed, proto["text_sha256"])
            out.setdefault(key, []).append({"file": str(path.relative_to(benchlib.ROOT)), "peer": PEER_IMPLS[run["impl"]],
                                 "score": score, "protocol": proto,
                                 "calibration_sha256": (doc.get("calibration") or {}).get("sha256"), "run": run})
    return out


def _pair(path, doc, run, cfg, score, seed, proto, peer_name, candidates) -> dict | str:
    """One ours/peer pair, or the reason it cannot be formed. Of several peer runs with this seed
    and text, the one whose file records our calibration sha256 wins, then one that records none."""
    key = PEER_KEYS[peer_name]
    name = f"{run['config']} vs {peer_name} seed {seed} ({path.name})"
    if not candidates:
        return f"{name}: no {peer_name} run of {cfg[key]} with this seed and text"
    ours_sha = (doc.get("calibration") or {}).get("sha256")
    peer = min(candidates, key=lambda c: 0 if c["calibration_sha256"] == ours_sha else 1 if not c["calibration_sha256"] else 2)
    diffs = [k for k in ("tokens", "kl_k") if peer["protocol"][k] != proto[k]]
    fp16_a, fp16_b = proto["fp16_ppl"], peer["protocol"]["fp16_ppl"]
    if fp16_a is None or fp16_b is None or abs(fp16_a - fp16_b) > 1e-6 * fp16_a:
        diffs.append("fp16_ppl")
    peer_sha = peer["calibration_sha256"]
    if ours_sha and peer_sha and ours_sha != peer_sha:
        diffs.append("calibration_sha256")
    if diffs:
        return f"{name}: protocol differs from {peer['file']} in {', '.join(diffs)}"
    a, b = score, peer["score"]
    return {"config": run["config"], "peer": peer_name, "bits": cfg["bits"], "group_size": cfg.get("group_size"),
            "seed": seed, "file": str(path.relative_to(benchlib.ROOT)),
            "peer_file": peer["file"], "peer_config": cfg[key], "ours_commit": run.get("commit"),
            "calibration_sha256": ours_sha if peer_sha else "not recorded in the peer's file",
            "text_sha256": proto["text_sha256"], "fp16_ppl": fp16_a,
            "ours": {"ppl": a["ppl"], "kl": a["kl_mean"], "wall_s": run.get("wall_s"), "cpu_s": run.get("cpu_s"),
                     "peak_rss_mib": run.get("peak_rss_mib"), "load1_start": run.get("load1_start")},
            "theirs": {"ppl": b["ppl"], "kl": b["kl_mean"], "wall_s": peer["run"].get("wall_s"),
                       "cpu_s": peer["run"].get("cpu_s"), "peak_rss_mib": peer["run"].get("peak_rss_mib"),
                       "load1_start": peer["run"].get("load1_start")},
            "kl_ratio": a["kl_mean"] / b["kl_mean"],
            "ppl_excess_ratio": (a["ppl"] - fp16_a) / (b["ppl"] - fp16_a),
            "ppl_ratio": a["ppl"] / b["ppl"]}


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
            if run.get("impl") != "ours" or "ours_extra" not in cfg or score is None:
                continue
            if "autoround_run_of" not in cfg:  # files written before AutoRound joined the race
                cfg = {**cfg, "autoround_run_of": autoround_config(cfg["bits"], cfg["group_size"])}
            for peer_name, key in PEER_KEYS.items():
                if key not in cfg:
                    continue
                pair = _pair(path, doc, run, cfg, score, seed, proto, peer_name, peers.get((cfg[key], seed, proto["text_sha256"])))
                if isinstance(pair, str):
                    refused.append(pair)
                else:
                    out.append(pair)
    return sorted(out, key=lambda p: (p["text_sha256"] or "", p["peer"], p["config"], p["seed"])), refused


def verdict(peer: str, bits: int, kl: dict, excess: dict) -> dict:
    bars = BARS[peer].get(bits, {})
    row = {"bars": bars or None, "draws": kl["n"]}
    if kl["n"] < MIN_DRAWS or "ci95" not in kl:
        row["status"] = f"not settled: {kl['n']} draw(s) < {MIN_DRAWS}"
    for key, stats in (("kl", kl), ("ppl_excess", excess)):
        bar = bars.get(key)
        upper = stats.get("ci95", [None, None])[1]
        row[key] = {"upper": upper, "geo_mean": stats["geo_mean"], "bar": bar,
                    "met": None if upper is None or bar is None else upper <= bar,
                    "miss_by": None if upper is None or bar is None else upper - bar}
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=benchlib.ROOT / "bench" / "results" / "race.json")
    ap.add_argument("--ours", type=Path, default=benchlib.ROOT / "bench" / "results" / "race",
                    help="the folder of our draws (race_campaign.sh's RACE_RESULTS); peers are read from it and "
                         "from bench/results/race too")
    args = ap.parse_args()
    res = benchlib.ROOT / "bench" / "results"
    race_files = sorted(args.ours.resolve().glob("*.json"))
    peer_files = sorted(res.glob("gptq_vs_gptqmodel*.json")) + sorted((res / "draws").glob("*.json"))
    peer_files += sorted(set(sorted((res / "race").glob("*.json")) + race_files))
    peers = peer_runs(peer_files)
    ps, refused = pairs(race_files, peers)
    groups: dict[tuple, list[dict]] = {}
    for p in ps:
        groups.setdefault((p["text_sha256"], p["peer"], p["config"]), []).append(p)
    summary = {}
    for (text, peer, cfg), v in groups.items():
        kl, excess = pooled([p["kl_ratio"] for p in v]), pooled([p["ppl_excess_ratio"] for p in v])
        summary[f"{cfg} | {peer} | text {text[:12]}"] = {
            "seeds": [p["seed"] for p in v], "kl": kl, "ppl_excess": excess, "ppl": pooled([p["ppl_ratio"] for p in v]),
            "verdict": verdict(peer, v[0]["bits"], kl, excess)}
    doc = {"command": "PYTHONPATH=. python " + " ".join(["bench/race.py", *sys.argv[1:]]), "commit": benchlib.git_commit(),
           "rule": "bench/README.md, 'The race': upper end of the 95 % t interval of the pooled ratio <= bar; "
                   f"< {MIN_DRAWS} draws: not settled", "pairs": ps, "refused": refused, "summary": summary}
    benchlib.write_json(args.out, doc)

    def cell(s: dict) -> str:
        ci = f" [{s['ci95'][0]:.3f}, {s['ci95'][1]:.3f}]" if "ci95" in s else ""
        return f"{s['geo_mean']:.3f}{ci}"

    print("| config | peer | text | draws | mean KL ours/peer | ppl excess ours/peer | ppl ours/peer |\n"
          "|---|---|---|---|---|---|---|")
    for name, s in summary.items():
        cfg, peer, text = name.split(" | ")
        print(f"| {cfg} | {peer} | {text.removeprefix('text ')} | {s['kl']['n']} | {cell(s['kl'])} | "
              f"{cell(s['ppl_excess'])} | {cell(s['ppl'])} |")
    for line in refused:
        print(f"not paired: {line}")


if __name__ == "__main__":
    main()
