"""Our GPTQ against GPTQModel 7.6.0 on SmolLM2-135M: same calibration token ids, same options,
alternating runs, each in a fresh process; then perplexity and KL vs fp16 with one baseline.

    PYTHONPATH=. python bench/gptq_vs_gptqmodel.py [--work /tmp/sqbench/gvg] [--nsamples 64 --seqlen 512]
        [--reps 4b-g128=3,4b-g128-act=1,3b-g128=1] [--max-tokens 16384] [--quiet-load 2.5]
        [--steps calibrate,quantize,eval,report] [--calib-seed 0] [--out bench/results/gptq_vs_gptqmodel.json]
        [--redo ours,ours-rtn]

Steps (each resumable: finished runs are kept in the JSON and skipped):
1. calibrate: `solar-quant calibrate --model M --out WORK/calib --nsamples N --seqlen L` (the bundled set).
2. quantize: for each config, `reps` pairs in the order ours, theirs, ours, theirs, ...:
   ours = `python -m solar_quant quantize M OUT --method gptq --calibration WORK/calib ...`,
   theirs = `python bench/gptqmodel_run.py M OUT --calibration WORK/calib ...` (GPTQModel, fp32 on CPU,
   the identical ids, act_group_aware off, GPTQ v1). Then RTN (ours, same grid) per bits and bnb-nf4 once.
   Each run: wall time, CPU time, peak RSS (os.wait4 of the child), load average at start and end,
   output bytes. Before each run the script waits (up to --max-wait s) for the 1-minute load
   average to fall to --quiet-load.
3. eval: `solar_quant.evaluate.run.evaluate` per output against the fp16 folder, one baseline cache:
   bundled held-out text, windows of --eval-seqlen tokens, stride = seqlen, the first --max-tokens
   tokens, fp32 on CPU, KL from the baseline's top-64 log-probs + the rest mass. Each variant is
   scored through a dense fp32 copy of the weights its runtime multiplies by (`densify`): the
   quantized CPU kernels take ~2 min per 512-token window here. Outputs with byte-identical
   tensors reuse the first one's scores. runtime-check: for a few runs, dense and real-kernel
   scores on the first --runtime-check-tokens tokens, side by side.
4. report: ours/theirs ratios (min / median / max over the pairs) of wall time, peak RSS, output
   bytes, perplexity and mean KL; the bars (GPTQ's perplexity excess over fp16 vs RTN's).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchlib  # noqa: E402

MODEL = "/tmp/sqcache/models/SmolLM2-135M-Instruct-fp16"
CONFIGS = {  # name -> (bits, group size, act-order, clipping search norm: 0 = min/max range)
    "4b-g128": (4, 128, False, 0.0),
    "4b-g128-act": (4, 128, True, 0.0),
    "3b-g128": (3, 128, False, 0.0),
    "4b-g128-act-mse": (4, 128, True, 2.4),
    "3b-g128-act-mse": (3, 128, True, 2.4),
    # ours only, paired with the peer's run of PEER_OF[name] (the peer has no such step):
    "4b-g128-act-mse-eq": (4, 128, True, 2.4),
    "3b-g128-act-mse-eq": (3, 128, True, 2.4),
    "4b-g128-act-hclip": (4, 128, True, 0.0),
    "3b-g128-act-hclip": (3, 128, True, 0.0),
    "4b-g128-act-hclip-eq": (4, 128, True, 0.0),
    "3b-g128-act-hclip-eq": (3, 128, True, 0.0),
    "4b-g128-act-hdiag-eq": (4, 128, True, 0.0),
    "3b-g128-act-hdiag-eq": (3, 128, True, 0.0),
    "4b-g128-static-mse-eq": (4, 128, True, 2.4),
    "3b-g128-static-mse-eq": (3, 128, True, 2.4),
    "4b-g128-act-gloss-eq": (4, 128, True, 0.0),
    "3b-g128-act-gloss-eq": (3, 128, True, 0.0),
    "4b-g128-static-hclip-eq": (4, 128, True, 0.0),
    "3b-g128-static-hclip-eq": (3, 128, True, 0.0),
    "2b-g64-act-gloss-eq": (2, 64, True, 0.0),
    "4b-g128-act-gloss": (4, 128, True, 0.0),  # the cost of --equalize: the same without it
    # coordinate descent on the codes (--refine SWEEPS, methods/refine.py) after the configuration above
    "4b-g128-act-gloss-eq-cd2": (4, 128, True, 0.0),
    "3b-g128-act-gloss-eq-cd2": (3, 128, True, 0.0),
    "4b-g128-act-gloss-eq-cd4": (4, 128, True, 0.0),
    "3b-g128-act-gloss-eq-cd4": (3, 128, True, 0.0),
    # targets from the unquantized model's inputs (--propagate ALPHA, methods/propagate.py): pp10 = 1.0, pp05 = 0.5
    **{f"{b}b-g128-act-gloss-eq-pp{a}": (b, 128, True, 0.0) for b in (4, 3) for a in ("10", "05")},
    # AutoRound's runs (impl "autoround", bench/autoround_run.py; sign-gradient rounding, no act-order)
    "4b-g128-autoround": (4, 128, False, 0.0),
    "3b-g128-autoround": (3, 128, False, 0.0),
    "2b-g64-autoround": (2, 64, False, 0.0),
}
OURS_EXTRA = {  # config -> flags only our run takes
    "4b-g128-act-mse-eq": ["--equalize"], "3b-g128-act-mse-eq": ["--equalize"],
    "4b-g128-act-hclip": ["--clip", "hessian"], "3b-g128-act-hclip": ["--clip", "hessian"],
    "4b-g128-act-hclip-eq": ["--clip", "hessian", "--equalize"], "3b-g128-act-hclip-eq": ["--clip", "hessian", "--equalize"],
    "4b-g128-act-hdiag-eq": ["--clip", "hessian-diag", "--equalize"],
    "3b-g128-act-hdiag-eq": ["--clip", "hessian-diag", "--equalize"],
    "4b-g128-act-gloss-eq": ["--clip", "gptq-loss", "--equalize"],
    "3b-g128-act-gloss-eq": ["--clip", "gptq-loss", "--equalize"],
    "4b-g128-static-mse-eq": ["--static-groups", "--equalize"], "3b-g128-static-mse-eq": ["--static-groups", "--equalize"],
    "4b-g128-static-hclip-eq": ["--static-groups", "--clip", "hessian", "--equalize"],
    "3b-g128-static-hclip-eq": ["--static-groups", "--clip", "hessian", "--equalize"],
    "2b-g64-act-gloss-eq": ["--clip", "gptq-loss", "--equalize"],
    "4b-g128-act-gloss": ["--clip", "gptq-loss"],
    **{f"{b}-g128-act-gloss-eq-cd{n}": ["--clip", "gptq-loss", "--equalize", "--refine", str(n)]
       for b in ("4b", "3b") for n in (2, 4)},
    **{f"{b}-g128-act-gloss-eq-pp{a}": ["--clip", "gptq-loss", "--equalize", "--propagate", f"{int(a) / 10:g}"]
       for b in ("4b", "3b") for a in ("10", "05")},
}
# GPTQModel's best: act-order + its mse (raced at 4 and 3 bits only)
PEER_OF = {name: f"{name[:2]}-g128-act-mse" for name in OURS_EXTRA if name[:2] in ("4b", "3b")}


def autoround_config(bits: int, group_size: int) -> str:
    """AutoRound's config at these bits and group size, the partner of ours in the race."""
    return f"{bits}b-g{group_size}-autoround"


