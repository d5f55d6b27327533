"""The Hessian-weighted clipping search against a brute-force oracle, and its place inside GPTQ."""

from __future__ import annotations

import pytest
import torch

from solar_quant.methods.clip_hessian import group_blocks, hessian_group_params, quadratic_error
from solar_quant.methods.gptq import gptq_quantize
from solar_quant.methods.grid import QuantSpec, dequantize, group_params, quantize


def _hessian(g: int, seed: int, n: int = 400) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(n, g, generator=gen) * (torch.rand(g, generator=gen) * 4 + 0.1)  # uneven channel scales
    X[:, 0] += 3 * X[:, 1]  # correlated channels: the block is not diagonal
    return 2 * X.T @ X / n


def _oracle(x: torch.Tensor, H: torch.Tensor, spec: QuantSpec, diag: bool) -> torch.Tensor:
    """Per row, the smallest e H e^T over every shrink factor, one row and one factor at a time, float64."""
    x64, H64 = x.double(), H.double()
    if diag:
        H64 = torch.diag(torch.diagonal(H64))
    best = []
    for n in range(x.shape[0]):
        row = x64[n]
        lo, hi = min(float(row.min()), 0.0), max(float(row.max()), 0.0)
        if spec.sym:
            hi = max(abs(lo), hi)
            lo = -hi if lo < 0 else lo
        losses = []
        for k in range(80):
            p = 1 - k / 100
            if spec.sym:
                scale = (p * hi - p * lo) / spec.maxq
                zero = (spec.maxq + 1) // 2
            else:
                scale = (p * hi - p * lo) / spec.maxq
                if round(-p * lo / scale) < 1:
                    scale = p * hi / (spec.maxq - 1)
                zero = min(max(round(-p * lo / scale), 1), spec.maxq)
            q = torch.clamp(torch.round(row / scale) + zero, 0, spec.maxq)
            e = scale * (q - zero) - row
            losses.append(float(e @ H64 @ e))
        best.append(min(losses))
    return torch.tensor(best, dtype=torch.float64)


def _loss(x, scale, zero, H, spec) -> torch.Tensor:
    s, z = scale[:, None], zero.float()[:, None]
    e = dequantize(quantize(x, s, z, spec.maxq), s, z) - x
    return quadratic_error(e.double(), H.double())


@pytest.mark.parametrize("clip", ["hessian", "hessian-diag"])
@pytest.mark.parametrize("bits,sym", [(4, True), (3, True), (4, False), (2, True)])
def test_search_reaches_the_oracle_minimum(clip, bits, sym):
    g = 24
    x = torch.randn(40, g, generator=torch.Generator().manual_seed(bits)) * 0.05
    x[3, 5] = 0.6  # an outlier: clipping it is a real trade-off
    H = _hessian(g, bits)
    spec = QuantSpec(bits, g, sym, clip=clip)
    scale, zero = hessian_group_params(x, H, spec)
    weight = torch.diag(torch.diagonal(H)) if clip == "hessian-diag" else H
    got = _loss(x, scale, zero, weight, spec)
    want = _oracle(x, H, spec, diag=clip == "hessian-diag")
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-12)


def test_hessian_search_beats_unweighted_search_under_the_hessian():
    """Under the quadratic it minimises, the Hessian search is never worse than the |e|**2.4 search or
    the min/max range, and strictly better somewhere on uneven channels."""
    g = 32
    x = torch.randn(96, g, generator=torch.Generator().manual_seed(7)) * 0.05
    H = _hessian(g, 3)
    spec = QuantSpec(3, g, True, clip="hessian")
    ours = _loss(x, *hessian_group_params(x, H, spec), H, spec)
    mse = _loss(x, *group_params(x, QuantSpec(3, g, True, mse=2.4)), H, spec)
    plain = _loss(x, *group_params(x, QuantSpec(3, g, True)), H, spec)
    assert (ours <= mse * (1 + 1e-6)).all() and (ours <= plain * (1 + 1e-6)).all()
    assert ours.sum() < 0.97 * mse.sum()


def test_diagonal_of_identity_is_the_squared_error_search():
    """With H = c·I the diagonal weighting is the plain sum of squared errors: `--mse 2` picks the same grid."""
    x = torch.randn(50, 16, generator=torch.Generator().manual_seed(1))
    spec = QuantSpec(4, 16, True, clip="hessian-diag")
    s1, z1 = hessian_group_params(x, 3.0 * torch.eye(16), spec)
    s2, z2 = group_params(x, QuantSpec(4, 16, True, mse=2.0))
    torch.testing.assert_close(s1, s2, rtol=0, atol=0)
    assert torch.equal(z1, z2)


