"""Real clients load our GPTQ folders: transformers + optimum + GPTQModel, on CPU, through
`gptq_runtime.from_pretrained_kwargs`; their logits match an fp32 LlamaForCausalLM holding our
own `gptq_v1.dequantize` of the same tensors.

Tolerance: max |logit difference| ≤ 2e-3 × max |reference logit| with the client in fp32 through
GPTQModel's `TorchLinear` (gptq_torch: it dequantizes the same integers and fp16 scales; what is
left is summation order), 1e-2 through its default CPU 4-bit kernel `TorchAtenLinear`, which
runs `_weight_int4pack_mm_for_cpu` with bfloat16 scales and activations (measured 4.7e-3, g64). A
misread layout (bit order, zero offset, group index) moves logits by tens of percent. The
calibration set is 8 × 128 tokens of standard-library docstrings; the held-out text is other
modules' docstrings (128 tokens)."""

from __future__ import annotations

import json

import pytest
import torch

from gptq_helpers import HELDOUT_MODULES, dequantized_reference, text_calibration, text_ids, truncated_copy

pytest.importorskip("optimum", reason="the [gptq] extra (optimum + gptqmodel) loads GPTQ folders")
pytest.importorskip("gptqmodel", reason="the [gptq] extra (optimum + gptqmodel) loads GPTQ folders")
pytestmark = [pytest.mark.gptq_runtime, pytest.mark.slow, pytest.mark.filterwarnings("ignore::UserWarning")]

TOLERANCE = {"TorchLinear": 2e-3, "TorchAtenLinear": 1e-2}


@pytest.fixture(scope="module")
def calib(demo_model):
    return text_calibration(demo_model, 8, 128)


@pytest.fixture(scope="module")
def heldout(demo_model):
    return text_ids(demo_model, HELDOUT_MODULES)[:128].unsqueeze(0)


@pytest.fixture(scope="module")
def smol4(demo_model, tmp_path_factory):
    """The first 4 decoder layers of SmolLM2 (plus its embeddings, final norm, tokenizer)."""
    return truncated_copy(demo_model, tmp_path_factory.mktemp("smol4") / "smol4", 4)


@pytest.fixture(autouse=True)
def gptqmodel_workers(monkeypatch):
    monkeypatch.setenv("GPTQMODEL_CPU_WORKERS", "2")


def _quantize(src, out, calib, **opts):
    from solar_quant.options import GptqOptions, OutputOptions
    from solar_quant.pipeline.gptq import build_gptq_variant

    return build_gptq_variant(src, out, GptqOptions(**opts), calib, OutputOptions(), log=lambda m: None)


def _client(folder):
    from transformers import AutoModelForCausalLM

    from solar_quant.formats.gptq_runtime import from_pretrained_kwargs

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, device_map="cpu",
                                                **from_pretrained_kwargs(folder)).eval()


def _assert_matches_reference(folder, ids):
    client = _client(folder)
    with torch.no_grad():
        theirs = client(ids).logits.float()
        ours = dequantized_reference(folder)(ids).logits
    rel = float((theirs - ours).abs().max() / ours.abs().max())
    kernel = type(client.model.layers[0].mlp.down_proj).__name__
    assert kernel in TOLERANCE, f"unexpected GPTQModel kernel {kernel}"
    assert rel <= TOLERANCE[kernel], (kernel, rel)
    return client, ours


def test_full_smollm2_4bit_g128_loads_in_transformers_and_matches_our_dequantization(demo_model, calib, heldout,
                                                                                      tmp_path):
    from transformers import AutoModelForCausalLM

    from solar_quant.formats.gptq_runtime import from_pretrained_kwargs

    out = _quantize(demo_model, tmp_path / "q4", calib, bits=4, group_size=128)
    kwargs = from_pretrained_kwargs(out)  # 576 % 128 != 0: the default CPU kernel would refuse it
    assert kwargs["quantization_config"].backend == "gptq_torch"
    record = json.loads((out / "solar_quant.json").read_text())
    assert record["warnings"][0]["linears"] == {name: 576 for name in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj")}
    client, ours = _assert_matches_reference(out, heldout)
    assert type(client.model.layers[0].mlp.down_proj).__module__.startswith("gptqmodel.")  # a GPTQ kernel ran

    # and it is still the model: next-token agreement with the 16-bit source on held-out text
    source = AutoModelForCausalLM.from_pretrained(str(demo_model), dtype=torch.float32).eval()
    with torch.no_grad():
        fp = source(heldout).logits
    agreement = float((fp.argmax(-1) == ours.argmax(-1)).float().mean())
    assert agreement >= 0.6, agreement


@pytest.mark.parametrize("bits,group_size", [(8, 128), (3, 128), (4, 64)])
def test_other_widths_load_and_match(smol4, calib, heldout, tmp_path, bits, group_size):
    """8- and 3-bit (partial groups at g128), and 4-bit g64, which every kernel takes: plain
    `from_pretrained(OUT)` with no extra arguments."""
    from solar_quant.formats.gptq_runtime import from_pretrained_kwargs

    out = _quantize(smol4, tmp_path / f"q{bits}", calib, bits=bits, group_size=group_size)
    assert bool(from_pretrained_kwargs(out)) == (group_size == 128)
    _assert_matches_reference(out, heldout)


@pytest.mark.parametrize("method,opts", [
    ("gptq", dict(bits=4, group_size=64, act_order=True, clip="hessian", equalize=True)),
    ("rtn", dict(bits=3, group_size=128, equalize=True)),
])
def test_equalized_folder_loads_unmodified_and_matches(smol4, calib, heldout, tmp_path, method, opts):
    """An equalized folder (AWQ scales folded into the 16-bit norms and o/down inputs) is plain GPTQ v1
    to the client: transformers + optimum + GPTQModel load it as it is, and their logits match our
    dequantization of its tensors (folded norms included)."""
    from safetensors import safe_open

    out = _quantize(smol4, tmp_path / f"eq-{method}", calib, method=method, **opts)
    def norm(folder):
        for shard in sorted(folder.glob("*.safetensors")):
            with safe_open(str(shard), framework="pt") as f:
                if "model.layers.0.input_layernorm.weight" in f.keys():
                    return f.get_tensor("model.layers.0.input_layernorm.weight").float()

    assert (out / "equalization").is_dir() and not torch.equal(norm(out), norm(smol4))  # the scales are folded in
    _assert_matches_reference(out, heldout)