AUTOROUND_OF = {name: autoround_config(*CONFIGS[name][:2]) for name in OURS_EXTRA}
AUTOROUND_RECIPE = "default"  # AutoRound's default recipe: 200 steps per block (bench/autoround_run.py)
DAMP = 0.01
BARS = {4: 0.5, 3: 0.2}  # by bits: GPTQ's ppl excess <= BAR x RTN's excess (every config is reported)
SAME_WITHIN = 1.01  # our ppl and KL no worse than GPTQModel's within 1 %


def parse_reps(text: str) -> dict[str, int]:
    out = {}
    for part in text.split(","):
        name, _, n = part.partition("=")
        if name not in CONFIGS:
            raise SystemExit(f"--reps: unknown config {name!r}; expected one of {', '.join(CONFIGS)}")
        out[name] = int(n or 1)
    return out


def schedule(reps: dict[str, int], one_thread: list[str] = (), floors: bool = True,
             impls: tuple[str, ...] = ("ours", "theirs")) -> list[dict]:
    """Every run in execution order: A B A B ... per config, then (unless `floors` is off) the RTN
    floors and bnb-nf4, then diagnostic runs of ours with one intra-op thread (OMP_NUM_THREADS=1)
    for the configs named."""
    runs = []
    for name, n in reps.items():
        for rep in range(1, n + 1):
            for impl in impls:
                if name.endswith("-autoround") != (impl == "autoround"):  # AutoRound's configs are its own
                    continue
                if impl == "theirs" and name in OURS_EXTRA:  # the peer's run is that of its base config
                    continue
                runs.append({"id": f"{name}-{impl}-{rep}", "config": name, "impl": impl, "rep": rep})
    if floors:
        for bits, mse in sorted({(CONFIGS[n][0], CONFIGS[n][3]) for n in reps} | {(CONFIGS[n][0], 0.0) for n in reps},
                                reverse=True):
            rid = rtn_id(bits, mse)
            runs.append({"id": rid, "config": rid, "impl": "ours-rtn", "rep": 1, "bits": bits, "mse": mse})
        runs.append({"id": "bnb-nf4", "config": "bnb-nf4", "impl": "ours-bnb", "rep": 1})
    for name in one_thread:
        runs.append({"id": f"{name}-ours-1thread", "config": name, "impl": "ours", "rep": 0,
                     "env": {"OMP_NUM_THREADS": "1"}})
    return runs


