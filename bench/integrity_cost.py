"""What the output-integrity steps cost: the lock, the final check before a staged folder is
renamed, and the source identities a resumable job records (and `--resume` recomputes).

Protocol:
  1. SmolLM2-135M-Instruct (fp16, three 100 MB shards): `solar-quant quantize` with bnb-nf4 and with
     RTN 4-bit g128, each a fresh child process (wall time); then, in this process, on each
     output folder: the final check (`integrity.staged_findings`, with the written layout
     registered as `ShardedWriter.close` registers it), the manifest hashing that every
     commit already does (`build_manifest`), and lock acquire + release; on the source: the
     file identities (`source_identity`).
  2. A random fp16 Llama of a few GB written with `write_random_llama` (2 GB shards, as
     `quantize` writes by default) under --scratch: the same check, hashing and identities.
  3. SOLAR-0-70b's layout over sparse files (`write_sparse_llama`, real headers, no data on
     disk): check and identities at 140 GB scale (reads of sparse holes cost no disk time,
     so this bounds the CPU side only).
Each in-process step is repeated --repeat times; the median and min are kept. Pages are as
the previous step left them (warm cache: the machine is shared, caches are not dropped).

    PYTHONPATH=. python bench/integrity_cost.py --scratch /tmp/integrity-bench
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import PYTHON, child_env, folder_bytes, git_commit, machine, measure, versions, write_json  # noqa: E402

SMOLLM2 = Path("/root/.cache/solar-quant/models/SmolLM2-135M-Instruct-fp16")
RESULT = Path(__file__).resolve().parent / "results" / "integrity_cost.json"


def timed(fn, repeat: int) -> dict:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return {"median_s": round(statistics.median(times), 4), "min_s": round(min(times), 4), "repeat": repeat}


def register_written_layout(folder: Path) -> None:
    """What `ShardedWriter.close()` registers, taken from the folder's own headers."""
    from solar_quant.checkpoint import integrity
    from solar_quant.checkpoint.headers import read_header

    for shard in sorted(folder.glob("*.safetensors")):
        entries, metadata = read_header(str(shard))
        integrity.expect_shard(folder, shard.name, {n: [e.dtype, list(e.shape), e.begin, e.end] for n, e in entries.items()},
                               metadata)


def folder_costs(folder: Path, repeat: int, hash_repeat: int) -> dict:
    from solar_quant.checkpoint import integrity
    from solar_quant.checkpoint.lock import OutputLock
    from solar_quant.checkpoint.manifest import build_manifest

    register_written_layout(folder)
    findings = integrity.staged_findings(folder)
    assert findings == [], findings
    check = timed(lambda: integrity.staged_findings(folder), repeat)
    integrity.forget(folder)

    def lock_cycle():
        with OutputLock(folder.parent / f"{folder.name}-lockprobe"):
            pass

    out = {"bytes": sum(p.stat().st_size for p in folder.iterdir() if p.is_file()),
           "shards": len(list(folder.glob("*.safetensors"))), "final_check": check,
           "lock_acquire_release": timed(lock_cycle, repeat)}
    if hash_repeat:
        out["manifest_hash"] = timed(lambda: build_manifest(folder), hash_repeat)
        out["check_over_hash"] = round(check["median_s"] / out["manifest_hash"]["median_s"], 5)
    return out


def identity_costs(folder: Path, repeat: int) -> dict:
    from solar_quant.checkpoint.identity import source_identity
    from solar_quant.checkpoint.reader import CheckpointReader
    from solar_quant.variant import SIDE_FILES

    reader = CheckpointReader(folder)
    ident = source_identity(reader.path, reader.shards, SIDE_FILES)
    return {"source_bytes": sum((folder / n).stat().st_size for n in ident), "files": len(ident),
            "sampled_files": sum("sampled_sha256" in v for v in ident.values()),
            "source_identity": timed(lambda: source_identity(reader.path, reader.shards, SIDE_FILES), repeat)}


def smollm2(scratch: Path, repeat: int) -> dict:
    out = {}
    for label, args in {"bnb-nf4": ["--method", "bnb-nf4"],
                        "rtn-4bit-g128": ["--method", "rtn", "--bits", "4", "--group-size", "128"]}.items():
        dst = scratch / f"smollm2-{label}"
        shutil.rmtree(dst, ignore_errors=True)
        run = measure([PYTHON, "-m", "solar_quant", "quantize", str(SMOLLM2), str(dst), *args],
                      log_path=scratch / f"smollm2-{label}.log", env=child_env())
        costs = folder_costs(dst, repeat, hash_repeat=3)
        costs["quantize_wall_s"] = run["wall_s"]
        costs["quantize_load1"] = [run["load1_start"], run["load1_end"]]
        costs["check_over_quantize"] = round(costs["final_check"]["median_s"] / run["wall_s"], 6)
        out[label] = costs
        shutil.rmtree(dst)
    out["source"] = identity_costs(SMOLLM2, repeat)
    return out


def synthetic(scratch: Path, layers: int, repeat: int) -> dict:
    from solar_quant.models.synthetic import llama_config, write_random_llama

    cfg = llama_config(hidden=2048, layers=layers, heads=16, kv_heads=4, intermediate=5632, vocab=32000,
                       max_positions=4096)
    dst = scratch / "synthetic"
    start = time.monotonic()
    write_random_llama(dst, cfg, seed=0, shard_bytes=2 * 1024**3)
    written = time.monotonic() - start
    out = {"config": {k: cfg[k] for k in ("hidden_size", "num_hidden_layers", "num_key_value_heads",
                                         "intermediate_size", "vocab_size")},
           "write_random_llama_s": round(written, 1), "safetensors_bytes": folder_bytes(dst)}
    out.update(folder_costs(dst, repeat, hash_repeat=2))
    out["source"] = identity_costs(dst, repeat)
    shutil.rmtree(dst)
    return out


def sparse_70b(scratch: Path, repeat: int) -> dict:
    """A manifest listing sizes only (hashing holes would measure nothing): the check reads sizes, not hashes."""
    from solar_quant.models.synthetic import SOLAR_70B_CONFIG, write_sparse_llama

    dst = scratch / "sparse-70b"
    write_sparse_llama(dst, SOLAR_70B_CONFIG)
    files = {p.name: {"sha256": None, "bytes": p.stat().st_size} for p in dst.iterdir() if p.is_file()}
    (dst / "manifest.json").write_text(json.dumps({"files": files}))
    out = folder_costs(dst, repeat, hash_repeat=0)
    out["source"] = identity_costs(dst, repeat)
    shutil.rmtree(dst)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scratch", type=Path, required=True, help="a folder with room for the synthetic checkpoint")
    ap.add_argument("--layers", type=int, default=30, help="decoder layers of the synthetic checkpoint")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    args.scratch.mkdir(parents=True, exist_ok=True)
    doc = {"benchmark": "integrity_cost", "protocol": __doc__.split("Protocol:")[1].split("    PYTHONPATH")[0].strip(),
           "command": " ".join(["python", *sys.argv]), "machine": machine(), "versions": versions(),
           "commit": git_commit(), "smollm2": smollm2(args.scratch, args.repeat),
           "synthetic": synthetic(args.scratch, args.layers, args.repeat),
           "sparse_70b_layout": sparse_70b(args.scratch, args.repeat)}
    write_json(RESULT, doc)
    print(RESULT)


if __name__ == "__main__":
    main()
