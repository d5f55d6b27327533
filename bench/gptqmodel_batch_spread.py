"""How far apart are two equally valid GPTQ runs? GPTQModel 7.6.0 against itself with another
calibration batch size.

The batch size changes nothing in the mathematics (the same tokens, the same Hessians up to the
order of float sums, the same layer outputs up to BLAS blocking) but GPTQ's column-by-column
error feedback amplifies float-level differences into different codes. The perplexity and KL
spread between such runs is the resolution any single-draw comparison of two GPTQ tools has.

    PYTHONPATH=. python bench/gptqmodel_batch_spread.py --work /tmp/sqbench/gvg2 \
        --config 4b-g128-act-mse --batch-sizes 2,4 [--out bench/results/gptqmodel_batch_spread.json]

Uses WORK/calib (the artifact of `gptq_vs_gptqmodel.py`) and WORK/out/<config>-theirs-1 (batch
size 1, that benchmark's run) when present; each further batch size is one fresh child run of
`bench/gptqmodel_run.py --batch-size B`, scored exactly as `gptq_vs_gptqmodel.py` scores (dense
fp32 copy of the dequantized weights, bundled held-out text, 512-token windows, 16,384 tokens).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib  # noqa: E402
import gptq_vs_gptqmodel as peer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=peer.MODEL)
    ap.add_argument("--work", type=Path, default=Path("/tmp/sqbench/gvg2"))
    ap.add_argument("--config", default="4b-g128-act-mse", choices=sorted(peer.CONFIGS))
    ap.add_argument("--batch-sizes", default="2,4")
    ap.add_argument("--out", type=Path, default=benchlib.ROOT / "bench" / "results" / "gptqmodel_batch_spread.json")
    ap.add_argument("--eval-seqlen", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=16384)
    args = ap.parse_args()
    doc = peer.load_doc(args.out)
    doc.update(machine=benchlib.machine(), versions=benchlib.versions(), commit=benchlib.git_commit(),
               command="PYTHONPATH=. python " + " ".join(["bench/gptqmodel_batch_spread.py", *sys.argv[1:]]),
               config={"name": args.config, **dict(zip(("bits", "group_size", "act_order", "mse"),
                                                        peer.CONFIGS[args.config])), "damp": peer.DAMP, "sym": True},
               eval={"text": "bundled held-out text", "seqlen": args.eval_seqlen, "stride": args.eval_seqlen,
                     "max_tokens": args.max_tokens, "scored_as": "dense fp32 dequantized weights"})
    runs = doc.setdefault("runs", {})
    opts = peer.eval_options(args)
    base = args.work / "out" / f"{args.config}-theirs-1"
    folders = {1: base} if base.is_dir() else {}
    for b in (int(x) for x in args.batch_sizes.split(",")):
        out = args.work / "out" / f"{args.config}-theirs-batch{b}"
        if str(b) not in runs:
            run = {"id": f"{args.config}-theirs-{b}", "config": args.config, "impl": "theirs", "rep": 0}
            cmd = peer.command(run, args.model, args.work / "calib", out) + ["--batch-size", str(b)]
            shutil.rmtree(out, ignore_errors=True)
            print(f"batch size {b}: {peer.shown(cmd)}", flush=True)
            runs[str(b)] = {"command": peer.shown(cmd), **benchlib.measure(cmd, args.work / f"batch{b}.log")}
        folders[b] = out
    for b, folder in sorted(folders.items()):
        run = runs.setdefault(str(b), {"output_of": str(folder)})
        if "ppl" in run:
            continue
        dense = peer.densify(folder, args.model, args.work / "dense" / f"batch{b}")
        run.update(peer.score(args, doc, dense, f"{args.config}-theirs-batch{b}", opts),
                   tensors_sha256=peer.tensors_sha256(folder))
        shutil.rmtree(dense, ignore_errors=True)
        benchlib.write_json(args.out, doc)
        print(f"batch size {b}: ppl {run['ppl']:.4f} KL {run['kl_mean']:.5f}", flush=True)
    scored = {b: r for b, r in runs.items() if "ppl" in r}
    if scored:
        ppl = [r["ppl"] for r in scored.values()]
        kl = [r["kl_mean"] for r in scored.values()]
        doc["spread"] = {"ppl_max_over_min": max(ppl) / min(ppl), "kl_max_over_min": max(kl) / min(kl),
                         "batch_sizes": sorted(scored, key=int)}
        print(f"spread over batch sizes {', '.join(doc['spread']['batch_sizes'])}: ppl max/min "
              f"{doc['spread']['ppl_max_over_min']:.4f}, KL max/min {doc['spread']['kl_max_over_min']:.4f}")
    benchlib.write_json(args.out, doc)


if __name__ == "__main__":
    main()