# The peer script is started through runpy so that no process command line contains the peer's
# package name: during the first campaign a broad `pkill -f` by someone else on the shared
# machine killed our runs twice. The recorded command is the plain equivalent.
PEER_LAUNCH = ("import runpy, sys; sys.argv[0] = 'bench/peer_run'; "
               "runpy.run_path('bench/' + 'gptq' + 'model_run.py', run_name='__main__')")


def rtn_id(bits: int, mse: float) -> str:
    """RTN on the same grid: plain min/max (`rtn-4b-g128`) or with the same clipping search (`-mse`)."""
    return f"rtn-{bits}b-g128" + ("-mse" if mse else "")


def command(run: dict, model: str, calib: Path, out: Path) -> list[str]:
    py = benchlib.PYTHON
    if run["impl"] == "ours-rtn":
        bits, mse = run["bits"], run["mse"]
        return [py, "-m", "solar_quant", "quantize", model, str(out), "--method", "rtn", "--bits", str(bits),
                "--group-size", "128"] + (["--mse", str(mse)] if mse else [])
    if run["impl"] == "ours-bnb":
        return [py, "-m", "solar_quant", "quantize", model, str(out), "--method", "bnb-nf4"]
    bits, group, act, mse = CONFIGS[run["config"]]
    clip = ["--mse", str(mse)] if mse else []
    if run["impl"] == "autoround":
        return [py, str(benchlib.ROOT / "bench" / "autoround_run.py"), model, str(out), "--calibration", str(calib), "--bits", str(bits),
                "--group-size", str(group), "--recipe", AUTOROUND_RECIPE]
    if run["impl"] == "ours":
        return [py, "-m", "solar_quant", "quantize", model, str(out), "--method", "gptq", "--bits", str(bits),
                "--group-size", str(group), "--damp", str(DAMP), "--calibration", str(calib),
                "--act-order" if act else "--no-act-order", *clip, *OURS_EXTRA.get(run["config"], [])]
    bits, group, act, mse = CONFIGS[PEER_OF.get(run["config"], run["config"])]
    clip = ["--mse", str(mse)] if mse else []
    return [py, "-c", PEER_LAUNCH, model, str(out), "--calibration", str(calib), "--bits", str(bits),
            "--group-size", str(group), "--damp", str(DAMP)] + (["--act-order"] if act else []) + clip


def shown(cmd: list[str]) -> str:
    """The command as a person would type it."""
    parts = ["python", *cmd[1:]]
    if len(parts) > 2 and parts[1] == "-c" and parts[2] == PEER_LAUNCH:
        parts[1:3] = ["bench/gptqmodel_run.py"]
    return " ".join(parts)


def tensors_sha256(folder: Path) -> str:
    """Identity of a folder's tensors: names, dtypes, shapes and data, independent of sharding."""
    from safetensors import safe_open

    h = hashlib.sha256()
    entries = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for name in st.keys():
                entries[name] = f
    for name in sorted(entries):
        with safe_open(str(entries[name]), "pt") as st:
            t = st.get_tensor(name)
        h.update(f"{name}:{t.dtype}:{list(t.shape)}".encode())
        h.update(t.contiguous().view(-1).view(__import__("torch").uint8).numpy().tobytes())
    return h.hexdigest()


