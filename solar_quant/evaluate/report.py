"""report.json (every number with its protocol), report.md (tables) and the console table."""

from __future__ import annotations

import datetime as dt
import json
import math
import os
import platform
from importlib import metadata
from pathlib import Path

from solar_quant import TOOL_NAME, __version__
from solar_quant.errors import OutputError

PACKAGES = ("torch", "transformers", "accelerate", "bitsandbytes", "safetensors", "optimum", "gptqmodel", "lm-eval")


def versions() -> dict:
    out = {"python": platform.python_version(), TOOL_NAME: __version__}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def machine() -> dict:
    import psutil
    import torch

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "ram_gib": round(psutil.virtual_memory().total / 1024**3, 1), "gpus": gpus}


def build_report(entries: list[dict], protocol: dict, wall_s: float) -> dict:
    return {"tool": TOOL_NAME, "version": __version__,
            "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "versions": versions(), "machine": machine(), "protocol": protocol, "models": entries,
            "wall_s": wall_s}


def _clean(x):
    """JSON has no NaN/Inf: write them as null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def _f(x, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return f"{x:.{digits}g}" if isinstance(x, float) else str(x)


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows])


def short_rows(report: dict) -> list[list[str]]:
    rows = []
    for m in report["models"]:
        s = m["short"]
        rows.append([m["name"], m["role"], _f(s["ppl"]), _f(s.get("ppl_ratio")), _f(s.get("kl_mean")),
                     _f(s.get("kl_p99")), _f(s.get("top1")), f"{m.get('load_s', 0) + m.get('eval_s', 0):.1f}"])
    return rows


SHORT_HEADER = ["model", "role", "ppl", "ratio", "KL mean", "KL p99", "top-1", "time s"]


def markdown(report: dict) -> str:
    p = report["protocol"]
    short = p["sections"]["short"]
    out = [f"# solar-quant eval report\n",
           f"Text `{p['text']['source']}` (sha256 `{p['text']['sha256'][:16]}…`, {p['tokens']} tokens), "
           f"dtype {p['dtype']}, device {p['device']}, KL {p['kl']['method']} (k={p['kl']['k']}), "
           f"rope override {p['rope_override'] or 'none (each model’s config)'}, trained length "
           f"{p['trained_length'] or 'as configured'}. Wall time {report['wall_s']:.1f} s.\n",
           f"## Short context\n\nseqlen {short['seqlen']}, stride {short['stride']}, {short['windows']} windows, "
           f"{short['scored_tokens']} scored tokens.\n", _table(SHORT_HEADER, short_rows(report)), ""]
    for name, sec in p["sections"].items():
        if name == "short":
            continue
        c = str(sec["context"])
        out.append(f"## Context {c}\n\n{sec['windows']} window(s) of {c} tokens, buckets of {sec['bucket']} positions.\n")
        rows = []
        for m in report["models"]:
            for b in m["long"][c]["buckets"]:
                rows.append([m["name"], f"{b['start']}–{b['end']}", _f(b["ppl"]), _f(b.get("ppl_ratio")),
                             _f(b.get("kl_mean")), _f(b.get("kl_p99")), _f(b.get("top1"))])
        out += [_table(["model", "positions", "ppl", "ratio", "KL mean", "KL p99", "top-1"], rows), "",
                f"![ppl](ppl_by_position_c{c}.png) ![kl](kl_by_position_c{c}.png)\n"]
    if p.get("passkey"):
        pk = p["passkey"]
        cols = [(str(c), str(d)) for c in pk["contexts"] for d in pk["depths"]]
        rows = [[m["name"]] + [_f(m["passkey"][c][d]["accuracy"], 3) for c, d in cols] for m in report["models"]]
        out += [f"## Passkey retrieval\n\n{pk['trials']} trial(s) per cell, template {pk['template']}; "
                "accuracy (exact 5-digit number).\n",
                _table(["model"] + [f"ctx {c} @ {d}" for c, d in cols], rows), ""]
    out += _tasks_markdown(report) + _generation_markdown(report)
    gates = report.get("gates", {}).get("results", [])
    if gates:
        out += ["## Gates\n", _table(["model", "check", "value", "limit", "result"],
                                     [[g["model"], g["check"], _f(g["value"]), _f(g["limit"]),
                                       "pass" if g["passed"] else "**FAIL**"] for g in gates]), ""]
    return "\n".join(out) + "\n"


def console_table(report: dict) -> str:
    rows = [SHORT_HEADER] + short_rows(report)
    widths = [max(len(r[i]) for r in rows) for i in range(len(SHORT_HEADER))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    for m in report["models"]:
        for c, sec in (m.get("long") or {}).items():
            o = sec["overall"]
            lines.append(f"{m['name']} context {c}: ppl {_f(o['ppl'])} ratio {_f(o.get('ppl_ratio'))} "
                         f"KL {_f(o.get('kl_mean'))}")
        for c, depths in (m.get("passkey") or {}).items():
            lines.append(f"{m['name']} passkey context {c}: " +
                         ", ".join(f"depth {d} {v['accuracy']:.2f}" for d, v in depths.items()))
    lines += task_lines(report)
    for g in report.get("gates", {}).get("results", []):
        lines.append(f"gate {g['flag']} {g['model']} {g['check']}: {_f(g['value'])} "
                     f"(limit {_f(g['limit'])}) {'pass' if g['passed'] else 'FAIL'}")
    return "\n".join(lines)


def _pct(x) -> str:
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else f"{100 * x:.1f}"


def task_cell(t: dict, variant: bool) -> str:
    """'63.2 ± 1.4', and for a variant 'Δ -0.8 [-1.9, +0.3], flips 4.1 %'."""
    cell = f"{_pct(t['score'])} ± {_pct(t['stderr'])}"
    if variant and "delta" in t:
        cell += (f" (Δ {100 * t['delta']:+.1f} [{100 * t['low']:+.1f}, {100 * t['high']:+.1f}], "
                 f"flips {_pct(t['flips'])} %)")
    return cell


H4_LABELS = ("arc_challenge:25", "hellaswag:10", "mmlu:5", "truthfulqa_mc2:0")


def _tasks_markdown(report: dict) -> list[str]:
    p = report["protocol"].get("tasks")
    if not p:
        return []
    models = report["models"]
    labels = list(models[0].get("tasks") or {})
    ref = p.get("reference")
    head = ["task", "metric", "shots", "items"] + (["published fp16"] if ref else []) + [m["name"] for m in models]
    rows = []
    for label in labels:
        b = models[0]["tasks"][label]
        row = [label, b["metric"] + (" (mean of subtasks)" if b["group_mean"] else ""), _f(b["shots"]), str(b["n"])]
        if ref:
            row.append(_pct(b.get("reference")))
        rows.append(row + [task_cell(m["tasks"][label], m["role"] == "variant") for m in models])
    from solar_quant.evaluate.behaviour import h4_average

    if h4_average(models[0]["tasks"]) is not None:  # the leaderboard's own headline number
        refs = [models[0]["tasks"][k].get("reference") for k in H4_LABELS]
        published = {k.lower(): v for k, v in (ref or {}).items()}.get("h4")  # the card's own rounded average
        avg = published / 100 if published is not None else (sum(refs) / 4 if None not in refs else None)
        row = ["H4 average", "mean of the four", "", ""] + ([_pct(avg)] if ref else [])
        rows.append(row + [_pct(h4_average(m["tasks"])) for m in models])
    speed = "; ".join(f"{m['name']} " + ", ".join(f"{label} {_f(t['items_per_s'], 3)}" for label, t in m["tasks"].items())
                      for m in models)
    return ["## Tasks (lm-eval)\n",
            f"Scores in percent ± standard error, lm-eval {p['lm_eval']}, seeds {p['seeds']}, limit "
            f"{p['limit'] or 'none'} items per task, batch {p['batch_size']}, context {p['context']} tokens. "
            "Δ: variant − baseline with a 95 % paired bootstrap interval over the same items; flips: share of "
            "items whose correct/incorrect outcome differs from the baseline's (continuous scores count as "
            "correct at ≥ 0.5)." + (f" Published fp16 reference: {p.get('reference_source') or 'as given'}." if ref else "") + "\n",
            _table(head, rows), "", f"Items per second: {speed}.\n"]


def _generation_markdown(report: dict) -> list[str]:
    p = report["protocol"].get("generation")
    if not p:
        return []
    models = report["models"]
    base = models[0]
    out = ["## Generation fidelity\n",
           f"Greedy decoding of up to {p['max_new_tokens']} tokens for {p['prompts']} prompts from `{p['file']}` "
           f"(sha256 `{p['sha256'][:16]}…`, template {p['template']}). Per prompt: first token where the variant's "
           "path leaves the baseline's (– = identical), share of identical positions, and the baseline's mean "
           "log-likelihood per token of the variant's answer (the baseline's own answer in brackets).\n"]
    rows = []
    for m in models[1:]:
        for r, b in zip(m.get("generation") or [], base.get("generation") or []):
            rows.append([m["name"], r["id"], _f(r["first_divergence"]), _f(r["identical_share"], 3),
                         f"{_f(r.get('base_loglik_of_variant'), 3)} ({_f(b.get('base_loglik'), 3)})"])
    out += [_table(["model", "prompt", "first divergence", "identical", "fp16 log-lik"], rows), ""]
    for i, b in enumerate(base.get("generation") or []):
        out.append(f"<details><summary>{b['id']}</summary>\n")
        for m in models:
            text = (m.get("generation") or [])[i]["text"].strip().replace("\n", " ⏎ ")
            out.append(f"- **{m['name']}**: {text}")
        out.append("\n</details>\n")
    return out


def task_lines(report: dict) -> list[str]:
    lines = []
    for m in report["models"]:
        for label, t in (m.get("tasks") or {}).items():
            lines.append(f"{m['name']} task {label} {t['metric']}: {task_cell(t, m['role'] == 'variant')}")
        g = m.get("generation_summary")
        if g:
            lines.append(f"{m['name']} generation: {g['identical']}/{g['prompts']} identical, identical share "
                         f"{_f(g['identical_share_mean'], 3)}, median first divergence {_f(g['first_divergence_median'])}, "
                         f"fp16 log-lik of its answers {_f(g['base_loglik_of_variant_mean'], 3)}")
    return lines


def _atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def write_report(report: dict, out_dir: str | Path) -> Path:
    """report.json, report.md and the plots, each written under a temporary name and renamed."""
    from solar_quant.evaluate.plots import write_plots

    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        staging = out / ".plots.partial"
        staging.mkdir(exist_ok=True)
        report["plots"] = write_plots(report, staging)
        for name in report["plots"]:
            os.replace(staging / name, out / name)
        staging.rmdir()
        _atomic(out / "report.json", (json.dumps(_clean(report), indent=2) + "\n").encode())
        _atomic(out / "report.md", markdown(report).encode())
    except OSError as e:
        raise OutputError(f"{out}: cannot write the report ({e.strerror}); choose another --out") from None
    return out / "report.json"
