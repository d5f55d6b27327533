"""Targets from the unquantized model's inputs (methods/propagate.py, `quantize --propagate ALPHA`):
the decomposition that makes the asymmetric objective GPTQ's own on a new target, checked on small
matrices; the cross product's chunked sums; the reference stream carried through a layer beside
the quantized one; and through the CLI: recorded, verified, closer to the unquantized model on the
data it was fitted to, resumable, under two processes, refused where it cannot run."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from conftest import assert_clean_failure, cli
from gptq_helpers import QUIET, assert_quantize_refused, assert_resume_is_byte_identical, dequantized_reference
from test_awq_math import _gqa_layer, _runner
from test_gptq_pipeline import _build, tiny_calib  # noqa: F401  (fixture)

from solar_quant.methods.gptq import accumulate_hessian
from solar_quant.methods.propagate import accumulate_cross, propagated_target


def _pair(seed: int, rows: int = 6, cols: int = 10, tokens: int = 400):
    """W, the quantized model's inputs X and the unquantized model's X̃ = X + a correlated shift."""
    g = torch.Generator().manual_seed(seed)
    X_ref = torch.randn(tokens, cols, generator=g, dtype=torch.float64) @ torch.randn(cols, cols, generator=g,
                                                                                      dtype=torch.float64)
    X = X_ref + 0.3 * torch.randn(tokens, cols, generator=g, dtype=torch.float64) + 0.1 * X_ref.roll(1, dims=1)
    W = torch.randn(rows, cols, generator=g, dtype=torch.float64)
    return W, X, X_ref


def _stats(X, X_ref):
    H, _ = accumulate_hessian(None, 0, X.float())
    C, _ = accumulate_cross(None, 0, X.float(), X_ref.float())
    return H, C


@pytest.mark.parametrize("seed", range(4))
def test_the_target_turns_the_asymmetric_loss_into_gptqs(seed):
    """‖QX − WX̃‖² = ‖(Q − W*)X‖² + const for every Q, W* the undamped target: two random Q's
    differ by the same amount under both losses, and W* is the least-squares fit of WX̃ on X."""
    W, X, X_ref = _pair(seed)
    H, C = _stats(X, X_ref)
    T = propagated_target(W.float(), H, C, alpha=1.0, damp=1e-7).double()
    lstsq = torch.linalg.lstsq(X, X_ref @ W.t()).solution.t()
    torch.testing.assert_close(T, lstsq, rtol=2e-3, atol=2e-3)
    g = torch.Generator().manual_seed(100 + seed)
    Q1, Q2 = (W + 0.2 * torch.randn(W.shape, generator=g, dtype=torch.float64) for _ in range(2))

    def asym(Q):
        return float(((X @ Q.t() - X_ref @ W.t()) ** 2).sum())

    def gptq(Q):
        return float(((X @ (Q - T).t()) ** 2).sum())

    assert asym(Q1) - asym(Q2) == pytest.approx(gptq(Q1) - gptq(Q2), rel=2e-3)
    assert asym(T) < min(asym(Q1), asym(Q2), asym(W))


def test_alpha_interpolates_and_equal_inputs_change_nothing():
    W, X, X_ref = _pair(7)
    H, C = _stats(X, X_ref)
    W = W.float()
    whole, half = (propagated_target(W, H, C, alpha=a) for a in (1.0, 0.5))
    torch.testing.assert_close(half, (W + whole) / 2, rtol=1e-5, atol=1e-5)
    assert torch.equal(propagated_target(W, H, C, alpha=0.0), W)
    H2, C2 = _stats(X, X)
    torch.testing.assert_close(propagated_target(W, H2, C2), W, rtol=0, atol=1e-4)
    before = (W.clone(), H.clone(), C.clone())
    propagated_target(W, H, C)
    assert all(torch.equal(a, b) for a, b in zip(before, (W, H, C)))  # inputs not mutated


def test_a_dead_column_keeps_its_weights_and_chunks_sum_like_one_product():
    W, X, X_ref = _pair(3)
    X = X.clone()
    X[:, 4] = 0  # no quantized input reaches column 4; the unquantized model's does
    H, C = _stats(X, X_ref)
    T = propagated_target(W.float(), H, C)
    assert torch.isfinite(T).all()
    assert torch.equal(T[:, 4], W.float()[:, 4])
    C_chunks, n = None, 0
    for a in range(0, X.shape[0], 64):
        C_chunks, n = accumulate_cross(C_chunks, n, X[a:a + 64].float(), X_ref[a:a + 64].float())
    assert n == X.shape[0]
    torch.testing.assert_close(C_chunks, (2 / n * X_ref.t() @ X).float(), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="shape"):
        accumulate_cross(None, 0, X.float(), X_ref[:, :3].float())


@pytest.mark.parametrize("equalize", [False, True])
def test_the_layer_carries_the_unquantized_stream_and_gets_closer_to_it(equalize):
    """quantize_layer with a reference: the reference buffer receives exactly the unquantized
    layer's outputs, the written tensors are what the layer holds, and the quantized layer's
    outputs on its (perturbed) inputs are closer to the unquantized layer's on the clean inputs
    than plain GPTQ's are."""
    from solar_quant.formats.gptq_v1 import dequantize
    from solar_quant.pipeline.equalize import StageEqualizer
    from solar_quant.pipeline.layer_quant import LayerQuantConfig, quantize_layer
    from solar_quant.progress import Progress

    config, layer = _gqa_layer(seed=5)
    g = torch.Generator().manual_seed(1)
    clean = torch.randn(6, 16, 32, generator=g)
    hidden = clean + 0.3 * torch.randn(clean.shape, generator=g)  # what earlier quantized layers would hand on
    fp_out = _runner(config).forward(layer, clean)
    errors = {}
    for alpha in (0.0, 1.0):
        cfg = LayerQuantConfig(bits=3, group_size=16, act_order=True, clip="gptq-loss", propagate=alpha)
        work = copy.deepcopy(layer)
        ref_out = torch.empty_like(clean)
        reference = (copy.deepcopy(layer), clean, ref_out) if alpha else None
        eq = StageEqualizer(work, cfg, 0) if equalize else None
        quantized, record = quantize_layer(0, work, _runner(config), hidden, cfg, Progress(7, "linear"),
                                           log=lambda m: None, equalizer=eq, reference=reference)
        if alpha:
            torch.testing.assert_close(ref_out, fp_out, rtol=1e-5, atol=1e-5)
        for name, tensors in quantized.items():
            assert torch.equal(work.get_submodule(name).weight, dequantize(tensors, cfg.bits)), name
        assert all(lin["rel_output_error"] > 0 for lin in record["linears"].values())
        errors[alpha] = float((_runner(config).forward(work, hidden) - fp_out).norm() / fp_out.norm())
    assert errors[1.0] < 0.8 * errors[0.0], errors


