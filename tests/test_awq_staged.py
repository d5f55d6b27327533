"""Equalization inside GPTQ's staged pass (pipeline/equalize.py `StageEqualizer`): the search's
fast round-to-nearest equals `rtn_quantize`, GPTQ commutes with the row scaling that the v → o and
up → down folds apply after their prev linear is solved, the rescaled packed tensors read back as
a runtime reads them, and a layer quantized this way hands the next layer the outputs of its own
written weights, with no forward of its own for the statistics."""

from __future__ import annotations

import pytest
import torch

from solar_quant.methods.awq import rtn_values
from solar_quant.methods.gptq import accumulate_hessian, gptq_quantize
from solar_quant.methods.grid import QuantSpec
from solar_quant.methods.rtn import rtn_quantize
from tests.test_awq_math import _gqa_layer, _runner


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("group", [16, 64, -1, 48, 40, 128])
def test_search_rtn_values_equal_rtn_quantize(bits, sym, group):
    g = torch.Generator().manual_seed(bits * 7 + group)
    W = torch.randn(40, 96, generator=g) * torch.rand(96, generator=g) * 0.1
    W[3] = 0.0  # an all-zero row
    W[5, :16] = torch.rand(16, generator=g)  # a group with no negative value
    spec = QuantSpec(bits, group, sym)
    assert torch.equal(rtn_values(W, spec), rtn_quantize(W, spec).dequant)


@pytest.mark.parametrize("clip", ["", "gptq-loss"])
def test_gptq_commutes_with_row_scaling(clip):
    """The premise of rescaling v_proj / up_proj after they are solved: GPTQ on W / s (rows) gives
    the codes of GPTQ on W, with scales / s, up to float rounding at a few ties."""
    g = torch.Generator().manual_seed(11)
    X = torch.randn(256, 64, generator=g) * (1 + 4 * torch.rand(64, generator=g))
    H, _ = accumulate_hessian(None, 0, X)
    W = torch.randn(48, 64, generator=g) * 0.05
    s = torch.exp(torch.randn(48, generator=g))
    spec = QuantSpec(3, 16, True, 0.0, clip)
    a = gptq_quantize(W, H, spec, actorder=True)
    b = gptq_quantize(W / s[:, None], H, spec, actorder=True)
    same = (a.intweight == b.intweight).float().mean().item()
    assert same >= 0.99, same
    rows = (a.intweight == b.intweight).all(dim=1)  # rows with identical codes have scales / s
    torch.testing.assert_close(b.scales[:, rows], (a.scales / s[None, :])[:, rows], rtol=2e-3, atol=0)


def test_rescaled_rows_read_back_as_a_runtime_reads_them():
    from solar_quant.formats.gptq_v1 import dequantize, pack
    from solar_quant.methods.grid import stored_scales
    from solar_quant.pipeline.equalize import rescale_rows

    g = torch.Generator().manual_seed(2)
    W = torch.randn(24, 64, generator=g) * 0.05
    q = rtn_quantize(W, QuantSpec(4, 32, True))
    tensors = pack(q, 4)
    s = torch.exp(torch.randn(24, generator=g))
    weight = torch.empty_like(W)
    rescale_rows(tensors, weight, s, 4)
    assert torch.equal(tensors["scales"].float(), stored_scales(q.scales / s[None, :]))
    assert torch.equal(weight, dequantize(tensors, 4))
    torch.testing.assert_close(weight, q.dequant / s[:, None], rtol=1e-3, atol=1e-7)


def _staged(layer, config, hidden, cfg, equalize: bool):
    from solar_quant.pipeline.equalize import StageEqualizer
    from solar_quant.pipeline.layer_quant import quantize_layer
    from solar_quant.progress import Progress

    eq = StageEqualizer(layer, cfg, 0) if equalize else None
    quantized, record = quantize_layer(0, layer, _runner(config), hidden, cfg, Progress(7, "linear"),
                                       log=lambda m: None, equalizer=eq)
    return quantized, record, eq


def test_staged_equalization_hands_on_the_written_layers_outputs(monkeypatch):
    """The next layer's inputs are the outputs of the weights that are written (after the v and up
    rows were rescaled), the folded layer computes what the written tensors compute, the first
    pair sees exactly the statistics of equalize_layer's forward, and no such forward runs."""
    from solar_quant.formats.gptq_v1 import dequantize
    from solar_quant.pipeline import equalize
    from solar_quant.pipeline.equalize import equalize_layer
    from solar_quant.pipeline.layer_quant import LayerQuantConfig

    cfg = LayerQuantConfig(bits=3, group_size=16, act_order=True, clip="gptq-loss")
    config, layer = _gqa_layer(seed=5)
    hidden = torch.randn(4, 16, 32, generator=torch.Generator().manual_seed(1))
    hidden[..., :2] *= 20
    _, reference = _gqa_layer(seed=5)
    ref_record, ref_scales = equalize_layer(reference, _runner(config), hidden, cfg, log=print)

    monkeypatch.setattr(equalize, "collect_statistics", lambda *a, **k: pytest.fail("a statistics forward ran"))
    out_buffer = torch.empty_like(hidden)
    from solar_quant.pipeline.layer_quant import quantize_layer
    from solar_quant.progress import Progress

    eq = equalize.StageEqualizer(layer, cfg, 0)
    quantized, record = quantize_layer(0, layer, _runner(config), hidden, cfg, Progress(7, "linear"),
                                       log=lambda m: None, out=out_buffer, equalizer=eq)
    eq_record, scales = eq.finish()
    assert set(eq_record) == set(ref_record) and set(scales) == set(ref_scales)
    assert eq_record["attn_in"]["alpha"] == ref_record["attn_in"]["alpha"]
    torch.testing.assert_close(scales["attn_in"], ref_scales["attn_in"], rtol=1e-5, atol=0)
    for name, tensors in quantized.items():  # the layer holds what the file holds
        assert torch.equal(layer.get_submodule(name).weight, dequantize(tensors, cfg.bits)), name
    # the staged pass kept v's attention output divided by s rather than recomputing it
    torch.testing.assert_close(_runner(config).forward(layer, hidden), out_buffer, rtol=2e-3, atol=2e-3)


def test_staged_equalization_lowers_the_layer_output_error():
    """On outlier input channels, the staged equalization's layer is closer to the unquantized
    layer than plain GPTQ's, at 3 bits."""
    from solar_quant.pipeline.layer_quant import LayerQuantConfig

    cfg = LayerQuantConfig(bits=3, group_size=16, act_order=True)
    config, fp = _gqa_layer(seed=6)
    hidden = torch.randn(8, 16, 32, generator=torch.Generator().manual_seed(3))
    hidden[..., :3] *= 30
    want = _runner(config).forward(fp, hidden)
    errors = {}
    for equalize in (False, True):
        _, layer = _gqa_layer(seed=6)
        _staged(layer, config, hidden, cfg, equalize)
        errors[equalize] = float((_runner(config).forward(layer, hidden) - want).norm())
    assert errors[True] < errors[False], errors
