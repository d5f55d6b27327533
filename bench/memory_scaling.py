"""Peak host memory vs depth: our streamed GPTQ and bnb conversions against transformers'
load-quantize-save bnb path, on synthetic sharded Llama checkpoints of equal width.

    PYTHONPATH=. python bench/memory_scaling.py [--layers 4 8 16 32] [--work /tmp/sqbench/memscale]
        [--out bench/results/memory_scaling.json] [--plot bench/results/memory_scaling.png]

Checkpoints: `solar_quant.models.synthetic.write_random_llama` (fp16, seed 0, 512 MB shards,
SmolLM2's tokenizer so the calibration ids are valid), hidden 2048, intermediate 5504, 16 heads /
4 KV heads, vocab 49152, untied lm_head; each is written, converted three ways and deleted
before the next depth (32 layers is ~3.2 GB). Conversions, each a fresh child process with
its peak RSS from `os.wait4` (ru_maxrss, which includes checkpoint pages it memory-mapped):
- ours GPTQ: `solar-quant quantize SRC OUT --method gptq --bits 4 --group-size 128 --calibration C`,
  C = `solar-quant calibrate` 16 x 256 tokens of the bundled set (one artifact for every depth);
- ours bnb: `solar-quant quantize SRC OUT --method bnb-nf4`;
- transformers: `AutoModelForCausalLM.from_pretrained(SRC, quantization_config=BitsAndBytesConfig(
  load_in_4bit=True, bnb_4bit_quant_type="nf4"), dtype=float16).save_pretrained(OUT)`.
Plus the import floor: a child that only imports torch, transformers and our pipelines.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib  # noqa: E402

SHAPE = dict(hidden=2048, heads=16, kv_heads=4, intermediate=5504, vocab=49152, max_positions=4096)
SHARD_BYTES = 512 * 1024**2
TOKENIZER = "/tmp/sqcache/models/SmolLM2-135M-Instruct-fp16"

TRANSFORMERS_BNB = """
import sys, torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig
src, out = sys.argv[1:3]
q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float16)
model = AutoModelForCausalLM.from_pretrained(src, quantization_config=q, dtype=torch.float16, device_map="cpu")
model.save_pretrained(out)
"""
FLOOR = "import torch, transformers, bitsandbytes.functional, solar_quant.pipeline.gptq, solar_quant.pipeline.bnb"


def write_source(work: Path, layers: int, shape: dict) -> Path:
    from solar_quant.models.synthetic import llama_config, write_random_llama

    path = work / f"src-{layers}L"
    if not (path / "manifest.json").is_file():
        write_random_llama(path, llama_config(layers=layers, **shape), seed=0, shard_bytes=SHARD_BYTES,
                           tokenizer_from=TOKENIZER)
    return path


def runs(src: Path, out: Path, calib: Path) -> dict[str, list[str]]:
    py = benchlib.PYTHON
    return {
        "ours_bnb_nf4": [py, "-m", "solar_quant", "quantize", str(src), str(out / "bnb"), "--method", "bnb-nf4"],
        "transformers_bnb_nf4": [py, "-c", TRANSFORMERS_BNB, str(src), str(out / "tf-bnb")],
        "ours_gptq": [py, "-m", "solar_quant", "quantize", str(src), str(out / "gptq"), "--method", "gptq", "--bits", "4",
                      "--group-size", "128", "--calibration", str(calib)],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[4, 8, 16, 32])
    ap.add_argument("--hidden", type=int, default=SHAPE["hidden"])
    ap.add_argument("--intermediate", type=int, default=SHAPE["intermediate"])
    ap.add_argument("--heads", type=int, default=SHAPE["heads"])
    ap.add_argument("--kv-heads", type=int, default=SHAPE["kv_heads"])
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--work", type=Path, default=Path("/tmp/sqbench/memscale"))
    ap.add_argument("--out", type=Path, default=benchlib.ROOT / "bench" / "results" / "memory_scaling.json")
    ap.add_argument("--resume", action="store_true", help="skip depths already in --out")
    ap.add_argument("--plot", type=Path, default=benchlib.ROOT / "bench" / "results" / "memory_scaling.png")
    args = ap.parse_args()
    shape = {**SHAPE, "hidden": args.hidden, "intermediate": args.intermediate, "heads": args.heads,
             "kv_heads": args.kv_heads}
    args.work.mkdir(parents=True, exist_ok=True)
    doc = {"protocol": {"checkpoint": {**shape, "dtype": "float16", "tie_word_embeddings": False,
                                       "shard_bytes": SHARD_BYTES, "generator": "write_random_llama(seed=0, std=0.05)"},
                        "calibration": {"nsamples": args.nsamples, "seqlen": args.seqlen, "source": "bundled set"},
                        "conversions": {k: " ".join(["python", *v[1:]]).replace(str(args.work), "WORK")
                                        for k, v in runs(Path("SRC"), Path("OUT"), Path("CALIB")).items()},
                        "peak_rss": "os.wait4(child) ru_maxrss, fresh process per conversion"},
           "machine": benchlib.machine(), "versions": benchlib.versions(), "commit": benchlib.git_commit(),
           "command": "PYTHONPATH=. python " + " ".join(["bench/memory_scaling.py", *sys.argv[1:]]), "rows": []}
    doc["import_floor"] = benchlib.measure([benchlib.PYTHON, "-c", FLOOR])
    if args.resume and args.out.is_file():  # keep depths finished by an earlier (interrupted) run
        doc["rows"] = [r for r in json.loads(args.out.read_text()).get("rows", []) if r["layers"] in args.layers]
    calib = args.work / "calib"
    for layers in args.layers:
        if any(r["layers"] == layers for r in doc["rows"]):
            continue
        src = write_source(args.work, layers, shape)
        if not (calib / "calibration.safetensors").is_file():
            benchlib.measure([benchlib.PYTHON, "-m", "solar_quant", "calibrate", "--model", str(src), "--out", str(calib),
                              "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen)])
        row = {"layers": layers, "source_bytes": benchlib.folder_bytes(src)}
        out = args.work / f"out-{layers}L"
        for name, cmd in runs(src, out, calib).items():
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            row[name] = {**benchlib.measure(cmd, args.work / f"{name}-{layers}L.log"),
                         "output_bytes": benchlib.folder_bytes(out)}
            print(layers, name, row[name], flush=True)
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(src, ignore_errors=True)
        doc["rows"].append(row)
        benchlib.write_json(args.out, doc)
    plot(doc, args.plot)
    print(markdown(doc))


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = doc["rows"]
    x = [r["layers"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for key, label, style in (("transformers_bnb_nf4", "transformers load-quantize-save (bnb nf4)", "s-"),
                              ("ours_bnb_nf4", "solar-quant bnb nf4 (streamed)", "o-"),
                              ("ours_gptq", "solar-quant GPTQ 4-bit g128 (layer by layer)", "^-")):
        ax.plot(x, [r[key]["peak_rss_mib"] / 1024 for r in rows], style, label=label)
    ax.plot(x, [r["source_bytes"] / 1024**3 for r in rows], ":", color="gray", label="fp16 checkpoint size")
    ax.axhline(doc["import_floor"]["peak_rss_mib"] / 1024, color="lightgray", lw=1, label="import floor")
    c = doc["protocol"]["checkpoint"]
    ax.set_xlabel(f"decoder layers (hidden {c['hidden']}, intermediate {c['intermediate']})")
    ax.set_ylabel("peak RSS (GiB)")
    ax.set_xticks(x)
    ax.set_title("Peak host memory vs depth (CPU)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def markdown(doc: dict) -> str:
    lines = ["| layers | fp16 GB | ours GPTQ MiB (wall s) | ours bnb-nf4 MiB (wall s) | transformers bnb-nf4 MiB (wall s) |",
             "|---|---|---|---|---|"]
    for r in doc["rows"]:
        cell = lambda k: f"{r[k]['peak_rss_mib']:.0f} ({r[k]['wall_s']:.0f})"  # noqa: E731
        lines.append(f"| {r['layers']} | {r['source_bytes'] / 1e9:.2f} | {cell('ours_gptq')} | {cell('ours_bnb_nf4')} | "
                     f"{cell('transformers_bnb_nf4')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
