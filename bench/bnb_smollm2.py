"""Wall time, peak RSS, output size and bits/weight of `solar-quant quantize` on the embedded
SmolLM2-135M-Instruct, for each bitsandbytes method.

    SOLAR_QUANT_CACHE=/tmp/sqcache PYTHONPATH=. python bench/bnb_smollm2.py --out bench/results/bnb_smollm2.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bnb_memory import ROOT, folder_bytes, measure, protocol  # noqa: E402

METHODS = (("bnb-int8",), ("bnb-nf4",), ("bnb-nf4", "--double-quant"), ("bnb-fp4",))


def linear_bits_per_weight(src: Path, out: Path) -> float:
    """Stored bits of every tensor that belongs to a quantized decoder Linear, per source weight."""
    from solar_quant.architecture import is_linear_weight
    from solar_quant.checkpoint.reader import CheckpointReader
    from solar_quant.formats.bnb import linear_parts, module_name

    source, variant = CheckpointReader(src).tensors, CheckpointReader(out).tensors
    linears = [n for n in source if is_linear_weight(n)]
    stored = sum(t.nbytes for m in map(module_name, linears) for t in linear_parts(m, variant).values())
    return 8 * stored / sum(source[n].numel for n in linears)


def main() -> None:
    from solar_quant.models.demo import demo_model_path

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "bnb_smollm2.json")
    args = ap.parse_args()
    src = demo_model_path()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for flags in METHODS:
            out = Path(tmp) / "variant"
            row = {"method": " ".join(flags),
                   **measure([sys.executable, "-m", "solar_quant", "quantize", str(src), str(out), "--method", *flags])}
            row["output_bytes"] = folder_bytes(out)
            row["linear_bits_per_weight"] = round(linear_bits_per_weight(src, out), 3)
            rows.append(row)
            print(json.dumps(row), flush=True)
            shutil.rmtree(out)
    proto = protocol()
    proto.pop("checkpoint"), proto.pop("theirs")
    doc = {"model": "SmolLM2-135M-Instruct fp16 (solar-quant demo-model)", "source_bytes": folder_bytes(src),
           "protocol": proto, "results": rows,
           "command": "SOLAR_QUANT_CACHE=/tmp/sqcache PYTHONPATH=. python bench/bnb_smollm2.py"}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
