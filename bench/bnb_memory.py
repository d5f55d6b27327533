"""Peak host memory and wall time: solar-quant's streamed bnb conversion vs transformers' own
load-quantize-save path, on synthetic sharded Llama checkpoints of two depths.

Run by hand (not part of the test suite; ~10 minutes on 2 cores, ~15 GB of scratch disk):

    PYTHONPATH=. python bench/bnb_memory.py --work /tmp/bnbbench --out bench/results/bnb_memory.json

Each conversion runs in a fresh subprocess; its peak RSS is the kernel's high-water mark
for that child (`os.wait4` -> ru_maxrss), which counts memory-mapped checkpoint pages the
process touched as well as its own allocations. Sources are written once and reused.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPE = dict(hidden=4096, heads=32, kv_heads=8, intermediate=11008, vocab=32000, max_positions=4096)
DEPTHS = (4, 8)
SHARD_BYTES = 1024**3
METHODS = ("bnb-nf4", "bnb-int8")

THEIRS = """
import sys, torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig
src, out, method = sys.argv[1:4]
q = (BitsAndBytesConfig(load_in_8bit=True) if method == "bnb-int8" else
     BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float16))
model = AutoModelForCausalLM.from_pretrained(src, quantization_config=q, dtype=torch.float16)
model.save_pretrained(out)
"""


def make_source(work: Path, layers: int) -> Path:
    from solar_quant.models.synthetic import llama_config, write_random_llama

    path = work / f"src-{layers}L"
    if not (path / "manifest.json").is_file():
        cfg = llama_config(layers=layers, **SHAPE)
        write_random_llama(path, cfg, seed=0, shard_bytes=SHARD_BYTES)
    return path


def measure(cmd: list[str]) -> dict:
    """Run `cmd` as a fresh child; return its wall time, CPU time (user + system) and peak RSS."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SOLAR_QUANT_QUIET": "1", "HF_HUB_OFFLINE": "1"}
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    stderr = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{stderr.decode()[-2000:]}")
    return {"wall_s": round(wall, 1), "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
            "peak_rss_mib": round(usage.ru_maxrss / 1024)}


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*.safetensors"))


def run_one(src: Path, work: Path, method: str, tool: str) -> dict:
    out = work / f"out-{src.name}-{method}-{tool}"
    shutil.rmtree(out, ignore_errors=True)
    if tool == "solar-quant":
        cmd = [sys.executable, "-m", "solar_quant", "quantize", str(src), str(out), "--method", method]
    else:
        cmd = [sys.executable, "-c", THEIRS, str(src), str(out), method]
    result = measure(cmd)
    result["output_bytes"] = folder_bytes(out)
    shutil.rmtree(out, ignore_errors=True)
    return result


def baseline() -> dict:
    """Peak RSS of a process that only imports what a conversion imports (the floor)."""
    return measure([sys.executable, "-c", "import torch, bitsandbytes.functional, solar_quant.pipeline.bnb"])


def protocol() -> dict:
    import bitsandbytes
    import psutil
    import torch
    import transformers

    return {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "memory_gib": round(psutil.virtual_memory().total / 1024**3, 1), "python": platform.python_version(),
                    "load_average_at_end": [round(x, 1) for x in os.getloadavg()]},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "bitsandbytes": bitsandbytes.__version__},
        "checkpoint": {**SHAPE, "layers": list(DEPTHS), "dtype": "float16", "shard_bytes": SHARD_BYTES,
                       "generator": "solar_quant.models.synthetic.write_random_llama(seed=0)"},
        "theirs": "AutoModelForCausalLM.from_pretrained(src, quantization_config=BitsAndBytesConfig(...), "
                  "dtype=torch.float16).save_pretrained(out)",
        "ours": "python -m solar_quant quantize src out --method M",
        "peak_rss": "os.wait4(child) ru_maxrss of a fresh subprocess per conversion",
        "cpu_s": "ru_utime + ru_stime of that child (wall time depends on other load on the machine)",
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/bnbbench"))
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "bnb_memory.json")
    ap.add_argument("--depths", type=int, nargs="+", default=list(DEPTHS))
    ap.add_argument("--methods", nargs="+", default=list(METHODS))
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    floor = baseline()
    print(f"import floor: {floor['peak_rss_mib']} MiB", flush=True)
    for layers in args.depths:
        src = make_source(args.work, layers)
        source_bytes = folder_bytes(src)
        for method in args.methods:
            row = {"layers": layers, "method": method, "source_bytes": source_bytes}
            for tool in ("solar-quant", "transformers"):
                row[tool] = run_one(src, args.work, method, tool)
            row["rss_ratio"] = round(row["solar-quant"]["peak_rss_mib"] / row["transformers"]["peak_rss_mib"], 3)
            rows.append(row)
            print(json.dumps(row), flush=True)
    doc = {"protocol": protocol(), "import_floor": floor, "results": rows,
           "command": "PYTHONPATH=. python bench/bnb_memory.py --work /tmp/bnbbench"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")
    print(markdown(rows))


def markdown(rows: list[dict]) -> str:
    lines = ["| layers | source GB | method | ours peak RSS MiB | transformers peak RSS MiB | ratio "
             "| ours wall / CPU s | transformers wall / CPU s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        a, b = r["solar-quant"], r["transformers"]
        lines.append(f"| {r['layers']} | {r['source_bytes'] / 1e9:.2f} | {r['method']} | {a['peak_rss_mib']} | "
                     f"{b['peak_rss_mib']} | {r['rss_ratio']:.2f} | {a['wall_s']} / {a['cpu_s']} | {b['wall_s']} / {b['cpu_s']} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
