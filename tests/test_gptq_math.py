"""GPTQ and RTN as pure functions: the grid, the Hessian, the error feedback, act-order, damping."""

from __future__ import annotations

import math

import pytest
import torch

from solar_quant.errors import NumericsError
from solar_quant.methods.gptq import accumulate_hessian, gptq_quantize
from solar_quant.methods.grid import QuantSpec, dequantize, group_params, quantize
from solar_quant.methods.rtn import rtn_quantize

from gptq_helpers import synthetic_inputs, synthetic_weight

N, K = 64, 200  # K is not a multiple of 32, 64 or 128: every grouped case has a partial last group


def correlated_inputs(rows: int = 2048, columns: int = K, seed: int = 0) -> torch.Tensor:
    return synthetic_inputs(rows, columns, seed)


def weight(seed: int = 1, rows: int = N, columns: int = K) -> torch.Tensor:
    return synthetic_weight(rows, columns, seed)


@pytest.fixture(scope="module")
def X() -> torch.Tensor:
    return correlated_inputs()


@pytest.fixture(scope="module")
def H(X) -> torch.Tensor:
    return accumulate_hessian(None, 0, X)[0]


def output_error(W: torch.Tensor, Q: torch.Tensor, X: torch.Tensor) -> float:
    return float(torch.linalg.norm((W - Q) @ X.t()))


def recomputed_dequant(q) -> torch.Tensor:
    g = q.g_idx.long()
    return q.scales[g].t() * (q.intweight - q.zeros[g].t()).float()


# --- Hessian -------------------------------------------------------------------------------

def test_accumulate_hessian_is_running_mean_of_2xxt():
    X = correlated_inputs(rows=300, columns=24)
    H, count = None, 0
    for chunk in (X[:7].reshape(1, 7, 24), X[7:100].half(), X[100:]):
        H, count = accumulate_hessian(H, count, chunk)
    assert count == 300
    Xh = X[7:100].half().float()  # the half-precision chunk is what was seen
    Xs = torch.cat([X[:7], Xh, X[100:]])
    torch.testing.assert_close(H, 2 * Xs.t() @ Xs / 300, rtol=1e-5, atol=1e-5)
    assert H.dtype == torch.float32


# --- GPTQ against RTN ------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group_size", [32, 128, -1])
@pytest.mark.parametrize("sym", [True, False])
def test_identity_hessian_gptq_equals_rtn(bits, group_size, sym):
    spec = QuantSpec(bits, group_size, sym)
    W = weight()
    q = gptq_quantize(W, torch.eye(K), spec)
    r = rtn_quantize(W, spec)
    for name in ("intweight", "scales", "zeros", "g_idx", "dequant"):
        assert torch.equal(getattr(q, name), getattr(r, name)), name


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
@pytest.mark.parametrize("sym", [True, False])
def test_gptq_output_error_below_rtn(X, H, bits, group_size, sym):
    spec = QuantSpec(bits, group_size, sym)
    W = weight()
    e_rtn = output_error(W, rtn_quantize(W, spec).dequant, X)
    for actorder, static in ((False, False), (True, False), (True, True)):
        e_gptq = output_error(W, gptq_quantize(W, H, spec, actorder=actorder, static_groups=static).dequant, X)
        margin = 0.9 if bits >= 3 else 1.0
        assert e_gptq <= margin * e_rtn, (actorder, static, e_gptq / e_rtn)


def test_gptq_records_loss_and_is_deterministic(H):
    spec = QuantSpec(4, 64, True)
    W = weight()
    a = gptq_quantize(W, H, spec, actorder=True)
    b = gptq_quantize(W, H, spec, actorder=True)
    assert torch.equal(a.intweight, b.intweight) and torch.equal(a.scales, b.scales)
    assert a.stats["loss"] > 0 and a.stats["cholesky_retries"] == 0 and a.stats["dead_columns"] == 0
    assert a.damp_used == 0.01


def test_block_size_only_changes_rounding(X, H):
    """Lazy batch updates are exact algebra: the block size must not change the result beyond float noise."""
    spec = QuantSpec(4, -1, True)
    W = weight()
    a = gptq_quantize(W, H, spec, blocksize=128)
    b = gptq_quantize(W, H, spec, blocksize=16)
    agree = (a.intweight == b.intweight).float().mean()
    assert agree > 0.995
    assert abs(output_error(W, a.dequant, X) / output_error(W, b.dequant, X) - 1) < 0.01


