"""Shared plumbing for the benchmarks in bench/: measured child runs, machine and version records.

Every timed step runs as a fresh child process; `measure` reads that child's own resource usage
with `os.wait4` (wall time from the parent's monotonic clock, ru_maxrss = the child's peak RSS,
which includes memory-mapped checkpoint pages it touched), and the 1-minute load average
before and after, since the 2 cores of the benchmark machine may be shared.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
PACKAGES = ("torch", "transformers", "safetensors", "accelerate", "bitsandbytes", "optimum", "gptqmodel", "numpy")


def peer_parser(doc: str) -> argparse.ArgumentParser:
    """The arguments every peer runner (gptqmodel_run.py, autoround_run.py) takes: SRC OUT
    --calibration DIR --bits --group-size."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("src")
    p.add_argument("out")
    p.add_argument("--calibration", required=True, help="artifact folder made by `solar-quant calibrate`")
    p.add_argument("--bits", type=int, default=4)
    p.add_argument("--group-size", type=int, default=128)
    return p


def child_env(**extra: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "GPTQMODEL_CPU_WORKERS": "2",
           "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1"}
    env.update(extra)
    return env


def load1() -> float:
    return round(os.getloadavg()[0], 2)


def measure(cmd: list[str], log_path: Path | None = None, env: dict | None = None) -> dict:
    """Run `cmd` as a fresh child; wall time, CPU time, peak RSS, load average at start and end.

    The child's stdout+stderr go to `log_path` (or are discarded). Raises RuntimeError on failure."""
    load_start = load1()
    out = open(log_path, "wb") if log_path else subprocess.DEVNULL
    try:
        start = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env or child_env(), cwd=ROOT)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.monotonic() - start
    finally:
        if log_path:
            out.close()
    code = os.waitstatus_to_exitcode(status)
    result = {"wall_s": round(wall, 2), "cpu_s": round(usage.ru_utime + usage.ru_stime, 1),
              "peak_rss_mib": round(usage.ru_maxrss / 1024, 1), "load1_start": load_start, "load1_end": load1(),
              "exit_code": code}
    if code != 0:
        tail = Path(log_path).read_text(errors="replace")[-3000:] if log_path else ""
        raise RuntimeError(f"{' '.join(map(str, cmd))} exited {code}:\n{tail}")
    return result


def folder_bytes(path: Path, pattern: str = "*.safetensors") -> int:
    return sum(p.stat().st_size for p in Path(path).rglob(pattern) if p.is_file())


def safetensors_tensor_bytes(path: Path) -> dict[str, tuple[str, list[int], int]]:
    """name -> (dtype, shape, data bytes) for every tensor in a folder's safetensors files (headers only)."""
    out = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        for name, info in header.items():
            if name == "__metadata__":
                continue
            a, b = info["data_offsets"]
            out[name] = (info["dtype"], info["shape"], b - a)
    return out


def machine() -> dict:
    model = platform.processor() or platform.machine()
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in text.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    try:
        import psutil

        mem = round(psutil.virtual_memory().total / 1024**3, 1)
    except ImportError:
        mem = None
    return {"cpu": model, "cores": os.cpu_count(), "memory_gib": mem, "platform": platform.platform(),
            "python": platform.python_version()}


def versions() -> dict:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=ROOT).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def write_json(path: Path, doc: dict) -> None:
    """Write atomically (a benchmark killed mid-write keeps the previous file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, path)


def wait_for_quiet(max_load: float, max_wait_s: float, poll_s: float = 60.0, log=print) -> dict:
    """Sleep until the 1-minute load average is <= max_load (or max_wait_s passes); say which."""
    start = time.monotonic()
    while True:
        now = load1()
        if now <= max_load:
            return {"quiet": True, "load1": now, "waited_s": round(time.monotonic() - start)}
        if time.monotonic() - start >= max_wait_s:
            log(f"load average still {now} after {max_wait_s:.0f} s; running anyway")
            return {"quiet": False, "load1": now, "waited_s": round(time.monotonic() - start)}
        log(f"load average {now} > {max_load}; waiting")
        time.sleep(poll_s)
