"""Output tensor bytes of every format we write vs `plan`'s prediction, and bits per weight on the linears.

    PYTHONPATH=. python bench/size_accounting.py [--model M] [--work /tmp/sqbench/sizes]
        [--extra NAME=FOLDER ...] [--out bench/results/size_accounting.json]

For each format (bnb-int8, bnb-nf4, bnb-nf4-dq, bnb-fp4, GPTQ v1 8/4/3-bit g128, 4-bit g32 and
4-bit without groups) the script writes the variant with `solar-quant quantize` (the GPTQ layouts
with `--method rtn`: the same packer and writer as `--method gptq`, which changes the values, not
the tensors) and compares every tensor in the output's safetensors headers with
`solar_quant.plan.tensor_specs` (name, dtype, shape) and the total with `plan.weight_bytes`.
The one expected difference: bitsandbytes double-quant packs a JSON quant state whose
`nested_offset` (a data-dependent float) has a data-dependent number of characters
(formats/sizes.py: NESTED_OFFSET); those tensors' byte differences are reported separately.
`--extra NAME=FOLDER` accounts for more folders (e.g. real GPTQ and GPTQModel outputs from
bench/gptq_vs_gptqmodel.py); NAME is a variant name such as gptq-4b-g128-act.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

from solar_quant.architecture import LlamaShape
from solar_quant.checkpoint.reader import CheckpointReader
from solar_quant.plan import Variant, linear_tensor_specs, tensor_specs, weight_bytes
from solar_quant.formats.sizes import spec_bytes

MODEL = "/tmp/sqcache/models/SmolLM2-135M-Instruct-fp16"
FORMATS = ("bnb-int8", "bnb-nf4", "bnb-nf4-dq", "bnb-fp4", "gptq-8b-g128", "gptq-4b-g128", "gptq-3b-g128",
           "gptq-4b-g32", "gptq-4b-gnone")


def quantize_args(variant: Variant) -> list[str]:
    """`solar-quant quantize` flags that write `variant` (GPTQ layouts through --method rtn)."""
    if variant.method == "gptq":
        return ["--method", "rtn", "--bits", str(variant.bits), "--group-size", str(variant.group_size)]
    return ["--method", variant.method] + (["--double-quant"] if variant.double_quant else [])


def account(folder: str | Path, variant: Variant, shape: LlamaShape) -> dict:
    """Compare a written folder's tensors with the plan for `variant` on `shape`."""
    tensors = CheckpointReader(folder).tensors
    actual = {n: (t.dtype, tuple(t.shape)) for n, t in tensors.items()}
    planned = tensor_specs(shape, variant)
    missing = sorted(set(planned) - set(actual))
    extra = sorted(set(actual) - set(planned))
    data_dependent = {}  # bnb double-quant JSON quant states: name -> actual - planned bytes
    mismatched = []
    for name in sorted(set(planned) & set(actual)):
        if planned[name] == actual[name]:
            continue
        if variant.double_quant and ".quant_state." in name:
            data_dependent[name] = tensors[name].nbytes - spec_bytes(planned[name])
        else:
            mismatched.append({"tensor": name, "planned": list(planned[name]), "actual": list(actual[name])})
    actual_bytes = sum(t.nbytes for t in tensors.values())
    planned_bytes = weight_bytes(shape, variant)
    linear_bytes, linear_params = _linear_totals(tensors, shape)
    planned_linear = shape.layers * sum(spec_bytes(s) for dims in shape.linear_shapes().values()
                                        for s in linear_tensor_specs(variant, *dims).values())
    exact = not (missing or extra or mismatched) and actual_bytes - planned_bytes == sum(data_dependent.values())
    return {"variant": variant.name, "tensors": len(actual), "planned_bytes": planned_bytes, "actual_bytes": actual_bytes,
            "difference_bytes": actual_bytes - planned_bytes, "exact": exact and not data_dependent,
            "exact_except_bnb_json": exact, "data_dependent_json": data_dependent,
            "data_dependent_json_bytes": sum(data_dependent.values()),
            "missing": missing, "extra": extra, "mismatched": mismatched[:20],
            "linear_bytes": linear_bytes, "linear_planned_bytes": planned_linear, "linear_params": linear_params,
            "bits_per_weight": 8 * linear_bytes / linear_params,
            "planned_bits_per_weight": 8 * planned_linear / linear_params}


