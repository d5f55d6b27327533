"""The per-layer equalization step (`--equalize`, methods/awq.py): run before `quantize_layer`,
it measures the inputs of the four folded pairs over the calibration activations (one forward
with hooks), searches each pair's exponent, and folds the scales into the layer's norm and
linear weights in place. The layer then computes the same function (up to float32 rounding)
and its linears are easier to quantize.

The scales go to the variant folder as `equalization/layer-NNN.safetensors` (float32, one tensor
per pair), written as each layer is done, so a resumed job keeps them and `verify --source`
recomputes the folded 16-bit tensors from the source and them.
"""

from __future__ import annotations

import hashlib

import torch

from solar_quant.architecture import layer_prefix
from solar_quant.errors import NumericsError
from solar_quant.formats.equalization import (SCALES_DIR, folded_source_tensor, load_scales,  # noqa: F401
                                           save_scales, scales_path)
from solar_quant.methods.awq import PAIRS, check_scales, fold_scales, search_scales
from solar_quant.methods.gptq import accumulate_hessian
from solar_quant.pipeline.layers import capture_inputs

__all__ = ["equalize_layer", "collect_statistics", "fold_layer", "scales_path", "save_scales", "load_scales",
           "folded_source_tensor", "check_norms", "equalization_card", "SCALES_DIR"]



def collect_statistics(layer, runner, hidden, names: list[str]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{linear: (Gram matrix 2/n Σ x xᵀ, mean |x| per channel)} of the inputs of `names`, one forward."""
    modules = {n: layer.get_submodule(n) for n in names}
    grams: dict[str, tuple] = {n: (None, 0) for n in names}
    sums: dict[str, torch.Tensor] = {}

    def on_input(name, X):
        grams[name] = accumulate_hessian(*grams[name], X)
        a = X.abs().to(torch.float32).sum(dim=0)
        sums[name] = a if name not in sums else sums[name].add_(a)

    handles = capture_inputs(modules, on_input)
    try:
        runner.feed(layer, hidden, until=None)
    finally:
        for h in handles:
            h.remove()
    return {n: (grams[n][0], sums[n] / max(1, grams[n][1])) for n in names}


def gqa_shape(layer) -> tuple[int, int]:
    """(query heads per KV head, head_dim) of the layer's attention."""
    attn = layer.self_attn
    return attn.num_key_value_groups, attn.head_dim


def fold_layer(layer, pair, s: torch.Tensor) -> None:
    """Fold scales `s` of `pair` into the layer's weights in place (prev / s, linears' columns × s)."""
    kv_groups, head_dim = gqa_shape(layer) if pair.gqa else (1, 0)
    prev = layer.get_submodule(pair.prev).weight
    linears = [layer.get_submodule(n).weight for n in pair.linears]
    new_prev, new_linears = fold_scales(prev, linears, s.to(prev.device), kv_groups=kv_groups, head_dim=head_dim)
    with torch.no_grad():
        prev.copy_(new_prev)
        for w, new in zip(linears, new_linears):
            w.copy_(new)


def equalize_layer(layer, runner, hidden, cfg, log, i: int = 0) -> tuple[dict, dict[str, torch.Tensor]]:
    """Search and fold the four pairs of decoder layer `i` in place (`cfg`: a LayerQuantConfig,
    whose grid the search quantizes onto). Returns (the layer's equalization record: per pair α,
    output error at α and at α = 0, the scales' sha256; {pair: scales, float32 on the CPU})."""
    stats = collect_statistics(layer, runner, hidden, [p.stats_of for p in PAIRS])
    record, scales = {}, {}
    for pair in PAIRS:
        H, mean_abs = stats[pair.stats_of]
        where = f"{layer_prefix(i)}{pair.prev} -> {', '.join(pair.linears)}"
        if H is None:
            raise NumericsError(f"{where}: no calibration inputs reached it")
        kv_groups, head_dim = gqa_shape(layer) if pair.gqa else (1, 0)
        Ws = [layer.get_submodule(n).weight.detach() for n in pair.linears]
        choice = search_scales(Ws, H, mean_abs, cfg.spec, kv_groups=kv_groups, head_dim=head_dim)
        check_scales(choice.scales, where)
        fold_layer(layer, pair, choice.scales)
        s = choice.scales.detach().to("cpu", torch.float32).contiguous()
        scales[pair.name] = s
        record[pair.name] = {"alpha": round(choice.alpha, 6), "error": _sig(choice.error),
                             "error_plain": _sig(choice.error_plain), "scales_sha256": _sha(s)}
        del H
    _check_folded(layer, i)
    return record, scales


def _check_folded(layer, i: int) -> None:
    """The folded weights must stay finite and within float16's range (they are stored in 16 bits)."""
    limit = torch.finfo(torch.float16).max
    for name, p in layer.named_parameters():
        bad = ~torch.isfinite(p) | (p.abs() > limit)
        if bad.any():
            raise NumericsError(f"{layer_prefix(i)}{name}: equalization made {int(bad.sum())} values non-finite or "
                                "beyond float16's range; rerun without --equalize")


def equalization_card() -> dict:
    """What solar_quant.json says about the scales (per layer α and hashes sit in each layer's record)."""
    from solar_quant.methods.awq import ALPHA_GRID

    return {"method": "activation-aware equalization (AWQ scales, s = mean|x|**alpha)",
            "pairs": {p.name: {"prev": p.prev, "linears": list(p.linears), "gqa": p.gqa} for p in PAIRS},
            "alpha_grid": ALPHA_GRID, "search": "round-to-nearest on the target grid, linear output error",
            "scales": f"{SCALES_DIR}/layer-NNN.safetensors (float32, one tensor per pair)",
            "fold": "prev / s (norm weight, or rows), linears' columns * s (v->o: repeated over query heads)"}


def check_norms(reader, shape) -> None:
    """Every layer must have its two norm weights, each its own [hidden] vector (the folds divide them)."""
    from solar_quant.errors import InputError

    for i in range(shape.layers):
        for norm in ("input_layernorm", "post_attention_layernorm"):
            name = f"{layer_prefix(i)}{norm}.weight"
            if name not in reader.tensors:
                raise InputError(f"{reader.path}: tensor '{name}' is missing; --equalize folds scales into it: "
                                 "pass a complete Llama checkpoint or drop --equalize")
            if tuple(reader.info(name).shape) != (shape.hidden,):
                raise InputError(f"{reader.path}: tensor '{name}' has shape {list(reader.info(name).shape)}, not "
                                 f"[{shape.hidden}]; --equalize cannot fold into it: drop --equalize")


def _sha(t: torch.Tensor) -> str:
    return hashlib.sha256(t.numpy().tobytes()).hexdigest()


def _sig(x) -> float:
    return float(f"{float(x):.6g}")
