"""The arithmetic floor of our GPTQ on this CPU: FLOP per decoder layer of the staged pass
(forwards, Hessians, solves) against torch.matmul's measured fp32 rate with 2 threads.

    PYTHONPATH=. python bench/cpu_flop_floor.py MODEL_DIR --nsamples 64 --seqlen 512 [--wall S] [--out J]

`--wall`: a measured quantize wall time (s) to turn into achieved GFLOP/s.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def matmul_gflops(n: int = 1024, reps: int = 10, threads: int = 2) -> float:
    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e9


def layer_flops(cfg: dict, tokens: int, seqlen: int) -> dict:
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    hd = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    per_token = {
        "q/k/v": 2 * h * (q + 2 * kv), "attention (QK^T, AV; SDPA's full square)": 4 * seqlen * q,
        "o": 2 * q * h, "gate/up (stage 4 and the output: twice)": 2 * 2 * 2 * h * i, "down": 2 * i * h,
    }
    hessians = {"q/k/v": 2 * h * h, "o": 2 * q * q, "gate/up": 2 * h * h, "down": 2 * i * i}
    # GPTQ solve: the error feedback is ~N*K^2 multiply-adds per group; the damped inverse ~K^3
    solves = {"q/k/v": 2 * (q + 2 * kv) * h * h + h**3, "o": 2 * h * q * q + q**3,
              "gate/up": 2 * 2 * i * h * h + h**3, "down": 2 * h * i * i + i**3}
    fwd, hes, sol = sum(per_token.values()) * tokens, sum(hessians.values()) * tokens, sum(solves.values())
    return {"forward": fwd, "hessians": hes, "solves": sol, "total": fwd + hes + sol,
            "forward_per_token": per_token, "hessian_per_token": hessians}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--wall", type=float)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    cfg = json.loads((Path(args.model) / "config.json").read_text())
    per_layer = layer_flops(cfg, args.nsamples * args.seqlen, args.seqlen)
    rate = matmul_gflops()
    total = per_layer["total"] * cfg["num_hidden_layers"]
    out = {"model": args.model, "nsamples": args.nsamples, "seqlen": args.seqlen, "flop_per_layer": per_layer,
           "flop_model": total, "matmul_gflops_2_threads_fp32_1024": round(rate, 1),
           "floor_s": round(total / rate / 1e9, 1), "load_average": os.getloadavg(),
           "command": "python " + " ".join(sys.argv)}
    if args.wall:
        out["wall_s"] = args.wall
        out["achieved_gflops"] = round(total / args.wall / 1e9, 2)
        out["fraction_of_matmul_rate"] = round(total / args.wall / 1e9 / rate, 3)
    print(json.dumps(out, indent=1))
    if args.out:
        args.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
