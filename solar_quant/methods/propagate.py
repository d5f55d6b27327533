"""Quantization error propagation: GPTQ's target from the unquantized model's inputs (GPTAQ, QEP).

GPTQ minimises ‖(W − Q) X‖² over the inputs X a linear receives in the partly quantized model;
what the model should reproduce is the unquantized model's output W X̃, X̃ being the linear's
inputs there. With H = X Xᵀ and C = X̃ Xᵀ, for every Q

    ‖Q X − W X̃‖² = ‖(Q − W*) X‖² + ‖W* X − W X̃‖²,   W* = W C H⁻¹ = W + W (C − H) H⁻¹,

because (W* X − W X̃) Xᵀ = W* H − W C = 0. So the asymmetric objective is GPTQ's own on the target
W* (the second term does not depend on Q): the solver, the grid and the file format stay. The
target is solved on the damped Hessian H + λI (a ridge towards W, λ as GPTQ damps) and taken a
fraction α of the way (QEP's α: 1 is the whole correction, less trusts the calibration set less):

    W' = W + α · W (C − H)(H + λI)⁻¹.

Pure tensor functions; `pipeline/layer_quant.py` carries the unquantized inputs through the layer.
"""

from __future__ import annotations

import torch
from torch import Tensor

from solar_quant.errors import NumericsError
from solar_quant.methods.gptq import damped_cholesky, running_mean_start

__all__ = ["accumulate_cross", "propagated_target"]

def accumulate_cross(C: Tensor | None, count: int, X: Tensor, X_ref: Tensor) -> tuple[Tensor, int]:
    """Fold paired inputs into the running cross product C = 2/n Σ x̃ xᵀ (C[a, b] = 2/n Σ x̃_a x_b),
    scaled like `gptq.accumulate_hessian`'s H so that C − H is W's correction direction. `X`
    [..., K]: the quantized model's inputs; `X_ref`: the unquantized model's, same shape; `count`:
    the tokens already in C. float32, updated in place when given."""
    X = X.reshape(-1, X.shape[-1])
    X_ref = X_ref.reshape(-1, X_ref.shape[-1])
    if X.shape != X_ref.shape:
        raise ValueError(f"paired inputs differ in shape: {tuple(X.shape)} and {tuple(X_ref.shape)}")
    C, total = running_mean_start(C, count, X)
    if total > count:
        C.addmm_(X_ref.t().to(torch.float32), X.to(torch.float32), alpha=2.0 / total)
    return C, total


def propagated_target(W: Tensor, H: Tensor, C: Tensor, *, alpha: float = 1.0, damp: float = 0.01) -> Tensor:
    """W + α · W (C − H)(H + λI)⁻¹ in float32 (a new tensor; W, H, C are not changed). λ is
    `damp` × the mean of H's diagonal, as GPTQ damps; a dead column (H's diagonal 0: no input
    reached it) keeps its weights, its diagonal set to 1 as GPTQ sets it. The damping grows on a
    failed factorization as in GPTQ's own solve (`gptq.damped_cholesky`), which raises
    NumericsError beyond its bound; NumericsError too when the target is not finite."""
    W = W.to(torch.float32)
    if alpha == 0:
        return W.clone()
    H = H.to(torch.float32)
    D = C.to(torch.float32) - H
    Hd = H.clone()
    dead = torch.diagonal(Hd) == 0
    Hd[dead, dead] = 1
    L, _, _ = damped_cholesky(Hd, damp)
    del Hd
    # ΔWᵀ = (H + λI)⁻¹ (C − H)ᵀ Wᵀ; a dead column's row of (C − H)ᵀ Wᵀ is 0, so its ΔW column is too
    delta = torch.cholesky_solve(D.t() @ W.t(), L).t()
    target = W + alpha * delta
    if not bool(torch.isfinite(target).all()):
        raise NumericsError("the propagated target has non-finite values; check the calibration data, "
                            "or quantize without --propagate")
    return target
