"""The one-pass (staged) layer quantizer against the former multi-pass one on a real model:
two GPTQ outputs of the same command, one per code version, compared tensor by tensor.

    PYTHONPATH=. python bench/staged_pass_equivalence.py OLD_OUT NEW_OUT [--out bench/results/x.json]

Counts, per tensor and in total, the GPTQ codes (unpacked from `qweight`) that differ, and
whether every other tensor (scales, qzeros, g_idx, norms, embeddings) is byte-identical.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as s:
            for k in s.keys():
                out[k] = s.get_tensor(k)
    return out


def codes(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes of a 4- or 8-bit int32 qweight packed along K: [K, N]."""
    per = 32 // bits
    shifts = torch.arange(per, dtype=torch.int32) * bits
    q = (qweight.unsqueeze(1) >> shifts.view(1, -1, 1)) & ((1 << bits) - 1)
    return q.reshape(-1, qweight.shape[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("old", type=Path)
    ap.add_argument("new", type=Path)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    a, b = tensors(args.old), tensors(args.new)
    if sorted(a) != sorted(b):
        raise SystemExit("the two outputs hold different tensor names")
    differing, total, other = 0, 0, []
    for name in sorted(a):
        if name.endswith(".qweight"):
            ca, cb = codes(a[name], args.bits), codes(b[name], args.bits)
            differing += int((ca != cb).sum())
            total += ca.numel()
        elif not torch.equal(a[name], b[name]):
            other.append(name)
    result = {"old": str(args.old), "new": str(args.new), "codes": total, "codes_differing": differing,
              "other_tensors_differing": other, "tensors": len(a)}
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
