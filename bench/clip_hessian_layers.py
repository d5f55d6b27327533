"""Clipping searches compared linear by linear on SmolLM2: GPTQ (act-order, g128) with no clipping,
with GPTQ's |error|**2.4 search (`--mse 2.4`), and with the Hessian-weighted searches
(`--clip hessian`, `--clip hessian-diag`); each linear's relative output error on its calibration
inputs, tr((W-Q) H (W-Q)^T) / tr(W H W^T), and the solve time.

    PYTHONPATH=. python bench/clip_hessian_layers.py --model FP16 --calibration CALIB \
        [--layers 2,14,27] [--bits 4,3] [--out bench/results/clip_hessian_layers.json]

Inputs are the unquantized model's (one fp32 forward over the calibration ids, hooks on the seven
projections); q/k/v and gate/up share their Hessian and are solved together, as the pipeline does.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib  # noqa: E402

GROUPS = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))
SEARCHES = {"none": {}, "mse 2.4": {"mse": 2.4}, "hessian": {"clip": "hessian"}, "hessian-diag": {"clip": "hessian-diag"},
            "gptq-loss": {"clip": "gptq-loss"}}


def capture(model, ids, layers: list[int]) -> dict:
    import torch

    from solar_quant.methods.gptq import accumulate_hessian

    hs, handles = {}, []
    for i in layers:
        block = model.model.layers[i]
        for group in GROUPS:
            name = group[0]
            mod = block.self_attn if name in ("q_proj", "k_proj", "v_proj", "o_proj") else block.mlp
            lin = getattr(mod, name)

            def hook(m, inp, out, key=(i, group)):
                H, n = hs.get(key, (None, 0))
                hs[key] = accumulate_hessian(H, n, inp[0].detach())
            handles.append(lin.register_forward_hook(hook))
    with torch.no_grad():
        for row in ids:
            model(row[None])
    for h in handles:
        h.remove()
    return {k: v[0] for k, v in hs.items()}


def main() -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from solar_quant.calibration.artifact import load_calibration
    from solar_quant.methods.gptq import gptq_quantize_shared
    from solar_quant.methods.grid import QuantSpec

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--calibration", required=True)
    ap.add_argument("--layers", default="2,14,27")
    ap.add_argument("--bits", default="4,3")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--searches", default=",".join(SEARCHES), help="comma list of: " + ", ".join(SEARCHES))
    ap.add_argument("--static-groups", action="store_true",
                    help="act-order with static groups (grids fitted before reordering; g_idx stays sequential)")
    ap.add_argument("--out", type=Path, default=benchlib.ROOT / "bench" / "results" / "clip_hessian_layers.json")
    args = ap.parse_args()
    torch.set_num_threads(2)
    layers = [int(x) for x in args.layers.split(",")]
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    ids = load_calibration(args.calibration).input_ids[: args.nsamples]
    load_start = benchlib.load1()
    hs = capture(model, ids, layers)
    rows, totals = [], {}
    for bits in (int(b) for b in args.bits.split(",")):
        for (i, group), H in hs.items():
            block = model.model.layers[i]
            mods = [getattr(block.self_attn if n in ("q_proj", "k_proj", "v_proj", "o_proj") else block.mlp, n)
                    for n in group]
            Ws = [m.weight.detach().float() for m in mods]
            for label, extra in ((k, SEARCHES[k]) for k in args.searches.split(",")):
                spec = QuantSpec(bits, 128, True, **extra)
                t0 = time.perf_counter()
                qs = gptq_quantize_shared(Ws, H, spec, actorder=True, static_groups=args.static_groups)
                wall = time.perf_counter() - t0
                for n, W, q in zip(group, Ws, qs):
                    D = W - q.dequant.float()
                    rel = float(torch.einsum("nk,kl,nl->", D, H, D) / torch.einsum("nk,kl,nl->", W, H, W))
                    rows.append({"bits": bits, "layer": i, "linear": n, "search": label, "rel_output_error": rel,
                                 "solve_s": round(wall, 3)})
                    totals.setdefault((bits, label), []).append(rel)
                print(f"{bits}-bit layer {i} {'/'.join(group)} {label}: {wall:.1f} s", file=sys.stderr, flush=True)
    summary = {f"{b}-bit {label}": {"geo_mean_rel_error": math.exp(sum(map(math.log, v)) / len(v)), "linears": len(v)}
               for (b, label), v in totals.items()}
    for b in sorted({b for b, _ in totals}, reverse=True):
        base = summary.get(f"{b}-bit mse 2.4", {}).get("geo_mean_rel_error")
        for label in args.searches.split(","):
            summary[f"{b}-bit {label}"]["vs_mse"] = summary[f"{b}-bit {label}"]["geo_mean_rel_error"] / base if base else None
    doc = {"command": "PYTHONPATH=. python " + " ".join(["bench/clip_hessian_layers.py", *sys.argv[1:]]),
           "commit": benchlib.git_commit(), "machine": benchlib.machine(), "load1_start": load_start,
           "load1_end": benchlib.load1(), "shared_machine": True,
           "protocol": {"model": args.model, "calibration": args.calibration, "nsamples": args.nsamples,
                        "layers": layers, "gptq": "act-order" + (" with static groups" if args.static_groups else "") +
                        ", group 128, symmetric, damp 0.01, unquantized inputs"},
           "summary": summary, "rows": rows}
    benchlib.write_json(args.out, doc)
    print("| bits | search | geo-mean rel. output error | vs mse 2.4 |\n|---|---|---|---|")
    for key, s in summary.items():
        b, label = key.split("-bit ")
        vs = f"{s['vs_mse']:.3f}" if s["vs_mse"] else "–"
        print(f"| {b} | {label} | {s['geo_mean_rel_error']:.5f} | {vs} |")


if __name__ == "__main__":
    main()