def test_static_groups_inside_gptq_use_each_groups_hessian_block():
    """With static groups the grid is fitted up front to the original columns: each stored scale is the
    search's choice for that group's columns and Hessian block."""
    N, K, G = 20, 48, 16
    W = torch.randn(N, K, generator=torch.Generator().manual_seed(2)) * 0.1
    H = _hessian(K, 5, n=600)
    spec = QuantSpec(4, G, True, clip="hessian")
    q = gptq_quantize(W, H, spec, actorder=True, static_groups=True)
    blocks = group_blocks(H, G)
    for j in range(K // G):
        scale, zero = hessian_group_params(W[:, j * G:(j + 1) * G], blocks[j], spec)
        torch.testing.assert_close(q.scales[j].float(), scale.to(torch.float16).float(), rtol=0, atol=0)


def test_gptq_with_hessian_clipping_keeps_its_output_error_near_gptq():
    """The clipped GPTQ solve stays a GPTQ solve: its output error under H is below RTN's."""
    N, K, G = 32, 64, 32
    W = torch.randn(N, K, generator=torch.Generator().manual_seed(4)) * 0.1
    H = _hessian(K, 6, n=800)
    err = lambda Q: float(torch.einsum("nk,kl,nl->", W - Q, H, W - Q))  # noqa: E731
    rtn = torch.cat([_rtn(W[:, i:i + G], QuantSpec(3, G, True)) for i in range(0, K, G)], dim=1)
    clipped = gptq_quantize(W, H, QuantSpec(3, G, True, clip="hessian"), actorder=True).dequant.float()
    assert err(clipped) < 0.8 * err(rtn)


def _rtn(x, spec):
    s, z = group_params(x, spec)
    s, z = s[:, None], z.float()[:, None]
    return dequantize(quantize(x, s, z, spec.maxq), s, z)


def test_spec_refuses_two_measures_and_unknown_names():
    with pytest.raises(ValueError, match="one of them|give one"):
        QuantSpec(4, 128, True, mse=2.4, clip="hessian")
    with pytest.raises(ValueError, match="clip must be"):
        QuantSpec(4, 128, True, clip="hessain")
    with pytest.raises(ValueError, match="whole"):
        hessian_group_params(torch.randn(4, 8), torch.ones(8), QuantSpec(4, 8, True, clip="hessian"))


def test_schur_blocks_are_the_inverse_of_the_remaining_columns_inverse():
    """(U_gg^T U_gg)^-1 from GPTQ's factor equals ((H_RR^-1)_gg)^-1 computed directly, R = the group and all after it."""
    from solar_quant.methods.clip_hessian import schur_blocks
    from solar_quant.methods.gptq import _damped_inverse_cholesky

    K, G = 40, 16
    H = _hessian(K, 9, n=300).double()
    Hd = H.clone()
    Hinv, damp, _ = _damped_inverse_cholesky(Hd.float().clone(), 0.01, None)
    Hd = H + 0.01 * torch.mean(torch.diag(H)) * torch.eye(K, dtype=torch.float64)
    for j, block in enumerate(schur_blocks(Hinv, G)):
        i = j * G
        want = torch.linalg.inv(torch.linalg.inv(Hd[i:, i:])[:G, :G])
        torch.testing.assert_close(block.double(), want, rtol=2e-3, atol=1e-4 * float(want.abs().max()))


def test_gptq_loss_search_lowers_gptqs_own_loss_against_raw_blocks():
    """Within GPTQ, searching under the block GPTQ's loss sees is not worse on that loss than the raw H_gg search."""
    N, K, G = 48, 64, 16
    W = torch.randn(N, K, generator=torch.Generator().manual_seed(11)) * 0.1
    H = _hessian(K, 12, n=500)
    err = lambda Q: float(torch.einsum("nk,kl,nl->", W - Q, H, W - Q))  # noqa: E731
    raw = gptq_quantize(W, H, QuantSpec(3, G, True, clip="hessian"), actorder=True).dequant.float()
    schur = gptq_quantize(W, H, QuantSpec(3, G, True, clip="gptq-loss"), actorder=True).dequant.float()
    assert not torch.equal(raw, schur)
    assert err(schur) < 1.02 * err(raw)
