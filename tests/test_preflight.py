"""Checks before work: a source that is not a Llama checkpoint, a truncated shard or a bad option
is refused by the shared preflight before any calibration set is built or any model is loaded,
with exactly one line on stderr, nothing on stdout and nothing under OUT (real subprocesses)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from tests.conftest import cli

GPT2_CONFIG = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_embd": 64, "n_head": 4, "n_layer": 2,
               "n_positions": 64, "vocab_size": 49152, "activation_function": "gelu_new"}

RECIPE = """
name = "preflight"
device = "{device}"
[model]
path = "{model}"
name = "tiny-llama"
license = "apache-2.0"

[calibration]
template = "raw"
nsamples = 4
seqlen = 32

[[variants]]
name = "tiny-bnb-nf4"
[variants.quantize]
method = "bnb-nf4"

[[variants]]
name = "tiny-gptq"
[variants.quantize]
method = "gptq"
group_size = 32
"""

COMMANDS = {
    "gptq": ("--method", "gptq", "--group-size", "32", "--template", "raw", "--nsamples", "4", "--seqlen", "32"),
    "rtn": ("--method", "rtn", "--group-size", "32"),
    "bnb-nf4": ("--method", "bnb-nf4"),
}
BAD_OPTION = {"gptq": ("--device", "tpu"), "rtn": ("--device", "tpu"), "bnb-nf4": ("--compute-dtype", "float8")}


def _gpt2(src: Path) -> tuple[str, ...]:
    (src / "config.json").write_text(json.dumps(GPT2_CONFIG))
    return ("config.json", "gpt2", "Llama")


def _truncated(src: Path) -> tuple[str, ...]:
    index = json.loads((src / "model.safetensors.index.json").read_text())
    shard = src / index["weight_map"]["model.layers.1.mlp.up_proj.weight"]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    return (shard.name, "truncated")


SOURCES = {"gpt2-config": _gpt2, "truncated-shard": _truncated, "bad-option": None}


def _assert_refused_before_work(proc, tmp: Path, *needles: str) -> None:
    assert proc.returncode != 0, proc.stderr
    assert proc.stdout == "", proc.stdout
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("solar-quant: error: "), proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert {p.name for p in tmp.iterdir()} <= {"src", "recipe.toml"}, sorted(tmp.iterdir())  # nothing under OUT


def _source(tiny_llama: Path, tmp: Path, case: str) -> tuple[Path, tuple[str, ...]]:
    src = Path(shutil.copytree(tiny_llama, tmp / "src"))
    make = SOURCES[case]
    return src, (make(src) if make else ())


@pytest.mark.parametrize("case", list(SOURCES))
@pytest.mark.parametrize("method", list(COMMANDS))
def test_quantize_refuses_before_work(tiny_llama, tmp_path, method, case):
    src, needles = _source(tiny_llama, tmp_path, case)
    args = [*COMMANDS[method]]
    if case == "bad-option":
        args += BAD_OPTION[method]
        needles = (BAD_OPTION[method][0],)
    proc = cli("quantize", src, tmp_path / "out", *args, env={"SOLAR_QUANT_QUIET": ""})
    _assert_refused_before_work(proc, tmp_path, *needles)


@pytest.mark.parametrize("case", list(SOURCES))
def test_run_refuses_before_work(tiny_llama, tmp_path, case):
    src, needles = _source(tiny_llama, tmp_path, case)
    device = "cpu"
    if case == "bad-option":
        device, needles = "tpu", ("device", "tpu")
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(RECIPE.format(model=src, device=device))
    proc = cli("run", recipe, "--out", tmp_path / "run", env={"SOLAR_QUANT_QUIET": ""})
    _assert_refused_before_work(proc, tmp_path, *needles)
