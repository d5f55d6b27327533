"""The compiled GPTQ column loop (methods/gptq_fused.py) against the eager loop: identical codes,
scales, zero points, dequantized weights and losses, bit for bit, over bit widths, grids and
orders, on matrices and on a tiny model's layer; the fallback to the eager loop when compiling
fails; the choice of loop.

Compiling is slow on a small CPU, so every case uses 8-column blocks and 8-column groups: one
compiled region (rows are dynamic) serves the whole module, compiled into a fresh cache."""

from __future__ import annotations

import pytest
import torch

from gptq_helpers import synthetic_inputs, synthetic_weight

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

BLOCK = 8


@pytest.fixture(scope="module")
def fused(tmp_path_factory):
    from solar_quant.methods.gptq_fused import CompiledColumns

    mp = pytest.MonkeyPatch()
    mp.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path_factory.mktemp("inductor")))
    yield CompiledColumns()
    mp.undo()


def _hessian(columns: int, seed: int = 0) -> torch.Tensor:
    X = synthetic_inputs(256, columns, seed=seed)
    return 2 / X.shape[0] * X.t() @ X


def _assert_same(a, b):
    assert torch.equal(a.intweight, b.intweight)
    assert torch.equal(a.scales, b.scales) and torch.equal(a.zeros, b.zeros) and torch.equal(a.g_idx, b.g_idx)
    assert torch.equal(a.dequant, b.dequant)
    assert a.stats["loss"] == b.stats["loss"]


CASES = [  # bits, group size, sym, clipping norm, act-order, static groups
    (4, 8, True, 0.0, False, False),
    (4, 8, False, 0.0, True, False),
    (3, 8, True, 2.4, True, False),
    (2, 8, False, 2.4, False, False),
    (8, 8, True, 0.0, True, True),
    (3, -1, False, 0.0, True, False),
    (2, -1, True, 2.4, False, False),
    (8, 8, False, 2.4, True, False),
]


@pytest.mark.parametrize("bits,group,sym,mse,act,static", CASES)
def test_compiled_columns_give_the_eager_codes(fused, bits, group, sym, mse, act, static):
    from solar_quant.methods.gptq import gptq_quantize
    from solar_quant.methods.grid import QuantSpec

    W, H = synthetic_weight(24, 40, seed=bits), _hessian(40, seed=bits)   # 5 blocks
    H[3, :] = H[:, 3] = 0  # a dead column
    spec = QuantSpec(bits, group, sym, mse)
    kw = {"blocksize": BLOCK, "actorder": act, "static_groups": static}
    calls = fused.calls
    eager = gptq_quantize(W, H, spec, **kw)
    compiled = gptq_quantize(W, H, spec, fused=fused, **kw)
    assert fused.failure is None
    assert fused.calls > calls  # the compiled region ran (no silent fallback)
    _assert_same(eager, compiled)


def test_compiled_columns_give_the_eager_codes_on_a_tiny_model_layer(fused, tiny_llama):
    """The shipped layer quantizer (staged pass, stacked q/k/v and gate/up) with either loop:
    identical packed tensors, records and next-layer inputs."""
    from solar_quant.checkpoint.reader import CheckpointReader
    from solar_quant.methods import gptq_fused
    from solar_quant.pipeline.layer_quant import LayerQuantConfig, quantize_layer
    from solar_quant.pipeline.layers import LayerRunner, embed_tokens, llama_config, load_decoder_layer
    from solar_quant.progress import Progress

    reader = CheckpointReader(tiny_llama)
    runner = LayerRunner(llama_config(reader.config), torch.device("cpu"), chunk=2)
    ids = torch.randint(0, 49152, (4, 16), generator=torch.Generator().manual_seed(0))
    hidden = embed_tokens(reader, ids)
    results = []
    mp = pytest.MonkeyPatch()
    mp.setattr(gptq_fused, "_COMPILED", fused)
    try:
        for loop in ("eager", "compiled"):
            cfg = LayerQuantConfig(bits=4, group_size=8, act_order=True, mse=2.4, block_size=BLOCK, column_loop=loop)
            layer = load_decoder_layer(reader, runner.config, 0, torch.device("cpu"))
            calls = fused.calls
            packed, record = quantize_layer(0, layer, runner, hidden, cfg, Progress(7, "t"), lambda m: None)
            assert (fused.calls > calls) == (loop == "compiled")
            results.append((packed, record, runner.forward(layer, hidden)))
    finally:
        mp.undo()
    (p1, r1, h1), (p2, r2, h2) = results
    assert sorted(p1) == sorted(p2) and len(p1) == 7
    for name in p1:
        for key in p1[name]:
            assert torch.equal(p1[name][key], p2[name][key]), (name, key)
    assert r1 == r2 and torch.equal(h1, h2)


