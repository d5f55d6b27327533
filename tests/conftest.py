"""Shared fixtures: the embedded SmolLM2 folder, a tiny random Llama with SmolLM2's
tokenizer, and a helper that runs the CLI in a subprocess as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def demo_model() -> Path:
    from solar_quant.models.demo import demo_model_path

    return demo_model_path()


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory, demo_model) -> Path:
    """2 layers, hidden 64, GQA 4/2 heads, max_position_embeddings 64, several shards."""
    from solar_quant.models.synthetic import llama_config, write_random_llama

    path = tmp_path_factory.mktemp("tiny") / "tiny-llama"
    return write_random_llama(path, llama_config(), seed=0, shard_bytes=1024 * 1024, tokenizer_from=demo_model)


def cli(*args: str, check: bool = False, timeout: float = 900, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python -m solar_quant ARGS` and return the finished process (text output)."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "GPTQMODEL_CPU_WORKERS": "2", **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "solar_quant", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"solar-quant {' '.join(map(str, args))} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc


def assert_clean_failure(proc: subprocess.CompletedProcess, *needles: str) -> None:
    """Non-zero exit, one error line naming each needle, no traceback."""
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("solar-quant: error:")]
    assert len(errors) == 1, proc.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]


def tree_digest(path: Path) -> dict[str, str]:
    """sha256 of every file under `path`, to prove a source folder is untouched."""
    import hashlib

    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}
