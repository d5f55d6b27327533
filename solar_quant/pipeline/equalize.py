"""The per-layer equalization step (`--equalize`, methods/awq.py): it measures the inputs of the
four folded pairs over the calibration activations, searches each pair's exponent, and folds the
scales into the layer's norm and linear weights. The layer then computes the same function (up to
float32 rounding) and its linears are easier to quantize.

Two ways to get the statistics, by solver:

- GPTQ (true-sequential), `StageEqualizer`: inside the staged pass (`layer_quant.quantize_layer`).
  Each pair's linears are one true-sequential group, and the stage that feeds that group already
  computes the group's inputs and their Gram matrix (the group's Hessian). The pair is searched
  on those, folded, and the Hessian is rescaled to the folded inputs (H / s sᵀ: the Gram matrix
  of x / s) before the group is solved. No forward runs for equalization. The statistics are
  those of the inputs the solver sees: from the already-quantized groups before it, as GPTQ's
  own Hessians are. Two pairs divide the rows of a linear that an earlier stage has already
  quantized (v_proj for v → o, up_proj for up → down): GPTQ is equivariant to row scaling (a
  row's grid and its error feedback scale with it), so dividing that linear's group scales by s
  gives the codes that quantizing the folded rows would give, without solving again; only the
  float16 rounding of the new scales differs. The attention output the staged pass keeps for o
  is divided by s too (attention is linear in v).
- RTN, or GPTQ without true-sequential: `equalize_layer`, one forward of the unquantized layer
  with hooks before the layer is quantized.

The scales go to the variant folder as `equalization/layer-NNN.safetensors` (float32, one tensor
per pair), written as each layer is done, so a resumed job keeps them and `verify --source`
recomputes the folded 16-bit tensors from the source and them.
"""

from __future__ import annotations

import hashlib
from types import SimpleNamespace

import torch

from solar_quant.architecture import layer_prefix
from solar_quant.errors import NumericsError
from solar_quant.formats.equalization import (SCALES_DIR, folded_source_tensor, load_scales,  # noqa: F401
                                           save_scales, scales_path)
from solar_quant.formats.gptq_v1 import dequantize
from solar_quant.methods.awq import PAIRS, check_scales, expand_kv_scales, fold_scales, scale_columns, search_scales
from solar_quant.methods.grid import stored_scales
from solar_quant.methods.gptq import accumulate_hessian
from solar_quant.pipeline.layer_quant import linear_record
from solar_quant.pipeline.layers import capture_inputs

