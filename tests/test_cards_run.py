"""Every model card's "Load it" code runs as written: the Python block is taken out of README.md,
only the folder path is filled in (and generation shortened to a few tokens), and it runs in a
fresh interpreter on CPU for each kind of variant the recipes and the demo write on the tiny
model: bnb-nf4, bnb-int8, GPTQ with a group size that divides every linear's inputs (32), GPTQ
with one that does not (64 vs down_proj's K = 160, as 128 vs SmolLM2's 576), and RTN.

The partial-group card must pick GPTQModel's torch kernel itself; without that line its code
fails on CPU (checked here too, so the test can tell the difference).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from solar_quant.options import BnbOptions, GptqOptions, OutputOptions

pytest.importorskip("optimum", reason="the [gptq] extra (optimum + gptqmodel) loads GPTQ folders")
pytest.importorskip("gptqmodel", reason="the [gptq] extra (optimum + gptqmodel) loads GPTQ folders")
pytestmark = pytest.mark.slow

NEW_TOKENS = 4
VARIANTS = {
    "bnb-nf4": BnbOptions(method="bnb-nf4"),
    "bnb-int8": BnbOptions(method="bnb-int8"),
    "gptq-g32": GptqOptions(method="gptq", bits=4, group_size=32, act_order=True),
    "gptq-g64-partial": GptqOptions(method="gptq", bits=4, group_size=64),
    "rtn-g32": GptqOptions(method="rtn", bits=4, group_size=32),
}


def _build(src: Path, out: Path, opts) -> Path:
    from gptq_helpers import random_calibration

    from solar_quant.pipeline.bnb import build_bnb_variant
    from solar_quant.pipeline.cards import write_card
    from solar_quant.pipeline.gptq import build_gptq_variant

    quiet = lambda *_a, **_k: None  # noqa: E731
    if isinstance(opts, BnbOptions):
        build_bnb_variant(str(src), str(out), opts, OutputOptions(), log=quiet)
    else:
        calib = random_calibration(4, 64, 49152, seed=0) if opts.method == "gptq" else None
        build_gptq_variant(str(src), str(out), opts, calib, OutputOptions(), log=quiet)
    write_card(out)
    return out


@pytest.fixture(scope="module")
def folders(tiny_llama, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cards-run")
    return {key: _build(tiny_llama, root / f"tiny-{key}", opts) for key, opts in VARIANTS.items()}


def loading_code(card: str) -> str:
    """The first ```python block under "## Load it"."""
    section = card.split("## Load it", 1)[1].split("\n## ", 1)[0]
    m = re.search(r"```python\n(.*?)```", section, re.S)
    assert m, section
    return m.group(1)


def runnable(code: str, folder: Path) -> str:
    """The card's code with this folder's path and a short generation; prints how many tokens came."""
    code, n = re.subn(r'^path = "[^"\n]+"  # this folder$', f"path = {str(folder)!r}", code, flags=re.M)
    assert n == 1, code
    code, n = re.subn(r"max_new_tokens=\d+", f"max_new_tokens={NEW_TOKENS}", code)
    assert n == 1, code
    return code + '\nprint("GENERATED", out.shape[1] - inputs["input_ids"].shape[1])\n'


def run_script(code: str, where: Path) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter. Under SOLAR_QUANT_BNB_CPU_KERNEL=generic (the suite run as a
    machine without AVX-512-bf16 would run it) bitsandbytes is first told the CPU lacks it."""
    from solar_quant.formats.entries.bitsandbytes import BNB_CPU_KERNEL_ENV

    if os.environ.get(BNB_CPU_KERNEL_ENV, "").strip().lower() == "generic":
        code = "import bitsandbytes.nn.modules as _bnb\n_bnb.has_avx512bf16 = lambda: False\n" + code
    script = where / "load_it.py"
    script.write_text(code)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GPTQMODEL_CPU_WORKERS": "2", "CUDA_VISIBLE_DEVICES": ""}
    env.pop("PYTHONPATH", None)  # the card's code needs transformers and its extras, not solar-quant
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600, cwd=where, env=env)


@pytest.mark.parametrize("key", list(VARIANTS))
def test_card_loading_code_runs_as_written(folders, key, tmp_path):
    code = loading_code((folders[key] / "README.md").read_text())
    proc = run_script(runnable(code, folders[key]), tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    generated = re.findall(r"^GENERATED (\d+)$", proc.stdout, re.M)
    assert generated and 1 <= int(generated[-1]) <= NEW_TOKENS, proc.stdout[-2000:]
    assert ("backend=\"gptq_torch\"" in code) == (key == "gptq-g64-partial")  # only where it is needed


def test_partial_group_card_needs_its_kernel_line(folders, tmp_path):
    """Without the torch kernel the default CPU kernel refuses K=160 with group size 64: the card's
    kernel choice is what makes it load, not luck."""
    code = loading_code((folders["gptq-g64-partial"] / "README.md").read_text())
    assert ", quantization_config=kernel" in code
    proc = run_script(runnable(code.replace(", quantization_config=kernel", ""), folders["gptq-g64-partial"]), tmp_path)
    assert proc.returncode != 0
    assert "divisible" in proc.stderr, proc.stderr[-2000:]
