"""Quantize a 16-bit Llama folder with GPTQModel 7.6.0 on CPU from a solar-quant calibration artifact.

The peer half of `bench/gptq_vs_gptqmodel.py`, run in its own process so that its wall time and
peak RSS are its own. It reads the artifact's `calibration.safetensors` directly (no solar_quant
import, so none of our code sits in its address space) and feeds GPTQModel exactly those token
ids, one sample per row with an all-ones attention mask. The model is loaded in fp32 (fp16
matmuls are 3-6x slower on this CPU, docs/background.md); GPTQModel still packs fp16 scales. Output is
GPTQ v1 (`format="gptq"`, checkpoint_format "gptq").

Usage: GPTQMODEL_CPU_WORKERS=2 python bench/gptqmodel_run.py SRC OUT --calibration DIR
           [--bits 4] [--group-size 128] [--act-order] [--damp 0.01] [--batch-size 1]
"""

from __future__ import annotations

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib  # noqa: E402  (no solar_quant import: none of our code in the peer's process)


def main() -> None:
    p = benchlib.peer_parser(__doc__)
    p.add_argument("--act-order", action="store_true")
    p.add_argument("--damp", type=float, default=0.01)
    p.add_argument("--mse", type=float, default=0.0, help="QuantizeConfig.mse: clipping search norm (0: off)")
    p.add_argument("--batch-size", type=int, default=1)
    args = p.parse_args()
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")

    import torch
    from safetensors.torch import load_file

    from gptqmodel import GPTQModel, QuantizeConfig

    start = time.monotonic()
    ids = load_file(os.path.join(args.calibration, "calibration.safetensors"))["input_ids"]
    rows = [{"input_ids": row.unsqueeze(0), "attention_mask": torch.ones_like(row).unsqueeze(0)} for row in ids]
    # act_group_aware=False: plain GPTQ column order, as ours (GPTQModel turns its own reordering on by default
    # when desc_act is off); true_sequential and sym as ours; damp as given.
    cfg = QuantizeConfig(bits=args.bits, group_size=args.group_size, desc_act=args.act_order, sym=True,
                         damp_percent=args.damp, true_sequential=True, act_group_aware=False, format="gptq",
                         mse=args.mse)
    model = GPTQModel.load(args.src, cfg, dtype=torch.float32, device="cpu")
    loaded = time.monotonic()
    model.quantize(rows, batch_size=args.batch_size, calibration_sort=None)
    quantized = time.monotonic()
    model.save(args.out)
    saved = time.monotonic()
    print("GPTQMODEL_TIMING " + json.dumps({"load_s": loaded - start, "quantize_s": quantized - loaded,
                                            "save_s": saved - quantized, "samples": int(ids.shape[0]),
                                            "seqlen": int(ids.shape[1])}), flush=True)


if __name__ == "__main__":
    main()