# --- groups and act-order ----------------------------------------------------------------------

@pytest.mark.parametrize("group_size", [32, 64, 128, -1])
@pytest.mark.parametrize("actorder,static", [(False, False), (True, False), (True, True), (False, True)])
def test_grouping_is_valid(H, group_size, actorder, static):
    spec = QuantSpec(4, group_size, True)
    q = gptq_quantize(weight(), H, spec, actorder=actorder, static_groups=static)
    G = K if group_size == -1 else group_size
    n_groups = math.ceil(K / G)
    assert q.scales.shape == (n_groups, N) and q.zeros.shape == (n_groups, N) and q.g_idx.shape == (K,)
    assert q.intweight.shape == (N, K) and q.intweight.dtype == torch.int32 and q.g_idx.dtype == torch.int32
    sizes = torch.bincount(q.g_idx.long(), minlength=n_groups)
    assert len(sizes) == n_groups and (sizes <= G).all() and int(sizes.sum()) == K
    assert int(sizes[-1]) == K - (n_groups - 1) * G  # the partial group is the last one
    assert torch.equal(q.dequant, recomputed_dequant(q))
    if not actorder or static or group_size == -1:
        assert torch.equal(q.g_idx, torch.arange(K, dtype=torch.int32) // G)
    else:  # groups follow descending diag(H): every column of group j outranks every column of group j+1
        d = torch.diag(H)
        for j in range(n_groups - 1):
            assert d[q.g_idx == j].min() >= d[q.g_idx == j + 1].max()


def test_act_order_quantizes_in_permuted_order(H):
    """Non-static act-order equals plain GPTQ on the permuted problem, mapped back to original columns."""
    spec = QuantSpec(3, 32, False)
    W = weight()
    perm = torch.argsort(torch.diag(H), descending=True, stable=True)
    a = gptq_quantize(W, H, spec, actorder=True)
    p = gptq_quantize(W[:, perm], H[perm][:, perm], spec)
    agree = (a.intweight[:, perm] == p.intweight).float().mean()
    assert agree > 0.995
    assert torch.equal(a.g_idx[perm], p.g_idx)


# --- the grid ------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_symmetric_zero_points(bits):
    q = rtn_quantize(weight(), QuantSpec(bits, 64, True))
    assert (q.zeros == 2 ** (bits - 1)).all()
    assert torch.equal(q.scales, q.scales.half().float())  # the file's float16 scales are the truth


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_asymmetric_grid_covers_each_group(bits):
    W = weight()
    W[0] = W[0].abs()  # an all-positive row: its grid must still start at zero >= 1
    W[1] = -W[1].abs()
    spec = QuantSpec(bits, 64, False)
    q = rtn_quantize(W, spec)
    assert (q.zeros >= 1).all() and (q.zeros <= spec.maxq).all()
    assert (q.intweight >= 0).all() and (q.intweight <= spec.maxq).all()
    scale_per_weight = q.scales[q.g_idx.long()].t()
    # min/max grid: no clipping, so every weight is within half a step (plus float16 scale rounding)
    bound = scale_per_weight * (0.5 + spec.maxq * 2.0**-11) + 1e-7
    assert ((W - q.dequant).abs() <= bound).all()


def test_asymmetric_represents_constant_offset_row():
    W = weight()
    W[3] = 0.5 + 0.01 * torch.randn(K, generator=torch.Generator().manual_seed(3))
    sym = rtn_quantize(W, QuantSpec(4, 128, True))
    asym = rtn_quantize(W, QuantSpec(4, 128, False))
    err_asym = (W[3] - asym.dequant[3]).abs().max()
    err_sym = (W[3] - sym.dequant[3]).abs().max()
    assert err_asym <= W[3].max() / 14 / 2 * 1.01  # half a step of a grid from 0 (zero point 1) to the max
    assert err_asym < 0.2 * err_sym  # the symmetric grid clips the offset


@pytest.mark.parametrize("bits,sym", [(3, True), (4, False)])
def test_clipping_search_never_loses_to_min_max(bits, sym):
    W = weight()
    W[:, 7] *= 12  # one outlier column: clipping it buys a finer grid for the other 63 of its group
    def group_err(spec):  # per (group, row): the search's own measure, sum |x - dequantized|**2.4 on its grid
        errs = []
        for i in range(0, K, 64):
            x = W[:, i:i + 64]
            scale, zero = group_params(x, spec)
            s, z = scale[:, None], zero[:, None].float()
            errs.append((dequantize(quantize(x, s, z, spec.maxq), s, z) - x).abs().pow(2.4).sum(1))
        return torch.stack(errs)
    plain, clipped = QuantSpec(bits, 64, sym), QuantSpec(bits, 64, sym, mse=2.4)
    assert (group_err(clipped) <= group_err(plain) * (1 + 1e-6)).all()
    assert group_err(clipped).sum() < group_err(plain).sum()
    stored_plain, stored_clipped = rtn_quantize(W, plain), rtn_quantize(W, clipped)
    assert torch.equal(stored_clipped.scales, stored_clipped.scales.half().float())  # the file's values
    assert (stored_clipped.scales[0] < stored_plain.scales[0]).float().mean() > 0.5  # the outlier group is clipped


def test_clipping_norm_must_not_be_negative():
    with pytest.raises(ValueError, match="mse"):
        QuantSpec(4, 128, True, mse=-1.0)


# --- degenerate Hessians ------------------------------------------------------------------------

def test_dead_columns_are_zeroed_and_counted(X):
    Xd = X.clone()
    Xd[:, [5, 77, 190]] = 0
    Hd = accumulate_hessian(None, 0, Xd)[0]
    q = gptq_quantize(weight(), Hd, QuantSpec(4, 64, True), actorder=True)
    assert q.stats["dead_columns"] == 3
    assert (q.dequant[:, [5, 77, 190]] == 0).all()
    assert torch.isfinite(q.dequant).all()


def test_singular_hessian_raises_damping_and_records_it():
    v = torch.randn(K, 1, generator=torch.Generator().manual_seed(4))
    logs: list[str] = []
    q = gptq_quantize(weight(), v @ v.t(), QuantSpec(4, 64, True), percdamp=1e-9, log=logs.append)
    retries = q.stats["cholesky_retries"]
    assert retries >= 1 and len(logs) == retries
    assert q.damp_used == pytest.approx(1e-9 * 10**retries)
    assert "Cholesky" in logs[0] and torch.isfinite(q.dequant).all()


def test_indefinite_hessian_raises():
    Hbad = torch.eye(K)
    Hbad[0, 1] = Hbad[1, 0] = 3.0  # not a sum of x x^T; damping up to the cap cannot fix it
    with pytest.raises(NumericsError, match="Cholesky"):
        gptq_quantize(weight(), Hbad, QuantSpec(4, 64, True), log=lambda _: None)


def test_all_zero_hessian_raises():
    with pytest.raises(NumericsError, match="no activations"):
        gptq_quantize(weight(), torch.zeros(K, K), QuantSpec(4, 128, True))


@pytest.mark.parametrize("bad", ["weight", "hessian"])
def test_non_finite_inputs_raise(H, bad):
    W, Hx = weight(), H.clone()
    (W if bad == "weight" else Hx)[0, 0] = float("nan")
    with pytest.raises(NumericsError, match="NaN"):
        gptq_quantize(W, Hx, QuantSpec(4, 128, True))


@pytest.mark.parametrize("actorder", [False, True])
def test_shared_hessian_solve_equals_one_solve_per_weight(actorder):
    """Stacking weights that share a Hessian (q/k/v, gate/up) gives each the result of its own solve."""
    from solar_quant.methods.gptq import gptq_quantize_shared

    torch.manual_seed(3)
    K = 96
    X = torch.randn(512, K) @ torch.randn(K, K) * 0.3
    H, _ = accumulate_hessian(None, 0, X)
    Ws = [torch.randn(n, K) for n in (40, 16, 16)]
    spec = QuantSpec(4, 32, True)
    shared = gptq_quantize_shared(Ws, H, spec, actorder=actorder)
    for W, q in zip(Ws, shared):
        alone = gptq_quantize(W, H, spec, actorder=actorder)
        assert q.intweight.shape == W.shape and q.scales.shape == (K // 32, W.shape[0])
        assert torch.equal(q.g_idx, alone.g_idx)
        same = (q.intweight == alone.intweight).float().mean().item()
        assert same > 0.999, same  # float rounding of the stacked matmuls may flip a rare tie
        torch.testing.assert_close(q.dequant, alone.dequant, rtol=0, atol=float(alone.scales.max()) * 1.01)
        assert q.stats["loss"] == pytest.approx(alone.stats["loss"], rel=1e-3)
