"""Quantize a 16-bit Llama folder with AutoRound 0.16.1 on CPU from a solar-quant calibration artifact.

The second peer of the race (`bench/gptq_vs_gptqmodel.py --impls autoround`), run in its own process
so that its wall time and peak RSS are its own. Like `gptqmodel_run.py` it reads the artifact's
`calibration.safetensors` directly (no solar_quant import) and feeds AutoRound exactly those token
ids, one [1, seqlen] tensor per sample, so every tool sees the same calibration. The model is loaded
in fp32 on CPU. Symmetric, `format="auto_gptq"`: the GPTQ v1 layout the other tools write.

Recipes are AutoRound's own (`auto_round/cli/main.py`, RECIPES), with nsamples and seqlen taken
from the artifact instead of 128 x 2048: `default` (200 sign-gradient steps per block, batch 8,
its default learning rate 1/iters) and `light` (50 steps, lr 5e-3).

Usage: python bench/autoround_run.py SRC OUT --calibration DIR [--bits 4] [--group-size 128]
           [--recipe default|light] [--iters N]
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time

RECIPES = {"default": {"iters": 200, "lr": None, "batch_size": 8},
           "light": {"iters": 50, "lr": 5e-3, "batch_size": 8}}

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402  (no solar_quant import: none of our code in the peer's process)


def main() -> None:
    p = benchlib.peer_parser(__doc__)
    p.add_argument("--recipe", choices=sorted(RECIPES), default="default")
    p.add_argument("--iters", type=int, default=None, help="override the recipe's steps per block (a timing probe)")
    args = p.parse_args()

    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from auto_round import AutoRound

    recipe = dict(RECIPES[args.recipe])
    if args.iters is not None:
        recipe["iters"] = args.iters
    start = time.monotonic()
    ids = load_file(os.path.join(args.calibration, "calibration.safetensors"))["input_ids"]
    rows = [row.unsqueeze(0) for row in ids]
    model = AutoModelForCausalLM.from_pretrained(args.src, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(args.src)
    loaded = time.monotonic()
    extra = {"lr": recipe["lr"]} if recipe["lr"] is not None else {}
    ar = AutoRound(model, tokenizer=tok, bits=args.bits, group_size=args.group_size, sym=True, dataset=rows,
                   nsamples=len(rows), seqlen=int(ids.shape[1]), iters=recipe["iters"],
                   batch_size=recipe["batch_size"], device_map="cpu", seed=42, **extra)
    # AutoRound saves into a subfolder named after the model and scheme: write beside OUT, then move
    # the folder holding config.json to OUT, so OUT appears only when whole.
    staging = args.out.rstrip("/") + ".autoround"
    shutil.rmtree(staging, ignore_errors=True)
    ar.quantize_and_save(staging, format="auto_gptq")
    made = next(root for root, _, files in os.walk(staging) if "config.json" in files and "model.safetensors" in files)
    os.replace(made, args.out)
    shutil.rmtree(staging, ignore_errors=True)
    saved = time.monotonic()
    print("AUTOROUND_TIMING " + json.dumps({"load_s": loaded - start, "quantize_and_save_s": saved - loaded,
                                            "recipe": args.recipe, **recipe, "samples": int(ids.shape[0]),
                                            "seqlen": int(ids.shape[1])}), flush=True)


if __name__ == "__main__":
    main()
