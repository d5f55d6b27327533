"""Where do two GPTQ folders of the same model part ways? Layer by layer, the share of equal codes
and the relative distance of the dequantized weights, for each folder against one reference.

GPTQ feeds each layer the outputs of the already-quantized layers before it, so a float-level
difference early on (summation order of a Hessian, BLAS blocking) changes a few near-tie codes,
which changes the next layer's inputs, and so on. Two tools that decide identically on identical
inputs should therefore agree almost fully at layer 0 and drift apart with depth *no faster than
one tool drifts from itself* under a change that leaves the mathematics alone (GPTQModel at
calibration batch size 2 instead of 1, `gptqmodel_batch_spread.py`).

    PYTHONPATH=. python bench/peer_layer_agreement.py REF OTHER [OTHER ...] [--label NAME ...] \
        [--out bench/results/peer_layer_agreement.json]

REF and OTHER are GPTQ v1 folders (model.safetensors) of the same model and options.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch
from safetensors import safe_open

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import benchlib  # noqa: E402
from solar_quant.formats import gptq_v1  # noqa: E402

LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)\.qweight$")


def quantized_linears(folder: Path) -> dict[tuple[int, str], str]:
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        names = list(f.keys())
    out = {}
    for n in names:
        m = LAYER.match(n)
        if m:
            out[(int(m.group(1)), m.group(2))] = n[: -len(".qweight")]
    return out


def load_linear(f, prefix: str) -> dict[str, torch.Tensor]:
    return {k: f.get_tensor(f"{prefix}.{k}") for k in ("qweight", "qzeros", "scales", "g_idx")}


def compare(ref: Path, other: Path, bits: int) -> list[dict]:
    """Per layer: equal codes / all codes, and ||W_ref - W_other|| / ||W_ref|| of the dequantized
    weights, summed over the layer's linears."""
    linears = quantized_linears(ref)
    if set(linears) != set(quantized_linears(other)):
        raise SystemExit(f"{other}: not the same quantized linears as {ref}")
    rows: dict[int, dict] = {}
    with safe_open(str(ref / "model.safetensors"), "pt") as fa, safe_open(str(other / "model.safetensors"), "pt") as fb:
        for (layer, name), prefix in sorted(linears.items()):
            a, b = load_linear(fa, prefix), load_linear(fb, prefix)
            pa, pb = gptq_v1.unpack(a, bits), gptq_v1.unpack(b, bits)
            ca, cb = pa[0], pb[0]
            wa, wb = gptq_v1.dequantize_unpacked(*pa), gptq_v1.dequantize_unpacked(*pb)
            r = rows.setdefault(layer, {"layer": layer, "equal": 0, "codes": 0, "diff2": 0.0, "norm2": 0.0,
                                        "per_linear": {}})
            eq = int((ca == cb).sum())
            r["equal"] += eq
            r["codes"] += ca.numel()
            d2, n2 = float((wa - wb).pow(2).sum()), float(wa.pow(2).sum())
            r["diff2"] += d2
            r["norm2"] += n2
            r["per_linear"][name] = {"agreement": eq / ca.numel(), "rel_diff": (d2 / n2) ** 0.5}
    out = []
    for layer in sorted(rows):
        r = rows[layer]
        out.append({"layer": layer, "agreement": r["equal"] / r["codes"], "rel_diff": (r["diff2"] / r["norm2"]) ** 0.5,
                    "per_linear": r["per_linear"]})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ref", type=Path)
    ap.add_argument("others", type=Path, nargs="+")
    ap.add_argument("--label", action="append", default=[], help="a name per OTHER, in order")
    ap.add_argument("--ref-label", default=None)
    ap.add_argument("--out", type=Path, default=benchlib.ROOT / "bench" / "results" / "peer_layer_agreement.json")
    args = ap.parse_args()
    labels = args.label or [p.name for p in args.others]
    if len(labels) != len(args.others):
        raise SystemExit("--label: give one per OTHER folder")
    cfg = json.loads((args.ref / "config.json").read_text())["quantization_config"]
    bits = int(cfg["bits"])
    doc = {"command": "PYTHONPATH=. python " + " ".join(["bench/peer_layer_agreement.py", *sys.argv[1:]]),
           "reference": {"label": args.ref_label or args.ref.name, "folder": str(args.ref)},
           "quantization_config": {k: cfg.get(k) for k in ("bits", "group_size", "desc_act", "sym", "damp_percent")},
           "machine": benchlib.machine(), "versions": benchlib.versions(), "commit": benchlib.git_commit(),
           "comparisons": {}}
    for label, other in zip(labels, args.others):
        rows = compare(args.ref, other, bits)
        deep = rows[1:] or rows
        doc["comparisons"][label] = {
            "folder": str(other),
            "summary": {"layer0_agreement": rows[0]["agreement"],
                        "mean_agreement_after_layer0": sum(r["agreement"] for r in deep) / len(deep),
                        "last_layer_agreement": rows[-1]["agreement"],
                        "mean_rel_diff_after_layer0": sum(r["rel_diff"] for r in deep) / len(deep)},
            "layers": rows}
    print("layer | " + " | ".join(f"{lab}: codes equal / rel. diff" for lab in labels))
    for i in range(len(next(iter(doc["comparisons"].values()))["layers"])):
        cells = [f"{c['layers'][i]['agreement'] * 100:6.2f} % / {c['layers'][i]['rel_diff']:.4f}"
                 for c in doc["comparisons"].values()]
        print(f"{i:5d} | " + " | ".join(cells))
    for label, c in doc["comparisons"].items():
        s = c["summary"]
        print(f"{label}: layer 0 {s['layer0_agreement'] * 100:.2f} %, layers 1+ mean {s['mean_agreement_after_layer0'] * 100:.2f} %, "
              f"last {s['last_layer_agreement'] * 100:.2f} %, mean rel. diff {s['mean_rel_diff_after_layer0']:.4f}")
    benchlib.write_json(args.out, doc)


if __name__ == "__main__":
    main()
