"""How closely GPTQ variants fit the unquantized model on their own calibration samples: the KL
to fp16 over the first N calibration samples' positions, and the hidden states' relative error by
layer (the sink token, position 0, apart from the median over the others). The diagnosis behind
`--propagate` in bench/README.md ("Targets from the unquantized model").

    PYTHONPATH=. python bench/calibration_fit.py MODEL CALIB_DIR VARIANT [VARIANT ...] [--samples 8]

MODEL: the fp16 folder; CALIB_DIR: a `solar-quant calibrate` folder; each VARIANT: a GPTQ folder,
read as dense fp32 weights (`tests/gptq_helpers.dequantized_reference`). fp32 on the CPU.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def main() -> None:
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from gptq_helpers import dequantized_reference

    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("calib")
    ap.add_argument("variants", nargs="+")
    ap.add_argument("--samples", type=int, default=8)
    args = ap.parse_args()
    ids = next(iter(load_file(str(Path(args.calib) / "calibration.safetensors")).values()))[:args.samples].long()
    fp = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = fp(ids, output_hidden_states=True)
    p = ref.logits.log_softmax(-1)
    print("fp16 sink-token norm / median other-token norm by layer:",
          " ".join(f"{float(h[:, 0].norm(dim=-1).mean()):.0f}/{float(h[:, 1:].norm(dim=-1).median()):.0f}"
                   for h in ref.hidden_states))
    for folder in args.variants:
        with torch.no_grad():
            out = dequantized_reference(Path(folder))(ids, output_hidden_states=True)
        q = out.logits.log_softmax(-1)
        kl = float((p.exp() * (p - q)).sum(-1).mean())
        sink = [float((a[:, 0] - b[:, 0]).norm() / b[:, 0].norm()) for a, b in zip(out.hidden_states, ref.hidden_states)]
        rest = [float(((a[:, 1:] - b[:, 1:]).norm(dim=-1) / b[:, 1:].norm(dim=-1)).median())
                for a, b in zip(out.hidden_states, ref.hidden_states)]
        print(f"{folder}: calibration KL {kl:.4f} over {ids.numel()} positions")
        print("  sink token, rel. error by layer:", " ".join(f"{e:.3f}" for e in sink))
        print("  other tokens, median rel. error:", " ".join(f"{e:.3f}" for e in rest))


if __name__ == "__main__":
    main()
