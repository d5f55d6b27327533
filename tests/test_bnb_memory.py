"""Peak host memory of a bnb conversion does not grow with model depth."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from solar_quant.models.synthetic import llama_config, write_random_llama
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
