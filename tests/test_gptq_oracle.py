"""Our GPTQ solver against GPTQModel 7.6.0's own `GPTQ` class on the same weight and inputs.

Both follow the reference algorithm, so on identical inputs they must pick the same codes: the
only intended differences are float rounding (the order of sums in the Hessian and the block
updates) and, for groups narrower than a block, that we fit each group to the weights with all
earlier updates applied (GPTQModel's loop fits it to the block's stale copy). GPTQModel is run
with `blocksize = group size` there, where its loop sees the same updates as ours.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from solar_quant.methods.gptq import accumulate_hessian, gptq_quantize
from solar_quant.methods.grid import QuantSpec

from gptq_helpers import synthetic_inputs, synthetic_weight

N, K, T = 96, 320, 2048  # K = 2.5 groups of 128: a partial last group, as SmolLM2's 576


def _problem():
    return synthetic_weight(N, K), synthetic_inputs(T, K)


def _gptqmodel_codes(W, X, bits, group_size, act_order, sym, mse):
    from gptqmodel import QuantizeConfig
    from gptqmodel.quantization.gptq import GPTQ

    linear = nn.Linear(K, N, bias=False)
    linear.weight.data.copy_(W)
    cfg = QuantizeConfig(bits=bits, group_size=group_size, desc_act=act_order, sym=sym, damp_percent=0.01,
                         act_group_aware=False, mse=mse, format="gptq")
    task = GPTQ(linear, cfg)
    task.quantizer.configure(perchannel=True)
    task.add_batch(X.unsqueeze(0), None)
    blocksize = 128 if group_size in (-1, 128) else group_size
    Q, scale, zero, g_idx, *_ = task.quantize(blocksize=blocksize)
    g = g_idx.long()
    codes = torch.round(Q.float() / scale[:, g]) + zero[:, g]  # scale/zero [N, n_groups], fp32
    return codes.to(torch.int32), g_idx.to(torch.int32)


CASES = [  # bits, group size, act-order, sym, clipping norm
    (4, 128, False, True, 0.0),
    (4, 128, True, True, 0.0),
    (4, 128, False, False, 0.0),
    (3, 128, True, True, 2.4),
    (2, 32, False, True, 0.0),
    (8, -1, False, True, 0.0),
    (4, 64, True, False, 2.4),
]


@pytest.mark.parametrize("bits,group_size,act_order,sym,mse", CASES)
def test_codes_equal_gptqmodel(bits, group_size, act_order, sym, mse):
    W, X = _problem()
    theirs, their_g_idx = _gptqmodel_codes(W, X, bits, group_size, act_order, sym, mse)
    H, _ = accumulate_hessian(None, 0, X)
    ours = gptq_quantize(W, H, QuantSpec(bits, group_size, sym, mse), actorder=act_order)
    assert torch.equal(ours.g_idx, their_g_idx)
    agree = (ours.intweight == theirs).float().mean().item()
    assert agree >= 0.999, f"{agree:.5f} of the codes agree"