def _kl_on(ids, fp, folder):
    with torch.no_grad():
        a = fp(ids).logits.log_softmax(-1)
        b = dequantized_reference(folder)(ids).logits.log_softmax(-1)
    return float((a.exp() * (a - b)).sum(-1).mean())


def test_propagate_is_recorded_verified_and_fits_the_unquantized_model(tiny_llama, tiny_calib, tmp_path):  # noqa: F811
    """On the calibration samples (what the targets are fitted to) the variant's KL to the source is
    well below plain GPTQ's; the folder verifies against the source; the option is recorded."""
    from transformers import AutoModelForCausalLM

    from solar_quant.verify import verify_variant

    base = dict(bits=3, group_size=32, act_order=True)
    plain = _build(tiny_llama, tmp_path / "p", tiny_calib, **base)
    moved = _build(tiny_llama, tmp_path / "m", tiny_calib, propagate=1.0, **base)
    record = json.loads((moved / "solar_quant.json").read_text())
    assert record["options"]["propagate"] == 1.0
    assert verify_variant(moved, tiny_llama, samples=2, log=lambda m: None) == []
    fp = AutoModelForCausalLM.from_pretrained(str(tiny_llama), dtype=torch.float32).eval()
    kl_plain, kl_moved = (_kl_on(tiny_calib.input_ids, fp, f) for f in (plain, moved))
    assert kl_moved < 0.5 * kl_plain, (kl_plain, kl_moved)


def test_propagate_resumes_byte_identical(tiny_llama, tmp_path):
    """--propagate with --equalize stopped after layer 0 and resumed writes the folder of an
    uninterrupted run (the resume point holds both streams); resuming it without --propagate is
    refused in one line."""
    flags = ("--bits", "3", "--group-size", "32", "--act-order", "--clip", "gptq-loss", "--equalize")
    args, calib = assert_resume_is_byte_identical(tiny_llama, tmp_path, *flags, "--propagate", "0.5")
    stopped = cli(*args, tmp_path / "r", env={**QUIET, "SOLAR_QUANT_STOP_AFTER_LAYER": "0:term"})
    assert stopped.returncode != 0
    other = cli("quantize", tiny_llama, "--method", "gptq", *flags, "--calibration", calib, "--checkpoint-every", "0",
                tmp_path / "r", "--resume", env=QUIET)
    assert_clean_failure(other, "--resume")
    assert (tmp_path / ".r.partial" / ".job" / "job.json").is_file()


@pytest.mark.parametrize("flags,needles", [
    (("--method", "rtn", "--propagate", "1"), ("--propagate 1", "--method gptq")),
    (("--method", "awq", "--propagate", "0.5"), ("--propagate 0.5", "--method gptq")),
    (("--method", "gptq", "--propagate", "1.5"), ("propagate",)),
    (("--method", "gptq", "--propagate", "-0.1"), ("propagate",)),
])
def test_propagate_where_it_cannot_run_fails_cleanly(tiny_llama, tmp_path, flags, needles):
    assert_quantize_refused(tiny_llama, tmp_path, flags, needles)


def test_the_estimates_count_the_second_stream():
    """`run --dry-run`'s memory and time for --propagate: the unquantized activations beside the
    quantized ones (a 70B at 128 x 2048: both copies once more, 2 x 8.6 GB) and a second forward."""
    from solar_quant.architecture import LlamaShape
    from solar_quant.memory import FP32, calibration_activation_bytes, quantize_host_bytes
    from solar_quant.models.synthetic import SOLAR_70B_CONFIG
    from solar_quant.options import GptqOptions
    from solar_quant.pipeline.dry_run import gptq_compute_s

    shape = LlamaShape.from_config(SOLAR_70B_CONFIG)
    plain, moved = (quantize_host_bytes(shape, "gptq", 128, 2048, GptqOptions(propagate=a)) for a in (0.0, 1.0))
    assert moved - plain >= calibration_activation_bytes(128, 2048, shape.hidden, FP32)
    assert quantize_host_bytes(shape, "gptq", 128, 2048) == plain
    for device in ("cpu", "cuda"):
        assert gptq_compute_s(shape, 128, 2048, device, propagate=True) > 1.5 * gptq_compute_s(shape, 128, 2048, device)
