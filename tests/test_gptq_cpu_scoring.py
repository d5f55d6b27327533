"""Scoring a GPTQ folder on CPU: each linear dequantizes once (no per-layer torch.compile, no
dequantization on every forward) and the logits are bit-identical to the kernel's own path."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("optimum", reason="the [gptq] extra (optimum + gptqmodel) loads GPTQ folders")
pytest.importorskip("gptqmodel", reason="the [gptq] extra (optimum + gptqmodel) loads GPTQ folders")
pytestmark = [pytest.mark.gptq_runtime, pytest.mark.filterwarnings("ignore::UserWarning")]


@pytest.fixture(scope="module")
def gptq_folder(tiny_llama, tmp_path_factory):
    from solar_quant.options import GptqOptions, OutputOptions
    from solar_quant.pipeline.gptq import build_gptq_variant

    out = tmp_path_factory.mktemp("cpu-scoring") / "rtn"
    return build_gptq_variant(tiny_llama, out, GptqOptions(method="rtn", group_size=32), None, OutputOptions(),
                              log=lambda m: None)


@pytest.fixture(autouse=True)
def gptqmodel_workers(monkeypatch):
    monkeypatch.setenv("GPTQMODEL_CPU_WORKERS", "2")


def _quant_linears(model):
    return [m for m in model.modules() if hasattr(m, "qweight") and callable(getattr(m, "enable_weight_cache", None))]


def test_dequantize_once_gives_the_kernels_own_logits(gptq_folder, monkeypatch):
    from solar_quant.evaluate import loading

    ids = torch.randint(0, 49152, (1, 48), generator=torch.Generator().manual_seed(0))
    cached = loading.load_model(gptq_folder, torch.device("cpu"), torch.float32)
    linears = _quant_linears(cached.model)
    assert linears and any("dequantize once" in n for n in cached.notes)
    assert not any("dequantize_weight" in vars(m) for m in linears)  # no per-instance compiled wrapper left
    with torch.no_grad():
        first = cached.model(ids).logits
        again = cached.model(ids).logits
    assert all(m._cached_weights for m in linears)  # the second forward reused the kept weights
    assert torch.equal(first, again)

    # the kernel's own path, eager (the compiled wrapper dropped so no C++ build runs here), no cache
    from solar_quant.formats import gptq_runtime

    monkeypatch.setattr(gptq_runtime, "dequantize_once", lambda model: [])
    plain = loading.load_model(gptq_folder, torch.device("cpu"), torch.float32)
    for m in _quant_linears(plain.model):
        vars(m).pop("dequantize_weight", None)
    with torch.no_grad():
        reference = plain.model(ids).logits
    assert not any(m._cached_weights for m in _quant_linears(plain.model))
    assert torch.equal(first, reference)


def test_memory_check_counts_the_kept_weights(gptq_folder):
    from solar_quant.checkpoint.reader import CheckpointReader
    from solar_quant.evaluate.memory import dequantized_cache_bytes

    reader = CheckpointReader(gptq_folder)
    kept = dequantized_cache_bytes(reader, torch.float32, torch.device("cpu"))
    cfg = reader.config
    h, i, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    kv = cfg["num_key_value_heads"] * cfg.get("head_dim", h // cfg["num_attention_heads"])
    assert kept == layers * 4 * (2 * h * h + 2 * h * kv + 3 * h * i)
    assert dequantized_cache_bytes(reader, torch.float32, torch.device("cuda")) == 0
