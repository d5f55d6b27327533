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

PACKAGES = ("torch", "transformers", "accelerate", "bitsandbytes", "safetensors", "optimum", "gptqmodel")


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
    for g in report.get("gates", {}).get("results", []):
        lines.append(f"gate {g['flag']} {g['model']} {g['check']}: {_f(g['value'])} "
                     f"(limit {_f(g['limit'])}) {'pass' if g['passed'] else 'FAIL'}")
    return "\n".join(lines)


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