def _broken_backend(gm, example_inputs):
    raise RuntimeError("Compiler: g++ is not found")


def test_a_failed_compile_falls_back_to_the_eager_loop_with_one_line():
    from solar_quant.methods.gptq import gptq_quantize
    from solar_quant.methods.gptq_fused import CompiledColumns
    from solar_quant.methods.grid import QuantSpec

    broken = CompiledColumns(compile=lambda fn, **kw: torch.compile(fn, backend=_broken_backend, **kw))
    W, H = synthetic_weight(16, 24), _hessian(24)
    spec = QuantSpec(4, 8, True)
    lines = []
    eager = gptq_quantize(W, H, spec, blocksize=BLOCK, actorder=True)
    for _ in range(2):
        _assert_same(eager, gptq_quantize(W, H, spec, blocksize=BLOCK, actorder=True, fused=broken, log=lines.append))
    assert len(lines) == 1, lines
    assert "using the eager loop" in lines[0] and "g++ is not found" in lines[0]
    assert broken.calls == 0 and broken.failure is not None


def test_a_failure_after_some_blocks_finishes_with_the_eager_loop():
    """Blocks already done by the compiled region stay; the rest runs eagerly: same codes."""
    from solar_quant.methods.gptq import gptq_quantize
    from solar_quant.methods.gptq_fused import segment
    from solar_quant.methods.grid import QuantSpec

    done = []

    def flaky(W1, Hinv1, S, Z, maxq, log=None):
        if len(done) >= 3:
            return None
        done.append(1)
        return segment(W1, Hinv1, S, Z, maxq)  # the compiled region's function, run as is

    W, H = synthetic_weight(16, 48), _hessian(48)
    for spec in (QuantSpec(4, 8, False, 2.4), QuantSpec(3, -1, True)):
        done.clear()
        _assert_same(gptq_quantize(W, H, spec, blocksize=16, actorder=True),
                     gptq_quantize(W, H, spec, blocksize=16, actorder=True, fused=flaky))


def test_the_column_loop_choice(monkeypatch):
    from solar_quant.errors import OptionError
    from solar_quant.methods.gptq_fused import COLUMN_LOOP_ENV, column_loop_for
    from solar_quant.pipeline.gptq import column_loop_from_env

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert column_loop_for(cpu, "auto") == "eager" and column_loop_for(cuda, "auto") == "compiled"
    assert column_loop_for(cuda, "eager") == "eager" and column_loop_for(cpu, "compiled") == "compiled"
    monkeypatch.delenv(COLUMN_LOOP_ENV, raising=False)
    assert column_loop_from_env() == "auto"
    monkeypatch.setenv(COLUMN_LOOP_ENV, "Eager")
    assert column_loop_from_env() == "eager"
    monkeypatch.setenv(COLUMN_LOOP_ENV, "triton")
    with pytest.raises(OptionError, match=COLUMN_LOOP_ENV):
        column_loop_from_env()


def test_a_bad_column_loop_is_refused_before_any_work(tiny_llama, tmp_path):
    """`quantize` and `run` refuse a bad $SOLAR_QUANT_COLUMN_LOOP in one line before a calibration
    set is built (no calibration progress line) or any output appears."""
    from tests.conftest import assert_clean_failure, cli

    env = {"SOLAR_QUANT_COLUMN_LOOP": "triton"}
    proc = cli("quantize", tiny_llama, tmp_path / "q", "--method", "gptq", "--nsamples", "2", "--seqlen", "16", env=env)
    assert_clean_failure(proc, "SOLAR_QUANT_COLUMN_LOOP", "triton")
    assert "calibration:" not in proc.stderr, proc.stderr
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'name = "r"\n[model]\npath = "{tiny_llama}"\n[[variants]]\nname = "g"\n'
                      '[variants.quantize]\nmethod = "gptq"\n')
    proc = cli("run", recipe, "--out", tmp_path / "run", env=env)
    assert_clean_failure(proc, "SOLAR_QUANT_COLUMN_LOOP", "triton")
    assert "calibration:" not in proc.stderr, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.toml"]
