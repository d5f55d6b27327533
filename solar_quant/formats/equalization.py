"""The equalization side file of a variant folder: `equalization/layer-NNN.safetensors` holds
layer NNN's per-channel scales (float32, one tensor per folded pair, methods/awq.py `PAIRS`), and
`folded_source_tensor` recomputes a folded 16-bit tensor from the source and them (used by the
pipeline's step, pipeline/equalize.py, and by `verify --source`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from solar_quant.errors import NumericsError
from solar_quant.methods.awq import PAIRS, fold_scales

SCALES_DIR = "equalization"


def scales_path(folder: Path, i: int) -> Path:
    return Path(folder) / SCALES_DIR / f"layer-{i:03d}.safetensors"


def save_scales(folder: Path, i: int, scales: dict[str, torch.Tensor]) -> None:
    """Write layer i's scales atomically (temporary name, then rename)."""
    from safetensors.torch import save_file

    path = scales_path(folder, i)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in scales.items()}, str(tmp))
    tmp.replace(path)


def load_scales(folder: Path, i: int) -> dict[str, torch.Tensor] | None:
    from safetensors.torch import load_file

    path = scales_path(folder, i)
    return load_file(str(path)) if path.is_file() else None


def folded_source_tensor(name: str, local: str, tensor: torch.Tensor, scales: dict[str, torch.Tensor],
                         kv_groups: int, head_dim: int) -> torch.Tensor:
    """What equalization turns the source tensor `local` (e.g. 'self_attn.v_proj.weight') of a layer
    into, float32: the same arithmetic as `fold_layer`, applied in the same order (PAIRS')."""
    module = local.rsplit(".", 1)[0]
    t = tensor.to(torch.float32)
    for pair in PAIRS:
        if pair.name not in scales:
            raise NumericsError(f"{name}: the equalization scales of pair {pair.name} are missing")
        s = scales[pair.name]
        g, d = (kv_groups, head_dim) if pair.gqa else (1, 0)
        if module == pair.prev:
            t = fold_scales(t, [], s)[0]
        if module in pair.linears:
            t = fold_scales(torch.ones(1), [t], s, kv_groups=g, head_dim=d)[1][0]
    return t
