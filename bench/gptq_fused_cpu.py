"""The GPTQ column loop on CPU, eager against compiled (`methods/gptq_fused.py`): solve seconds and
whether the codes are identical, on SmolLM2's layer 0 (all seven linears, as the pipeline groups
them) and on a 70B-shaped slice (ROWS x 8192 columns, q_proj's input width).

    PYTHONPATH=. python bench/gptq_fused_cpu.py [--rows 256] [--out bench/results/gptq_fused_cpu.json]

SmolLM2's Hessians: 16 x 256 token ids drawn with seed 0, embedded and run through the fp32 layer 0
(`collect_hessians`, the unquantized layer; the solve's time does not depend on the draw). The
slice: W ~ N(0, 0.02^2) [ROWS, 8192], H = 2/n XᵀX of X [1024, 8192] ~ N(0, 1) with per-column
scales 0.1..3. Times are CPU seconds (process_time) on one thread, as the pipeline solves; the
compiled path is timed on its first call (compiling included, fresh TORCHINDUCTOR_CACHE_DIR) and on
a second call (compiled regions reused).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib  # noqa: E402


def solve_all(groups, cfg, fused):
    from solar_quant.methods.gptq import gptq_quantize_shared

    out = []
    for Ws, H in groups:
        out += gptq_quantize_shared(Ws, H, cfg["spec"], blocksize=128, percdamp=0.01, actorder=cfg["act_order"],
                                    fused=fused, log=lambda m: print(m, file=sys.stderr))
    return out


def timed(fn):
    start, wall = time.process_time(), time.monotonic()
    result = fn()
    return result, round(time.process_time() - start, 3), round(time.monotonic() - wall, 3)


def compare(groups, cfg, fused) -> dict:
    eager, eager_s, eager_wall = timed(lambda: solve_all(groups, cfg, None))
    first, first_s, first_wall = timed(lambda: solve_all(groups, cfg, fused))
    second, second_s, second_wall = timed(lambda: solve_all(groups, cfg, fused))
    codes = sum(q.intweight.numel() for q in eager)
    differ = sum(int((a.intweight != b.intweight).sum()) for a, b in zip(eager, second))
    differ_first = sum(int((a.intweight != b.intweight).sum()) for a, b in zip(eager, first))
    return {"eager_cpu_s": eager_s, "compiled_first_call_cpu_s (compiling included)": first_s,
            "compiled_second_call_cpu_s": second_s, "compiled_over_eager": round(second_s / eager_s, 2),
            "wall_s": {"eager": eager_wall, "compiled_first": first_wall, "compiled_second": second_wall},
            "codes": codes, "codes_differing": differ + differ_first, "compile_failure": fused.failure}


def smollm2_groups():
    import torch
    from solar_quant.architecture import SEQUENTIAL_GROUPS
    from solar_quant.checkpoint.reader import CheckpointReader
    from solar_quant.models.demo import demo_model_path
    from solar_quant.pipeline.layer_quant import collect_hessians, full_name
    from solar_quant.pipeline.layers import LayerRunner, embed_tokens, llama_config, load_decoder_layer

    reader = CheckpointReader(demo_model_path())
    config = llama_config(reader.config)
    ids = torch.randint(0, config.vocab_size, (16, 256), generator=torch.Generator().manual_seed(0))
    hidden = embed_tokens(reader, ids)
    layer = load_decoder_layer(reader, config, 0, torch.device("cpu"))
    runner = LayerRunner(config, torch.device("cpu"), chunk=16)
    H = collect_hessians(layer, runner, hidden, [full_name(g[0]) for g in SEQUENTIAL_GROUPS])
    return [([layer.get_submodule(full_name(n)).weight.detach().clone() for n in g], H[full_name(g[0])])
            for g in SEQUENTIAL_GROUPS]


def slice_groups(rows: int):
    import torch

    g = torch.Generator().manual_seed(0)
    W = torch.randn(rows, 8192, generator=g) * 0.02
    X = torch.randn(1024, 8192, generator=g) * torch.linspace(0.1, 3.0, 8192)
    return [([W], (2 / X.shape[0]) * X.t() @ X)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--out", type=Path, default=benchlib.ROOT / "bench" / "results" / "gptq_fused_cpu.json")
    args = ap.parse_args()
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="inductor-bench-"))
    import torch
    from solar_quant.methods.gptq_fused import CompiledColumns
    from solar_quant.methods.grid import QuantSpec

    torch.set_num_threads(1)
    fused = CompiledColumns()
    load_start = os.getloadavg()
    configs = {"demo: 4-bit g64 act-order sym mse 2.4": {"spec": QuantSpec(4, 64, True, 2.4), "act_order": True},
               "4-bit g128 sym": {"spec": QuantSpec(4, 128, True), "act_order": False}}
    results = {}
    smol = smollm2_groups()
    for name, cfg in configs.items():
        results[f"SmolLM2 layer 0, {name}"] = compare(smol, cfg, fused)
        print(name, results[f"SmolLM2 layer 0, {name}"], file=sys.stderr)
    sl = slice_groups(args.rows)
    for name in ("4-bit g128 sym",):
        results[f"70B-shaped slice {args.rows} x 8192, {name}"] = compare(sl, configs[name], fused)
    doc = {"what": __doc__.split("\n\n")[0], "command": "PYTHONPATH=. python bench/gptq_fused_cpu.py --rows "
           f"{args.rows}", "machine": benchlib.machine(), "versions": benchlib.versions(),
           "commit": benchlib.git_commit(), "shared_machine": "2 cores shared with other jobs (load below)",
           "loadavg_start": load_start, "loadavg_end": os.getloadavg(), "threads": 1, "results": results}
    benchlib.write_json(args.out, doc)
    print(args.out)


if __name__ == "__main__":
    main()
