"""The arithmetic floor of our GPTQ on this CPU: the staged pass's matrix products per decoder
layer, each timed at the very shape the pipeline runs it (fp32, 2 threads, best of `--reps`),
summed over the layers; against it, a measured quantize wall time.

    PYTHONPATH=. python bench/cpu_flop_floor.py MODEL_DIR --nsamples 64 --seqlen 512 [--wall S] [--out J]

What one layer does (pipeline/layer_quant.py, pipeline/layers.py `StagedForward`), with
`CHUNK_TOKENS`-token chunks run as `CHUNK_PIECES` pieces:
- forwards, per piece: q/k/v once, attention once (SDPA, causal), o once, gate/up twice (the
  stage that feeds down's Hessian and `finish`, which recomputes them instead of keeping the
  [tokens, intermediate] product), down once;
- Hessians, per chunk: X^T X for q/k/v's, o's and gate/up's inputs (hidden wide) and down's
  (intermediate wide);
- solves: ~2 N K^2 per group of N rows plus K^3 for the inverse, counted at the Hessian
  product's rate (they run on one thread and are launch-bound; a few % of the FLOP).

Timing each product at its own shape matters here: a square 1024^2 matmul on loaded cores
measured 64.5 GFLOP/s, the pipeline's shapes on a quiet machine 400-440. `--wall`: a measured
quantize wall time (s) to set against the floor (the whole command: imports, embedding,
packing and writing included).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib  # noqa: E402
from solar_quant.pipeline.gptq import CHUNK_PIECES, CHUNK_TOKENS  # noqa: E402


def best_time(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def shapes(cfg: dict, nsamples: int, seqlen: int) -> dict:
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    hd = cfg.get("head_dim") or h // cfg["num_attention_heads"]
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    chunk = max(1, CHUNK_TOKENS // seqlen)
    piece = -(-chunk // CHUNK_PIECES)
    return {"hidden": h, "intermediate": i, "head_dim": hd, "heads": heads, "kv_heads": kv_heads,
            "q_width": heads * hd, "kv_width": kv_heads * hd, "chunk_samples": chunk, "piece_samples": piece, "pieces": -(-nsamples // piece),
            "chunks": -(-nsamples // chunk), "seqlen": seqlen}


def layer_products(s: dict) -> list[dict]:
    """(name, calls per layer, FLOP per call, a function running one call) for each product."""
    h, i, L, q, kv = s["hidden"], s["intermediate"], s["seqlen"], s["q_width"], s["kv_width"]
    tp, tc = s["piece_samples"] * L, s["chunk_samples"] * L
    x_h, x_q, x_i = torch.randn(tp, h), torch.randn(tp, q), torch.randn(tp, i)
    w = {n: torch.randn(o, k) for n, (o, k) in
         {"q": (q, h), "kv": (kv, h), "o": (h, q), "mlp": (i, h), "down": (h, i)}.items()}
    qh = torch.randn(s["piece_samples"], s["heads"], L, s["head_dim"])
    kvh = torch.randn(s["piece_samples"], s["kv_heads"], L, s["head_dim"])
    c_h, c_i = torch.randn(tc, h), torch.randn(tc, i)
    H_h, H_i = torch.zeros(h, h), torch.zeros(i, i)
    gqa = s["heads"] != s["kv_heads"]
    return [
        {"name": "q_proj", "calls": s["pieces"], "flop": 2 * tp * h * q, "run": lambda: F.linear(x_h, w["q"])},
        {"name": "k_proj, v_proj", "calls": 2 * s["pieces"], "flop": 2 * tp * h * kv,
         "run": lambda: F.linear(x_h, w["kv"])},
        {"name": "attention (SDPA causal; counted as the full square)", "calls": s["pieces"],
         "flop": 4 * tp * L * q,
         "run": lambda: F.scaled_dot_product_attention(qh, kvh, kvh, is_causal=True, enable_gqa=gqa)},
        {"name": "o_proj", "calls": s["pieces"], "flop": 2 * tp * q * h, "run": lambda: F.linear(x_q, w["o"])},
        {"name": "gate_proj, up_proj (twice: stage 4 and finish)", "calls": 4 * s["pieces"],
         "flop": 2 * tp * h * i, "run": lambda: F.linear(x_h, w["mlp"])},
        {"name": "down_proj", "calls": s["pieces"], "flop": 2 * tp * i * h, "run": lambda: F.linear(x_i, w["down"])},
        {"name": "Hessians of q/k/v, o, gate/up inputs (X^T X, hidden wide)", "calls": 3 * s["chunks"],
         "flop": 2 * tc * h * h, "run": lambda: H_h.addmm_(c_h.t(), c_h)},
        {"name": "Hessian of down's inputs (X^T X, intermediate wide)", "calls": s["chunks"],
         "flop": 2 * tc * i * i, "run": lambda: H_i.addmm_(c_i.t(), c_i)},
    ]


def solve_flop(s: dict) -> int:
    h, i, q, kv = s["hidden"], s["intermediate"], s["q_width"], s["kv_width"]
    return (2 * (q + 2 * kv) * h * h + h**3) + (2 * h * q * q + q**3) + (2 * 2 * i * h * h + h**3) + (2 * h * i * i + i**3)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--wall", type=float, help="a measured quantize wall time, s")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = json.loads((Path(args.model) / "config.json").read_text())
    s = shapes(cfg, args.nsamples, args.seqlen)
    load_before = os.getloadavg()
    rows, layer_s, layer_flop = [], 0.0, 0
    with torch.no_grad():
        for p in layer_products(s):
            t = best_time(p["run"], args.reps)
            rows.append({"product": p["name"], "calls_per_layer": p["calls"], "gflop_per_call": round(p["flop"] / 1e9, 3),
                         "best_s_per_call": round(t, 5), "gflops": round(p["flop"] / t / 1e9, 1),
                         "s_per_layer": round(p["calls"] * t, 4)})
            layer_s += p["calls"] * t
            layer_flop += p["calls"] * p["flop"]
    hessian_rate = min(r["gflops"] for r in rows if r["product"].startswith("Hessian"))
    solves_s = solve_flop(s) / hessian_rate / 1e9
    layers = cfg["num_hidden_layers"]
    floor = layers * (layer_s + solves_s)
    total_flop = layers * (layer_flop + solve_flop(s))
    out = {"model": args.model, "nsamples": args.nsamples, "seqlen": args.seqlen, "threads": args.threads,
           "reps": args.reps, "shapes": s, "products": rows,
           "solves_gflop_per_layer": round(solve_flop(s) / 1e9, 2), "solves_s_per_layer_at_hessian_rate": round(solves_s, 4),
           "layer_gflop": round((layer_flop + solve_flop(s)) / 1e9, 1), "layer_floor_s": round(layer_s + solves_s, 3),
           "layers": layers, "model_tflop": round(total_flop / 1e12, 2), "floor_s": round(floor, 1),
           "load_average_before": load_before, "load_average_after": os.getloadavg(),
           "cpu": benchlib.machine()["cpu"], "torch": torch.__version__, "command": "python " + " ".join(sys.argv)}
    if args.wall:
        out["wall_s"] = args.wall
        out["achieved_gflops"] = round(total_flop / args.wall / 1e9, 1)
        out["floor_over_wall"] = round(floor / args.wall, 3)
    print(json.dumps(out, indent=1))
    if args.out:
        benchlib.write_json(args.out, out)


if __name__ == "__main__":
    main()
