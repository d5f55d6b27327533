"""The streaming GPTQ pipeline with `--device cuda` against `--device cpu` on one synthetic Llama.

    PYTHONPATH=. python bench/gptq_pipeline_cuda_check.py [--hidden 2048 --layers 4 --nsamples 32 --seqlen 512]
        [--out result.json]

Writes a random fp16 Llama (Llama-2 proportions: intermediate = 2.6875 x hidden, GQA 4:1),
quantizes it 4-bit g128 with GPTQ on CUDA and on the CPU from the same random calibration ids,
and prints wall times, peak host RSS / GPU memory, and how far the two folders differ: share
of identical codes per linear and the relative difference of the dequantized weights. On CUDA
the layer forwards run in fp16 (GPTQ itself and the Hessians in fp32), so the two devices
are not expected to agree bit for bit; they should agree closely.

Then, on the first CUDA device, the CLI itself: `solar-quant quantize ... --device cuda
--checkpoint-every 0` SIGKILLed after layer 1 (the pipeline's test hook), `--resume`, and the
weight shards compared byte for byte with the uninterrupted CUDA run's (determinism and resume on CUDA).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--devices", default="cuda,cpu")
    ap.add_argument("--out", help="write the results as JSON here")
    args = ap.parse_args()
    result = {"args": vars(args), "torch": torch.__version__,
              "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None, "runs": {}}

    from solar_quant.calibration.artifact import CalibrationSet
    from solar_quant.models.synthetic import llama_config, write_random_llama
    from solar_quant.options import GptqOptions, OutputOptions
    from solar_quant.pipeline.gptq import build_gptq_variant

    tmp = Path(tempfile.mkdtemp())
    cfg = llama_config(hidden=args.hidden, layers=args.layers, heads=args.hidden // 128, kv_heads=max(1, args.hidden // 512),
                       intermediate=int(args.hidden * 2.6875) // 64 * 64, vocab=4096, max_positions=4096)
    src = write_random_llama(tmp / "src", cfg, seed=0, std=0.02)
    ids = torch.randint(0, 4096, (args.nsamples, args.seqlen), generator=torch.Generator().manual_seed(0))
    calib = CalibrationSet(ids, {})
    outs = {}
    for dev in args.devices.split(","):
        if dev.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        outs[dev] = build_gptq_variant(src, tmp / f"q-{dev}", GptqOptions(bits=4, group_size=128), calib,
                                       OutputOptions(), device=dev, log=lambda m: None)
        wall = time.perf_counter() - t
        gpu = torch.cuda.max_memory_allocated() / 2**30 if dev.startswith("cuda") else 0.0
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        result["runs"][dev] = {"wall_s": round(wall, 2), "peak_rss_so_far_gib": round(rss, 2), "peak_gpu_gib": round(gpu, 2)}
        print(f"{dev}: {wall:.1f} s wall, peak host RSS so far {rss:.2f} GiB, peak GPU allocated {gpu:.2f} GiB", flush=True)
    if len(outs) == 2:
        result["cuda_vs_cpu"] = compare(*outs.values())
    cuda = next((d for d in outs if d.startswith("cuda")), None)
    if cuda:
        result["cli_resume_on_cuda"] = cli_resume(src, calib, tmp, cuda, outs[cuda])
        print(json.dumps(result["cli_resume_on_cuda"]), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


def digest(folder: Path) -> str:
    """sha256 over the weight shards and the quantization config (the calibration card differs:
    the CLI's artifact records a tokenizer the library run had none of)."""
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file() and (p.suffix == ".safetensors" or p.name == "quantize_config.json"):
            h.update(str(p.relative_to(folder)).encode() + p.read_bytes())
    return h.hexdigest()


def word_level_tokenizer(folder: Path, vocab: int) -> None:
    """A stand-in tokenizer ("t0".."tN") so the CLI's calibration-artifact checks have one to compare."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "t1", "eos_token": "t2", "unk_token": "t0"}))


def cli_resume(src: Path, calib, tmp: Path, dev: str, reference: Path) -> dict:
    """Kill the CLI after layer 1 on `dev`, resume it, compare with the library run's folder."""
    from solar_quant.calibration.artifact import CalibrationSet, tokenizer_identity

    word_level_tokenizer(src, 4096)
    calib_dir = CalibrationSet(calib.input_ids, {"tokenizer": tokenizer_identity(src)}).save(tmp / "calib")
    out = tmp / "cli-out"
    cmd = [sys.executable, "-m", "solar_quant", "quantize", str(src), str(out), "--method", "gptq", "--bits", "4",
           "--group-size", "128", "--calibration", str(calib_dir), "--device", dev, "--checkpoint-every", "0"]
    env = {**os.environ, "SOLAR_QUANT_QUIET": "1"}
    killed = subprocess.run(cmd, env={**env, "SOLAR_QUANT_STOP_AFTER_LAYER": "1"}, capture_output=True, text=True)
    job_file = tmp / ".cli-out.partial" / ".job" / "job.json"
    if not job_file.is_file():
        return {"killed_rc": killed.returncode, "stderr_tail": killed.stderr[-600:]}
    job = json.loads(job_file.read_text())
    resumed = subprocess.run([*cmd, "--resume"], env={**env, "SOLAR_QUANT_QUIET": "0"}, capture_output=True, text=True)
    return {"killed_rc": killed.returncode, "layers_saved_at_kill": job["layers_done"],
            "resumed_rc": resumed.returncode, "resumed_stderr_tail": resumed.stderr[-400:],
            "placement_log": [line for line in resumed.stderr.splitlines() if "calibration activations" in line],
            "weights_identical_to_uninterrupted": resumed.returncode == 0 and digest(out) == digest(reference)}


def compare(a: Path, b: Path) -> None:
    from safetensors import safe_open

    from solar_quant.formats.gptq_v1 import dequantize, unpack

    bits = json.loads((a / "config.json").read_text())["quantization_config"]["bits"]
    fa, fb = safe_open(str(a / "model.safetensors"), "pt"), safe_open(str(b / "model.safetensors"), "pt")
    worst_rel, worst_same = 0.0, 1.0
    for name in sorted(k[: -len(".qweight")] for k in fa.keys() if k.endswith(".qweight")):
        ta = {k: fa.get_tensor(f"{name}.{k}") for k in ("qweight", "qzeros", "scales", "g_idx")}
        tb = {k: fb.get_tensor(f"{name}.{k}") for k in ("qweight", "qzeros", "scales", "g_idx")}
        same = float((unpack(ta, bits)[0] == unpack(tb, bits)[0]).float().mean())
        wa, wb = dequantize(ta, bits), dequantize(tb, bits)
        rel = float((wa - wb).norm() / wa.norm())
        worst_rel, worst_same = max(worst_rel, rel), min(worst_same, same)
    ra = json.loads((a / "solar_quant.json").read_text())["layers"]
    rb = json.loads((b / "solar_quant.json").read_text())["layers"]
    err = lambda r: sum(lin["rel_output_error"] for layer in r for lin in layer["linears"].values()) / sum(len(layer["linears"]) for layer in r)
    print(f"cuda vs cpu: worst share of identical codes {worst_same:.4f}, worst relative dequantized-weight difference "
          f"{worst_rel:.4f}; mean relative output error cuda {err(ra):.5f} cpu {err(rb):.5f}")
    return {"worst_identical_codes": round(worst_same, 5), "worst_rel_dequant_diff": round(worst_rel, 5),
            "mean_rel_output_error": {"cuda": round(err(ra), 6), "cpu": round(err(rb), 6)}}


if __name__ == "__main__":
    main()
