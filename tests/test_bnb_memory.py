"""Peak host memory of a bnb conversion does not grow with model depth."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from solar_quant.models.synthetic import llama_config, write_random_llama
from solar_quant.pipeline import bnb as bnb_pipeline
from tests.conftest import ROOT

SHAPE = dict(hidden=1024, heads=8, kv_heads=2, intermediate=5632, vocab=32000, max_positions=256)


def _peak_rss_mib(*args: str) -> float:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SOLAR_QUANT_QUIET": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "solar_quant", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env=env)
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, err.decode()[-2000:]
    return usage.ru_maxrss / 1024


@pytest.mark.slow
def test_peak_rss_is_independent_of_depth(tmp_path):
    peaks, weights = {}, {}
    for layers in (2, 6):
        src = write_random_llama(tmp_path / f"src{layers}", llama_config(layers=layers, **SHAPE),
                                 shard_bytes=64 * 1024**2)
        weights[layers] = sum(p.stat().st_size for p in src.glob("*.safetensors")) / 1024**2
        peaks[layers] = _peak_rss_mib("quantize", str(src), str(tmp_path / f"out{layers}"), "--method", "bnb-int8")
    extra_weights = weights[6] - weights[2]  # ~160 MiB more fp16 weights to read
    assert extra_weights > 150
    # Everything read is released after each tensor: four more layers cost (almost) nothing.
    assert peaks[6] - peaks[2] < 0.4 * extra_weights, (peaks, weights)


def _minor_faults_of_allocating(mib: int, times: int) -> int:
    import resource

    import torch

    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(times):
        torch.empty(mib * 1024**2, dtype=torch.uint8).fill_(1)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@pytest.mark.skipif(bnb_pipeline._glibc() is None, reason="glibc malloc settings (another C library)")
def test_the_bnb_memory_setting_ends_with_the_variant():
    """The bnb step maps and unmaps every >= 1 MB block while it runs; a later step of the same
    process (`run`: GPTQ and eval after a bnb variant) must reuse freed blocks again, not fault
    each one in anew (it cost `make demo` 96 M page faults and 217 s of system time)."""
    with bnb_pipeline._freed_memory_returned_promptly():
        inside = _minor_faults_of_allocating(4, 50)
    _minor_faults_of_allocating(4, 50)  # the heap grows to hold the blocks once (~5,000 faults here)
    after = _minor_faults_of_allocating(4, 50)
    # 50 x 4 MiB freshly mapped is 51,200 faults of 4 KiB pages (fewer where transparent huge
    # pages back them); reused from the grown heap, a few hundred at most.
    assert after < 5_000, (inside, after)
    assert inside >= after, (inside, after)
