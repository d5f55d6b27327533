"""The demo recipe writes variants every runtime loads, and a GPTQ run says how long it will take
before it starts (the dry run's estimate)."""

from __future__ import annotations

from conftest import ROOT, cli
from gptq_helpers import random_calibration
from solar_quant.architecture import LlamaShape
from solar_quant.checkpoint.reader import CheckpointReader
from solar_quant.recipe import load_recipe

DEMO = ROOT / "recipes" / "demo-smollm2.toml"


def test_demo_gptq_and_rtn_groups_divide_every_linear(demo_model):
    """No partial groups on SmolLM2 (K = 576 and 1536): transformers' default CPU 4-bit kernel and
    vLLM's Marlin refuse them. Symmetric, so vLLM's CPU kernel (symmetric 4-bit only) takes it too."""
    from solar_quant.pipeline.gptq import partial_group_warnings

    shape = LlamaShape.from_config(CheckpointReader(demo_model).config)
    gptq_like = [v.quantize for v in load_recipe(DEMO).variants if v.quantize.method in ("gptq", "rtn")]
    assert gptq_like
    for q in gptq_like:
        assert partial_group_warnings(shape, q) == [], q
        assert q.sym and q.bits == 4


def test_estimate_grows_with_the_calibration_tokens(demo_model):
    from solar_quant.pipeline.dry_run import time_range_s

    shape = LlamaShape.from_config(CheckpointReader(demo_model).config)
    small = time_range_s(shape, "gptq", 32, 256, "cpu", 0)
    large = time_range_s(shape, "gptq", 128, 2048, "cpu", 0)
    from solar_quant.options import GptqOptions

    clipped = time_range_s(shape, "gptq", 32, 256, "cpu", 0, GptqOptions(method="gptq", mse=2.4))
    assert 0 < small[0] < small[1] and large[0] > 16 * small[0]
    assert clipped[0] > small[0]  # the clipping search costs solve time
    equalized = time_range_s(shape, "gptq", 32, 256, "cpu", 0, GptqOptions(method="gptq", equalize=True))
    assert equalized[0] > small[0]  # the exponent search adds its products
    refined = [time_range_s(shape, "gptq", 32, 256, dev, 0, GptqOptions(method="gptq", refine=n))
               for dev in ("cpu", "cuda") for n in (2, 4)]
    assert refined[0][0] > small[0] and refined[1][0] > refined[0][0]  # each sweep adds its product
    assert refined[3][0] > refined[2][0] > time_range_s(shape, "gptq", 32, 256, "cuda", 0)[0]
    assert time_range_s(shape, "gptq", 128, 2048, "cuda", 0)[1] < large[0]


def test_equalize_search_flop_counts_every_pair():
    """2 · rows · K² per exponent for q/k/v, o, gate/up and down, on a GQA shape."""
    from solar_quant.methods.awq import ALPHA_GRID
    from solar_quant.pipeline.dry_run import equalize_search_flop

    shape = LlamaShape(hidden=64, layers=3, heads=8, kv_heads=2, head_dim=8, intermediate=160, vocab=100,
                       max_positions=128, tie_word_embeddings=False)
    per_layer = 2 * ((64 + 2 * 16) * 64**2 + 64 * 64**2 + 320 * 64**2 + 64 * 160**2)
    assert equalize_search_flop(shape) == 3 * ALPHA_GRID * per_layer
    from solar_quant.pipeline.dry_run import refine_flop

    assert refine_flop(shape, 0) == 0 and refine_flop(shape, 2) == 3 * 3 * per_layer


def test_quantize_gptq_prints_its_expected_time_before_starting(tiny_llama, tmp_path):
    random_calibration(4, 32, 49152, tiny_llama, seed=1).save(tmp_path / "calib")
    proc = cli("quantize", tiny_llama, tmp_path / "out", "--method", "gptq", "--group-size", "32",
               "--calibration", tmp_path / "calib", check=True)
    lines = proc.stderr.splitlines()
    estimate = [i for i, line in enumerate(lines) if line.startswith("gptq: 4 x 32 calibration tokens, 2 layers: expected")]
    progress = [i for i, line in enumerate(lines) if line.startswith(("linear ", "layer "))]
    assert estimate and progress and estimate[0] < progress[0], proc.stderr
    assert "min on cpu" in lines[estimate[0]]
    assert proc.stdout == f"{tmp_path / 'out'}\n"