def _linear_totals(tensors: dict, shape: LlamaShape) -> tuple[int, int]:
    """Stored bytes of the decoder linears' tensors (every part) and their number of weights."""
    modules = [f"model.layers.{i}.{name}." for i in range(shape.layers) for name in shape.linear_shapes()]
    params = shape.layers * sum(o * i for o, i in shape.linear_shapes().values())
    by_prefix = 0
    for name, t in tensors.items():
        if name.startswith("model.layers.") and any(name.startswith(m) for m in modules):
            by_prefix += t.nbytes
    return by_prefix, params


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import benchlib

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=MODEL)
    ap.add_argument("--work", type=Path, default=Path("/tmp/sqbench/sizes"))
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--extra", action="append", default=[], help="NAME=FOLDER: account for an existing output too")
    ap.add_argument("--keep", action="store_true", help="keep the written folders")
    ap.add_argument("--out", type=Path, default=benchlib.ROOT / "bench" / "results" / "size_accounting.json")
    args = ap.parse_args()
    shape = LlamaShape.from_config(CheckpointReader(args.model).config)
    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in [n for n in args.formats.split(",") if n]:
        variant = Variant.parse(name)
        out = args.work / variant.name
        shutil.rmtree(out, ignore_errors=True)
        cmd = [benchlib.PYTHON, "-m", "solar_quant", "quantize", args.model, str(out), *quantize_args(variant)]
        run = benchlib.measure(cmd, args.work / f"{variant.name}.log")
        row = {**account(out, variant, shape), "written_by": "python " + " ".join(cmd[1:]), "wall_s": run["wall_s"],
               "peak_rss_mib": run["peak_rss_mib"]}
        rows.append(row)
        print(_line(row), flush=True)
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
    for item in args.extra:
        name, _, folder = item.partition("=")
        row = {**account(folder, Variant.parse(name), shape), "written_by": folder}
        rows.append(row)
        print(_line(row), flush=True)
    doc = {"protocol": {"model": args.model, "shape": shape.__dict__,
                        "planned": "solar_quant.plan.tensor_specs / weight_bytes (safetensors headers excluded)",
                        "actual": "sum of tensor data bytes in the output's safetensors headers",
                        "bits_per_weight": "8 x bytes of every tensor of the decoder linears / their weight count"},
           "machine": benchlib.machine(), "versions": benchlib.versions(), "commit": benchlib.git_commit(),
           "command": "PYTHONPATH=. python " + " ".join(["bench/size_accounting.py", *sys.argv[1:]]), "results": rows}
    benchlib.write_json(args.out, doc)
    print(markdown(rows))


def _line(r: dict) -> str:
    return (f"{r['variant']}: planned {r['planned_bytes']} actual {r['actual_bytes']} diff {r['difference_bytes']} "
            f"exact={r['exact']} (except bnb JSON: {r['exact_except_bnb_json']}) bits/weight {r['bits_per_weight']:.4f}")


def markdown(rows: list[dict]) -> str:
    lines = ["| format | written by | planned bytes | actual bytes | difference | tensors match | linear bits/weight |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        src = "gptq_vs_gptqmodel output" if "/" in r["written_by"].split(" ")[0] else r["written_by"].split(" quantize ")[0]
        match = "exact" if r["exact"] else ("exact except JSON (%+d B)" % r["data_dependent_json_bytes"]
                                            if r["exact_except_bnb_json"] else "NO")
        lines.append(f"| {r['variant']} | {src} | {r['planned_bytes']:,} | {r['actual_bytes']:,} | "
                     f"{r['difference_bytes']:+,} | {match} | {r['bits_per_weight']:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
