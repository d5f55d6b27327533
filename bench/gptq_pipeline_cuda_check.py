"""The streaming GPTQ pipeline with `--device cuda` against `--device cpu` on one synthetic Llama.

    PYTHONPATH=. python bench/gptq_pipeline_cuda_check.py [--hidden 2048 --layers 4 --nsamples 32 --seqlen 512]

Writes a random fp16 Llama (Llama-2 proportions: intermediate = 2.6875 x hidden, GQA 4:1),
quantizes it 4-bit g128 with GPTQ on CUDA and on the CPU from the same random calibration ids,
and prints wall times, peak host RSS / GPU memory, and how far the two folders differ: share
of identical codes per linear and the relative difference of the dequantized weights. On CUDA
the layer forwards run in fp16 (GPTQ itself and the Hessians in fp32), so the two devices
are not expected to agree bit for bit; they should agree closely.
"""

from __future__ import annotations

import argparse
import json
import resource
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
    args = ap.parse_args()

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
        print(f"{dev}: {wall:.1f} s wall, peak host RSS so far {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB,"
              f" peak GPU allocated {gpu:.2f} GiB", flush=True)
    if len(outs) == 2:
        compare(*outs.values())


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


if __name__ == "__main__":
    main()