__all__ = ["equalize_layer", "StageEqualizer", "collect_statistics", "fold_layer", "scales_path", "save_scales", "load_scales",
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


class StageEqualizer:
    """Equalization inside the staged pass, pair k before true-sequential group k is solved
    (`layer_quant.quantize_layer` calls `fold`); `finish` checks the layer and returns what
    `equalize_layer` returns."""

    def __init__(self, layer, cfg, i: int = 0, world=None):
        """`world` (a `pipeline.distributed.World`; None: one process): rank 0 searches each pair on
        the statistics summed over every rank and sends the scales to the others, so every rank
        folds the same scales whatever its floats would have chosen."""
        self.layer, self.cfg, self.i, self.world = layer, cfg, i, world
        self.record: dict = {}
        self.scales: dict[str, torch.Tensor] = {}
        # the linears a later pair rescales (v_proj, up_proj): their weights as solved and their
        # Hessian, on the CPU, so that their records can be made again for the rescaled rows
        self._rows_later = {p.prev for p in PAIRS if p.prev.startswith(("self_attn.", "mlp."))}
        self._kept: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._targets: dict[str, torch.Tensor] = {}  # with --propagate: those linears' targets, on the CPU

    def keep_targets(self, targets: dict[str, torch.Tensor]) -> None:
        """The propagated targets of a group about to be solved: kept for the linears a later pair
        rescales, whose records measure the output error against them."""
        for name, T in targets.items():
            if name in self._kept:
                self._targets[name] = T.detach().to("cpu", copy=True)

    def fold(self, k: int, H: torch.Tensor, mean_abs: torch.Tensor, quantized: dict, records: dict,
             stages, cross: torch.Tensor | None = None) -> torch.Tensor:
        """Search pair k on its group's inputs (Gram matrix `H`, mean |x| `mean_abs`), fold it,
        and return the Hessian of the folded inputs. `quantized` / `records`: the layer's packed
        linears so far and their records (the pair's prev, when it is a linear, is among them; its
        record is made again for its rescaled rows); `stages`: the StagedForward whose kept
        attention output the v → o fold rescales. `cross` (--propagate: the cross product of the
        unquantized and the quantized inputs) is rescaled in place like H: both inputs are divided
        by the same scales in the folded layer."""
        layer, pair = self.layer, PAIRS[k]
        where = f"{layer_prefix(self.i)}{pair.prev} -> {', '.join(pair.linears)}"
        if H is None:
            raise NumericsError(f"{where}: no calibration inputs reached it")
        kv_groups, head_dim = gqa_shape(layer) if pair.gqa else (1, 0)
        choice = self._search(layer, pair, H, mean_abs, kv_groups, head_dim)
        check_scales(choice.scales, where)
        s = choice.scales.to(H.device)
        if pair.prev in quantized:  # a linear an earlier stage quantized: divide its rows' group scales
            _fold_columns(layer, pair, s, kv_groups, head_dim)
            weight = layer.get_submodule(pair.prev).weight
            rescale_rows(quantized[pair.prev], weight, s, self.cfg.bits)
            solved, H_prev = self._kept.pop(pair.prev)
            target = self._targets.pop(pair.prev, None)
            W = solved.to(weight.device) / s[:, None]
            T = target.to(weight.device) / s[:, None] if target is not None else None
            records[pair.prev].update(_errors(linear_record(W, SimpleNamespace(dequant=weight.detach(), damp_used=0.0,
                                                                               stats={}), H_prev.to(weight.device),
                                                            target=T)))
            if pair.gqa:
                stages.rescale_attention(expand_kv_scales(s, kv_groups, head_dim))
        else:
            fold_layer(layer, pair, s)
        s_cols = expand_kv_scales(s, kv_groups, head_dim) if kv_groups > 1 else s
        cpu = choice.scales.detach().to("cpu", torch.float32).contiguous()
        self.scales[pair.name] = cpu
        self.record[pair.name] = {"alpha": round(choice.alpha, 6), "error": _sig(choice.error),
                                  "error_plain": _sig(choice.error_plain), "scales_sha256": _sha(cpu)}
        inv = s_cols.reciprocal().to(H.dtype)
        H = H.mul_(inv[:, None]).mul_(inv[None, :])
        if cross is not None:
            cross.mul_(inv[:, None]).mul_(inv[None, :])
        for name in pair.linears:
            if name in self._rows_later:  # solved next, rescaled by a later pair
                self._kept[name] = (layer.get_submodule(name).weight.detach().to("cpu", copy=True),
                                    H.to("cpu", copy=True))
        return H

    def _search(self, layer, pair, H, mean_abs, kv_groups: int, head_dim: int):
        """The pair's search (`search_scales`), on rank 0 only when there are several ranks."""
        world = self.world
        choice = None
        if world is None or world.is_main:
            Ws = [layer.get_submodule(n).weight.detach() for n in pair.linears]
            choice = search_scales(Ws, H, mean_abs, self.cfg.spec, kv_groups=kv_groups, head_dim=head_dim)
        if world is None or not world.distributed:
            return choice
        sent = None if choice is None else (choice.alpha, choice.error, choice.error_plain,
                                            choice.scales.detach().to("cpu", torch.float32).contiguous())
        alpha, error, plain, scales = world.share(sent)
        return SimpleNamespace(alpha=alpha, error=error, error_plain=plain, scales=scales.to(H.device))

    def finish(self) -> tuple[dict, dict[str, torch.Tensor]]:
        _check_folded(self.layer, self.i)
        return self.record, self.scales


def _errors(record: dict) -> dict:
    return {k: record[k] for k in ("rel_weight_error", "rel_output_error")}


def _fold_columns(layer, pair, s: torch.Tensor, kv_groups: int, head_dim: int) -> None:
    """The linears' half of a fold: their columns × s (repeated over the query heads under GQA)."""
    linears = [layer.get_submodule(n).weight for n in pair.linears]
    new_linears = scale_columns(linears, s, kv_groups=kv_groups, head_dim=head_dim)
    with torch.no_grad():
        for w, new in zip(linears, new_linears):
            w.copy_(new)


def rescale_rows(tensors: dict[str, torch.Tensor], weight: torch.Tensor, s: torch.Tensor, bits: int) -> None:
    """Divide row n of a packed GPTQ v1 linear by s[n]: its group scales become the float16 values
    of scale / s (codes and zeros unchanged), and `weight`, the layer's dequantized copy, is rebuilt
    from the packed tensors as a runtime computes it."""
    scales = stored_scales(tensors["scales"].to(torch.float32) / s.to("cpu", torch.float32)[None, :])
    tensors["scales"] = scales.to(torch.float16).contiguous()
    with torch.no_grad():
        weight.copy_(dequantize({k: t.to(weight.device) for k, t in tensors.items()}, bits))


def _check_folded(layer, i: int) -> None:
    """The folded weights must stay finite and within float16's range (they are stored in 16 bits)."""
    limit = torch.finfo(torch.float16).max
    for name, p in layer.named_parameters():
        bad = ~torch.isfinite(p) | (p.abs() > limit)
        if bad.any():
            raise NumericsError(f"{layer_prefix(i)}{name}: equalization made {int(bad.sum())} values non-finite or "
                                "beyond float16's range; rerun without --equalize")


def equalization_card(staged: bool = False) -> dict:
    """What solar_quant.json says about the scales (per layer α and hashes sit in each layer's
    record); `staged`: searched inside GPTQ's staged pass (`StageEqualizer`)."""
    from solar_quant.methods.awq import ALPHA_GRID

    statistics = ("each pair's group inputs in the staged pass (groups before it already quantized)" if staged
                  else "the unquantized layer's forward on the layer's inputs")
    return {"method": "activation-aware equalization (AWQ scales, s = mean|x|**alpha)",
            "pairs": {p.name: {"prev": p.prev, "linears": list(p.linears), "gqa": p.gqa} for p in PAIRS},
            "statistics": statistics,
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
