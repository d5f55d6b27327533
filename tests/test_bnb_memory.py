"""Peak host memory of a bnb conversion does not grow with model depth."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from solar_quant.models.synthetic import llama_config, write_random_llama
from solar_quant.pipeline import malloc
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


@pytest.mark.skipif(malloc.glibc() is None, reason="glibc malloc settings (another C library)")
def test_the_bnb_memory_setting_ends_with_the_variant():
    """The bnb step maps and unmaps every >= 1 MB block while it runs; a later step of the same
    process (`run`: GPTQ and eval after a bnb variant) must reuse freed blocks again, not fault
    each one in anew (it cost `make demo` 96 M page faults and 217 s of system time)."""
    with malloc.freed_memory_returned_promptly():
        inside = _minor_faults_of_allocating(4, 50)
    _minor_faults_of_allocating(4, 50)  # the heap grows to hold the blocks once (~5,000 faults here)
    after = _minor_faults_of_allocating(4, 50)
    # 50 x 4 MiB freshly mapped is 51,200 faults of 4 KiB pages (fewer where transparent huge
    # pages back them); reused from the grown heap, a few hundred at most.
    assert after < 5_000, (inside, after)
    assert inside >= after, (inside, after)


_STEADY_FAULTS = """
import resource, sys, torch
from solar_quant.pipeline import malloc
def faults(mib, times):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(times):
        torch.empty(mib * 1024**2, dtype=torch.uint8).fill_(1)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
setting = malloc.freed_blocks_reused() if sys.argv[1] == "gptq" else malloc._thresholds(*malloc.CONVERGED)
with setting:
    faults(40, 10)  # the heap (or the mapping) settles
    print(min(faults(40, 20) for _ in range(3)))  # the fewest of three rounds (see the test)
"""


@pytest.mark.skipif(malloc.glibc() is None, reason="glibc malloc settings (another C library)")
def test_the_gptq_setting_reuses_chunk_sized_blocks():
    """GPTQ allocates and frees the same per-chunk temporaries for every chunk of every layer.
    A 40 MiB block is above the 32 MiB glibc converges to, so outside the GPTQ setting each one
    is mapped and faulted in anew; inside it, it comes back from the heap. Fresh processes, so
    neither run inherits the other's heap."""
    def steady_faults(setting):
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        proc = subprocess.run([sys.executable, "-c", _STEADY_FAULTS, setting], capture_output=True, text=True,
                              env=env, check=True)
        return int(proc.stdout.split()[-1])

    gptq, converged = steady_faults("gptq"), steady_faults("converged")
    # 20 x 40 MiB mapped anew is 204,800 faults of 4 KiB pages (a few hundred where transparent
    # huge pages back every mapping); reused from the heap, next to none. The fewest of three
    # rounds: one CI run saw 4 of 20 blocks faulted anew in its one round under the GPTQ setting
    # (cause not analysed); without the setting every round faults all 20 in.
    assert gptq <= 0.05 * converged + 50, (gptq, converged)


def test_the_gptq_step_runs_under_its_malloc_setting(tiny_llama, tmp_path, monkeypatch):
    """The thresholds the GPTQ step sets, and that the converged ones follow it, even on failure."""
    calls = []

    class FakeLibc:
        def mallopt(self, param, value):
            calls.append((param, value))

    from tests.gptq_helpers import random_calibration
    from solar_quant.options import GptqOptions, OutputOptions
    from solar_quant.pipeline.gptq import build_gptq_variant

    monkeypatch.setattr(malloc, "glibc", lambda: FakeLibc())
    calib = random_calibration(2, 16, 49152, tiny_llama, seed=1)
    build_gptq_variant(tiny_llama, tmp_path / "q", GptqOptions(method="gptq", group_size=128), calib,
                       OutputOptions(), log=lambda m: None)
    assert calls == [(malloc.M_MMAP_THRESHOLD, malloc.REUSE[0]), (malloc.M_TRIM_THRESHOLD, malloc.REUSE[1]),
                     (malloc.M_MMAP_THRESHOLD, malloc.CONVERGED[0]), (malloc.M_TRIM_THRESHOLD, malloc.CONVERGED[1])]