def redo(doc: dict, names: set[str], why: str = "") -> None:
    """Forget the runs (and their scores and runtime checks) of the implementations or run ids
    `names`; the others stay, each with the commit it was measured at. What was dropped, with
    its commit and timing, is kept in `redone`."""
    runs = doc.get("runs", {})
    unknown = names - {"ours", "ours-rtn", "ours-bnb", "theirs", "autoround"} - set(runs)
    if unknown:
        raise SystemExit(f"--redo: {', '.join(sorted(unknown))}: neither an implementation (ours, ours-rtn, ours-bnb, "
                         f"theirs, autoround) nor a run in the results file")
    dropped = {rid: {k: run.get(k) for k in ("commit", "wall_s", "peak_rss_mib", "load1_start", "load1_end")}
               for rid, run in runs.items() if run.get("impl") in names or rid in names}
    for rid in dropped:
        runs.pop(rid)
        doc.get("scores", {}).pop(rid, None)
        doc.get("runtime_check", {}).pop(rid, None)
    doc.setdefault("redone", []).append({"redo": sorted(names), "why": why, "runs": dropped,
                                         "at": dt.datetime.now().isoformat(timespec="seconds")})


def load_doc(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def step_calibrate(args, doc) -> None:
    calib = args.work / "calib"
    cmd = [benchlib.PYTHON, "-m", "solar_quant", "calibrate", "--model", args.model, "--out", str(calib),
           "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen), "--seed", str(args.calib_seed)]
    if not (calib / "calibration.safetensors").is_file():
        doc["calibration"] = {"command": " ".join(cmd[1:]), **benchlib.measure(cmd, args.work / "calibrate.log")}
    elif (doc.get("calibration") or {}).get("sha256"):
        return
    else:  # made by another results file's run in the same WORK: record which ids, not a timing
        doc["calibration"] = {"command": " ".join(cmd[1:]), "made_by": "an earlier run in this WORK"}
    card = json.loads((calib / "calibration.json").read_text())
    doc["calibration"].update({"sha256": card.get("sha256"), "tokens": card.get("tokens"),
                               "mix": card.get("mix"), "template": card.get("template")})


def step_quantize(args, doc, save) -> None:
    runs = doc.setdefault("runs", {})
    for run in schedule(args.reps, args.one_thread, floors=not args.no_floors, impls=tuple(args.impls.split(","))):
        if run["id"] in runs:
            continue
        quiet = benchlib.wait_for_quiet(args.quiet_load, args.max_wait, log=lambda m: print(m, flush=True))
        out = args.work / "out" / run["id"]
        shutil.rmtree(out, ignore_errors=True)
        cmd = command(run, args.model, args.work / "calib", out)
        print(f"{dt.datetime.now():%H:%M:%S} {run['id']}: {shown(cmd)}", flush=True)
        result = benchlib.measure(cmd, args.work / f"{run['id']}.log", env=benchlib.child_env(**run.get("env", {})))
        log_text = (args.work / f"{run['id']}.log").read_text(errors="replace")
        timing = [json.loads(line.split(" ", 1)[1]) for line in log_text.splitlines()
                  if line.startswith(("GPTQMODEL_TIMING ", "AUTOROUND_TIMING "))]
        runs[run["id"]] = {**run, "command": shown(cmd), "commit": benchlib.git_commit(), **result, "waited_for_quiet": quiet,
                           "output": str(out), "safetensors_bytes": benchlib.folder_bytes(out),
                           "tensor_bytes": sum(b for _, _, b in benchlib.safetensors_tensor_bytes(out).values()),
                           "checkpoint_format": _checkpoint_format(out), **({"phases": timing[-1]} if timing else {})}
        print(f"  wall {result['wall_s']} s, peak RSS {result['peak_rss_mib']} MiB, load {result['load1_start']}"
              f"->{result['load1_end']}", flush=True)
        save()


def _checkpoint_format(out: Path):
    cfg = json.loads((out / "config.json").read_text()).get("quantization_config") or {}
    return cfg.get("checkpoint_format") or cfg.get("format") or cfg.get("quant_method")


def densify(folder: Path, model: str, out: Path) -> Path:
    """A dense fp32 copy of a GPTQ v1 or bitsandbytes folder: every quantized Linear replaced by the
    weight its runtime multiplies by (GPTQ: `formats.gptq_v1.dequantize`, W = scale * (q - zero);
    bnb: bitsandbytes' own dequantize), everything else as stored; the source model's config and
    tokenizer. Scoring it is scoring the variant without the (on CPU, slow) quantized kernels."""
    import torch
    from safetensors.torch import save_file

    from solar_quant.checkpoint.reader import CheckpointReader
    from solar_quant.formats import bnb as bnb_fmt
    from solar_quant.formats.gptq_v1 import dequantize

    reader = CheckpointReader(folder)
    qcfg = reader.config.get("quantization_config") or {}
    names = list(reader.tensors)
    tensors = {}
    if qcfg.get("quant_method") == "gptq":
        modules = sorted({n.removesuffix(".qweight") for n in names if n.endswith(".qweight")})
        for m in modules:
            parts = {k: reader.get(f"{m}.{k}") for k in ("qweight", "qzeros", "scales", "g_idx")}
            tensors[f"{m}.weight"] = dequantize(parts, int(qcfg["bits"])).contiguous()
        done = {f"{m}.{k}" for m in modules for k in ("qweight", "qzeros", "scales", "g_idx")}
    else:
        all_t = {n: reader.get(n) for n in names}
        modules = sorted({bnb_fmt.module_name(n) for n in names if n.endswith(".weight") and
                          (f"{bnb_fmt.module_name(n)}.SCB" in all_t or f"{n}.absmax" in all_t)})
        done = set()
        for m in modules:
            parts = bnb_fmt.linear_parts(m, all_t)
            tensors[f"{m}.weight"] = bnb_fmt.dequantize_linear(parts).contiguous()
            done |= {f"{m}.{k}" for k in parts}
    for n in names:
        if n not in done:
            tensors[n] = reader.get(n).to(torch.float32).contiguous()
    reader_close = getattr(reader, "close", None)
    if reader_close:
        reader_close()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    src = Path(model)
    cfg = json.loads((src / "config.json").read_text())
    cfg.pop("quantization_config", None)
    cfg["dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                 "chat_template.jinja"):
        if (src / name).is_file():
            shutil.copyfile(src / name, out / name)
    return out


def eval_options(args, max_tokens: int | None = None):
    from solar_quant.calibration.bundled import default_eval_text
    from solar_quant.options import EvalOptions

    return EvalOptions(text=str(args.eval_text or default_eval_text()), seqlen=args.eval_seqlen, max_tokens=max_tokens or args.max_tokens,
                       passkey_trials=0, device="cpu", cache_dir=str(args.baseline_cache or args.work / "baseline-cache"))


def score(args, doc, folder: Path, label: str, opts) -> dict:
    from solar_quant.evaluate.run import evaluate

    report = evaluate(args.model, [str(folder)], opts, str(args.work / "eval" / label), log=lambda m: None,
                      show=lambda m: None)
    base, var = report["models"][0]["short"], report["models"][1]["short"]
    doc["eval_protocol"] = {k: report["protocol"][k] for k in ("text", "tokens", "sections", "kl", "dtype", "device")}
    doc.setdefault("fp16_by_max_tokens", {})[str(opts.max_tokens)] = {"ppl": base["ppl"], "tokens": base["tokens"]}
    return {"ppl": var["ppl"], "ppl_ratio": var["ppl_ratio"], "kl_mean": var["kl_mean"], "kl_p99": var["kl_p99"],
            "top1": var["top1"], "tokens": var["tokens"], "eval_s": report["models"][1].get("eval_s"),
            "notes": report["models"][1].get("notes")}


def step_eval(args, doc, save) -> None:
    opts = eval_options(args)
    scores = doc.setdefault("scores", {})
    for rid, run in doc.get("runs", {}).items():
        if rid in scores:
            continue
        out = Path(run["output"])
        sha = tensors_sha256(out)
        same = next((k for k, s in scores.items() if s.get("tensors_sha256") == sha), None)
        if same is not None:
            scores[rid] = {**scores[same], "identical_to": same}
        else:
            dense = densify(out, args.model, args.work / "dense" / rid)
            scores[rid] = {**score(args, doc, dense, rid, opts), "scored_as": "dense fp32 dequantized weights"}
            shutil.rmtree(dense, ignore_errors=True)
        scores[rid]["tensors_sha256"] = sha
        doc["fp16"] = doc["fp16_by_max_tokens"][str(opts.max_tokens)]
        print(f"{rid}: ppl {scores[rid]['ppl']:.4f} KL {scores[rid]['kl_mean']:.5f}"
              + (f" (identical tensors to {same})" if same else ""), flush=True)
        save()


def step_runtime_check(args, doc, save) -> None:
    """On a few windows, the dequantized dense copy against the real runtime kernels (transformers +
    GPTQModel's gptq_torch / bitsandbytes on CPU): the dense scores must agree."""
    opts = eval_options(args, args.runtime_check_tokens)
    checks = doc.setdefault("runtime_check", {})
    for rid in args.runtime_check:
        run = doc.get("runs", {}).get(rid)
        if run is None or rid in checks:
            continue
        out = Path(run["output"])
        dense = densify(out, args.model, args.work / "dense" / rid)
        d = score(args, doc, dense, f"{rid}-dense-check", opts)
        shutil.rmtree(dense, ignore_errors=True)
        r = score(args, doc, out, f"{rid}-runtime-check", opts)
        checks[rid] = {"max_tokens": opts.max_tokens, "dense": d, "runtime": r,
                       "ppl_rel_diff": abs(d["ppl"] - r["ppl"]) / r["ppl"],
                       "kl_abs_diff": abs(d["kl_mean"] - r["kl_mean"])}
        print(f"runtime check {rid}: dense ppl {d['ppl']:.4f} KL {d['kl_mean']:.5f} vs runtime ppl {r['ppl']:.4f} "
              f"KL {r['kl_mean']:.5f} ({r['eval_s']:.0f} s vs {d['eval_s']:.0f} s)", flush=True)
        save()


def _stats(xs: list[float]) -> dict:
    return {"min": min(xs), "median": statistics.median(xs), "max": max(xs), "n": len(xs)} if xs else {}


def step_report(args, doc) -> None:
    runs, scores = doc.get("runs", {}), doc.get("scores", {})
    fp16 = doc.get("fp16", {}).get("ppl")
    summary = {}
    for name in CONFIGS:
        pairs = []
        for rep in range(1, 100):
            a, b = runs.get(f"{name}-ours-{rep}"), runs.get(f"{name}-theirs-{rep}")
            if a is None or b is None:
                break
            pairs.append((rep, a, b))
        if not pairs:
            continue
        ratios = {"wall_s": [], "peak_rss_mib": [], "safetensors_bytes": [], "ppl": [], "kl_mean": []}
        for rep, a, b in pairs:
            for key in ("wall_s", "peak_rss_mib", "safetensors_bytes"):
                ratios[key].append(a[key] / b[key])
            sa, sb = scores.get(a["id"]), scores.get(b["id"])
            if sa and sb:
                ratios["ppl"].append(sa["ppl"] / sb["ppl"])
                ratios["kl_mean"].append(sa["kl_mean"] / sb["kl_mean"])
        per_impl = {}
        for impl in ("ours", "theirs"):
            rows = [r for _, *ab in pairs for r in ab if r["impl"] == impl]
            per_impl[impl] = {key: _stats([r[key] for r in rows]) for key in ("wall_s", "cpu_s", "peak_rss_mib", "safetensors_bytes")}
            ppl = [scores[r["id"]]["ppl"] for r in rows if r["id"] in scores]
            kl = [scores[r["id"]]["kl_mean"] for r in rows if r["id"] in scores]
            per_impl[impl].update(ppl=_stats(ppl), kl_mean=_stats(kl))
        ratio_stats = {k: _stats(v) for k, v in ratios.items()}
        checks = {}
        if ratio_stats["ppl"]:
            checks = {"ppl_within_1pct": ratio_stats["ppl"]["max"] <= SAME_WITHIN,
                      "kl_within_1pct": ratio_stats["kl_mean"]["max"] <= SAME_WITHIN,
                      "wall_lower": ratio_stats["wall_s"]["max"] < 1.0,
                      "peak_rss_lower": ratio_stats["peak_rss_mib"]["max"] < 1.0}
        summary[name] = {"pairs": len(pairs), "ratios_ours_over_theirs": ratio_stats, "per_impl": per_impl,
                         "issue5_peer_checks": checks}
    bars = {}
    for name, (bits, _, _, mse) in CONFIGS.items():
        ours = [scores[r] for r in (f"{name}-ours-{i}" for i in range(1, 100)) if r in scores]
        theirs = [scores[r] for r in (f"{name}-theirs-{i}" for i in range(1, 100)) if r in scores]
        if fp16 is None or not ours:
            continue
        ours_excess = statistics.median(s["ppl"] for s in ours) - fp16
        row = {"fp16_ppl": fp16, "gptq_ppl": ours_excess + fp16, "gptq_excess": ours_excess, "bar": BARS[bits]}
        if theirs:
            row["gptqmodel_excess"] = statistics.median(s["ppl"] for s in theirs) - fp16
        # against RTN with min/max ranges, and (for a clipping config) RTN with the same clipping search
        for key, rid in (("rtn", rtn_id(bits, 0.0)), ("rtn_same_clipping", rtn_id(bits, mse))):
            rtn = scores.get(rid)
            if rtn is None or (key == "rtn_same_clipping" and not mse):
                continue
            rtn_excess = rtn["ppl"] - fp16
            row[key] = {"run": rid, "ppl": rtn["ppl"], "excess": rtn_excess, "excess_ratio": ours_excess / rtn_excess,
                        "passed": ours_excess <= BARS[bits] * rtn_excess}
            if theirs:
                row[key]["gptqmodel_excess_ratio"] = row["gptqmodel_excess"] / rtn_excess
        bars[name] = row
    doc["summary"], doc["issue5_bars"] = summary, bars
    print(markdown(doc))


def markdown(doc: dict) -> str:
    runs, scores = doc.get("runs", {}), doc.get("scores", {})
    lines = ["| run | wall s | CPU s | peak RSS MiB | safetensors MB | ppl | mean KL | top-1 | load 1m start→end |",
             "|---|---|---|---|---|---|---|---|---|"]
    if "fp16" in doc:
        lines.append(f"| fp16 | | | | | {doc['fp16']['ppl']:.3f} | 0 | 1 | |")
    for rid, r in runs.items():
        s = scores.get(rid, {})
        ppl = f"{s['ppl']:.3f}" if s else ""
        kl = f"{s['kl_mean']:.4f}" if s else ""
        top1 = f"{s['top1']:.3f}" if s else ""
        lines.append(f"| {rid} | {r['wall_s']:.1f} | {r['cpu_s']:.0f} | {r['peak_rss_mib']:.0f} | "
                     f"{r['safetensors_bytes'] / 1e6:.1f} | {ppl} | {kl} | {top1} | {r['load1_start']}→{r['load1_end']} |")
    lines += ["", "| config | pairs | wall | peak RSS | size | ppl | mean KL |", "|---|---|---|---|---|---|---|"]
    for name, s in doc.get("summary", {}).items():
        r = s["ratios_ours_over_theirs"]
        cell = lambda k: (f"{r[k]['min']:.3f} / {r[k]['median']:.3f} / {r[k]['max']:.3f}" if r.get(k) else "–")  # noqa: E731
        lines.append(f"| {name} | {s['pairs']} | {cell('wall_s')} | {cell('peak_rss_mib')} | {cell('safetensors_bytes')} | "
                     f"{cell('ppl')} | {cell('kl_mean')} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=MODEL)
    ap.add_argument("--work", type=Path, default=Path("/tmp/sqbench/gvg"))
    ap.add_argument("--out", type=Path, default=benchlib.ROOT / "bench" / "results" / "gptq_vs_gptqmodel.json")
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--calib-seed", type=int, default=0,
                    help="seed of the calibration draw (a different seed draws different samples from the bundled set)")
    ap.add_argument("--reps", type=parse_reps, default=parse_reps("4b-g128=3,4b-g128-act=1,3b-g128=1"))
    ap.add_argument("--one-thread", nargs="*", default=["4b-g128"],
                    help="configs also run (once, after the pairs) as ours with OMP_NUM_THREADS=1, a diagnostic")
    ap.add_argument("--no-floors", action="store_true",
                    help="skip the RTN floors and bnb-nf4 (a quality-only draw of the peer pairs)")
    ap.add_argument("--eval-seqlen", type=int, default=512)
    ap.add_argument("--eval-text", type=Path, default=None,
                    help="score on this text instead of the bundled held-out text (give each text its own --work)")
    ap.add_argument("--impls", default="ours,theirs",
                    help="which tools' runs to make: ours,theirs,autoround (a draw of ours alone pairs with a peer run "
                         "elsewhere; autoround makes the *-autoround configs)")
    ap.add_argument("--max-tokens", type=int, default=16384)
    ap.add_argument("--quiet-load", type=float, default=2.5)
    ap.add_argument("--max-wait", type=float, default=600.0, help="seconds to wait for a quiet machine before each run")
    ap.add_argument("--steps", default="calibrate,quantize,eval,runtime-check,report")
    ap.add_argument("--runtime-check", nargs="*", default=["4b-g128-ours-1", "4b-g128-theirs-1", "bnb-nf4"],
                    help="runs whose dense scores are checked against the real runtime kernels")
    ap.add_argument("--runtime-check-tokens", type=int, default=1024)
    ap.add_argument("--redo", default="", help="comma list of implementations (ours, ours-rtn, ours-bnb, theirs) or run "
                    "ids whose runs and scores are dropped from --out and measured again, e.g. after a change to our "
                    "solver, or a run whose timing another job disturbed")
    ap.add_argument("--redo-why", default="", help="the reason, recorded with the dropped runs")
    ap.add_argument("--runs-from", type=Path, nargs="*", default=[],
                    help="results files whose runs (outputs, timings) and calibration record this file scores too: "
                         "the same quantized folders on another --eval-text (use with --steps eval,report)")
    ap.add_argument("--baseline-cache", type=Path, default=None,
                    help="folder of the fp16 baseline's cached log-probs (default WORK/baseline-cache); one per text "
                         "is shared across draws")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    doc = load_doc(args.out)
    if args.redo:
        redo(doc, set(args.redo.split(",")), args.redo_why)
    for other in args.runs_from:
        src = load_doc(other)
        if not src.get("runs"):
            raise SystemExit(f"--runs-from: {other} has no runs")
        theirs, mine = (src.get("calibration") or {}).get("sha256"), (doc.get("calibration") or {}).get("sha256")
        if theirs and mine and theirs != mine:
            raise SystemExit(f"--runs-from: {other} was calibrated on other token ids than {args.out}")
        if theirs or not mine:
            doc["calibration"] = src.get("calibration")
        for rid, run in src["runs"].items():
            doc.setdefault("runs", {}).setdefault(rid, {**run, "from": str(other)})
    doc["protocol"] = {
        "model": args.model, "calibration": {"source": "bundled set (solar-quant calibrate defaults: solar template, "
                                             "orca 0.3 / alpaca 0.3 / prose 0.4)", "nsamples": args.nsamples,
                                             "seqlen": args.seqlen, "seed": args.calib_seed},
        "configs": {k: {"bits": b, "group_size": g, "act_order": a, "sym": True, "damp": DAMP, "true_sequential": True,
                        "mse": m, **({"ours_extra": OURS_EXTRA[k], "autoround_run_of": AUTOROUND_OF[k]} if k in OURS_EXTRA else {}),
                        **({"peer_run_of": PEER_OF[k]} if k in PEER_OF else {}),
                        **({"autoround_recipe": AUTOROUND_RECIPE} if k.endswith("-autoround") else {})}
                    for k, (b, g, a, m) in CONFIGS.items()},
        "reps": args.reps, "order": "per config: ours, theirs, ours, theirs, ... then RTN, bnb-nf4",
        "gptqmodel": "bench/gptqmodel_run.py: GPTQModel.load(dtype=float32, device=cpu), QuantizeConfig(format='gptq', "
                     "act_group_aware=False, sym=True, true_sequential=True, damp_percent=0.01, mse as the config), quantize(the artifact's "
                     "ids, batch_size=1, calibration_sort=None), save(); GPTQMODEL_CPU_WORKERS=2",
        "ours": "python -m solar_quant quantize M OUT --method gptq --calibration WORK/calib (fp32 compute on CPU)",
        "measurement": "fresh child process per run; wall = parent monotonic clock; peak RSS = os.wait4 ru_maxrss",
        "eval": {"scored_as": "dense fp32 copy of the dequantized weights (densify); checked against the real "
                              "kernels on the first --runtime-check-tokens tokens (runtime_check)",
                 "text": str(args.eval_text) if args.eval_text else "solar_quant.calibration.bundled.default_eval_text()", "seqlen": args.eval_seqlen,
                 "stride": args.eval_seqlen, "max_tokens": args.max_tokens, "dtype": "float32", "device": "cpu",
                 "kl": "mean KL(fp16 || variant) per token, baseline top-64 log-probs + rest mass"},
        "quiet_load": args.quiet_load,
    }
    doc["machine"], doc["versions"], doc["commit"] = benchlib.machine(), benchlib.versions(), benchlib.git_commit()
    doc["command"] = "PYTHONPATH=. python " + " ".join(["bench/gptq_vs_gptqmodel.py", *sys.argv[1:]])

    def save():
        benchlib.write_json(args.out, doc)

    steps = args.steps.split(",")
    if "calibrate" in steps:
        step_calibrate(args, doc)
        save()
    if "quantize" in steps:
        step_quantize(args, doc, save)
    if "eval" in steps:
        step_eval(args, doc, save)
    if "runtime-check" in steps:
        step_runtime_check(args, doc, save)
    if "report" in steps:
        step_report(args, doc)
        save()


if __name__ == "__main__":
    main()
