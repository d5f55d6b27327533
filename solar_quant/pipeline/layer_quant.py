"""Quantize one decoder layer in one pass: the layer's forward in four stages, one per linear
group; each stage's inputs folded into the group's Hessian, one GPTQ (or RTN) solve per group,
the dequantized weights written back before the next stage reads them (so later groups see the
quantized earlier ones), each linear packed to GPTQ v1 where it was computed, and the quantized
layer's output (the next layer's input) from the last stage.

Imports only torch, the layer code (`pipeline.layers`, `models/llama_layer.py`) and the pure modules
(`methods/`, `formats/gptq_v1`, `architecture`): no pydantic, no options. It takes a plain
frozen `LayerQuantConfig`, so `bench/gpu_layer_70b.py` runs this very code on a GPU machine
that has nothing else installed.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from solar_quant.architecture import ATTN_LINEARS, SEQUENTIAL_GROUPS, layer_prefix
from solar_quant.errors import NumericsError
from solar_quant.formats.gptq_v1 import pack
from solar_quant.methods.gptq import (accumulate_hessian, gptq_quantize, gptq_quantize_shared, split_rows,
                                     stacked_rows)
from solar_quant.methods.gptq_fused import column_loop_for, compiled_columns
from solar_quant.methods.grid import QuantSpec
from solar_quant.methods.propagate import accumulate_cross, propagated_target
from solar_quant.methods.quantized import assemble
from solar_quant.methods.refine import damped, refine_codes
from solar_quant.methods.rtn import rtn_quantize
from solar_quant.pipeline.layers import StagedForward, capture_inputs

__all__ = ["LayerQuantConfig", "quantize_layer", "stage_hessian", "stage_statistics", "collect_hessians", "linear_modules", "linear_record", "full_name"]


@dataclass(frozen=True)
class LayerQuantConfig:
    """What the per-layer quantizer needs, translated once from the method's options."""

    method: str = "gptq"  # "gptq" (needs Hessians) or "rtn"
    bits: int = 4
    group_size: int = 128  # -1: one group per output row
    sym: bool = True
    mse: float = 0.0
    clip: str = ""  # "hessian" / "hessian-diag": clipping searched under each group's Hessian block
    act_order: bool = False
    static_groups: bool = False
    damp: float = 0.01
    block_size: int = 128
    true_sequential: bool = True
    refine: int = 0  # sweeps of coordinate descent on GPTQ's codes (methods/refine.py); 0: off
    propagate: float = 0.0  # α of the target from the unquantized model's inputs (methods/propagate.py); 0: off
    column_loop: str = "auto"  # GPTQ's column loop: "eager", "compiled" or "auto" (methods/gptq_fused.py)

    @property
    def spec(self) -> QuantSpec:
        return QuantSpec(self.bits, self.group_size, self.sym, self.mse, self.clip)

    @property
    def needs_calibration(self) -> bool:
        return self.method == "gptq"


def _no_clock(phase: str):
    return contextlib.nullcontext()


def full_name(name: str) -> str:
    """'q_proj' -> 'self_attn.q_proj'."""
    return f"{'self_attn' if name in ATTN_LINEARS else 'mlp'}.{name}"


def linear_modules(layer) -> dict[str, torch.nn.Module]:
    """'self_attn.q_proj' -> module, for the seven projections."""
    return {full_name(n): layer.get_submodule(full_name(n)) for group in SEQUENTIAL_GROUPS for n in group}


def quantize_layer(i: int, layer, runner, hidden, cfg: LayerQuantConfig, bar, log,
                   clock: Callable[[str], contextlib.AbstractContextManager] = _no_clock,
                   accumulate: Callable = accumulate_hessian, out: torch.Tensor | None = None,
                   world=None, equalizer=None, reference=None) -> tuple[dict, dict]:
    """Quantize the seven linears of `layer` in place (weights become their dequantized values)
    and, with calibration, write the quantized layer's outputs for `hidden` into `out` (the next
    layer's inputs; allocated like `hidden` when not given).

    One pass over the layer (`layers.StagedForward`): each true-sequential group's inputs are
    computed once, from the already-quantized groups before it, folded into its Hessian
    (`stage_hessian`) and the group is quantized before the next stage reads them. Linears that
    read the same inputs (q/k/v; gate/up) share one Hessian and are solved in one pass
    (`gptq_quantize_shared`). `cfg.true_sequential` False: every Hessian from the unquantized
    layer (one feed), then one forward of the quantized layer.

    Returns ({linear: its packed GPTQ v1 tensors on the CPU}, the layer's record for
    solar_quant.json). `runner` None: no calibration (RTN), nothing is run. `clock(phase)` wraps
    each phase ("hessian": the stage's forward and its Hessian, "solve", "record", "write_back",
    "pack", "to_host", "forward": the quantized layer's output) for timing; `accumulate` folds
    inputs into a Hessian (the benchmark compares an fp32 one).

    `world` (a `pipeline.distributed.World`; None: one process): `hidden` holds this rank's
    samples only; each Hessian is summed over every rank's (`World.reduce_hessian`) and each
    solve is split by rows across the ranks and gathered, so every rank ends with the same
    quantized layer and its own samples' outputs in `out`.

    `equalizer` (a `pipeline.equalize.StageEqualizer`; true-sequential GPTQ only): before each
    group is solved, its equalization pair is searched on the stage's inputs and folded, and the
    group is solved on the Hessian of the folded inputs (clock phase "equalize").

    `reference` (`cfg.propagate` > 0; true-sequential GPTQ only): (the unquantized layer, its
    inputs in the unquantized model, a buffer for its outputs). Its stages run beside the
    quantized ones over the same samples; each group's cross product C of the unquantized and the
    quantized inputs gives the group's target (`methods/propagate.py`), on which it is solved, and
    the unquantized layer's outputs (the next layer's reference inputs) are written into the
    buffer."""
    quantized, record = {}, {"layer": i, "linears": {}}
    # with equalization every rank packs: a later fold rescales the packed rows of v_proj / up_proj
    solve = functools.partial(_solve_group, i, layer, cfg, bar, log, clock, quantized, record, world=world,
                              pack_all=equalizer is not None)
    reduce = world.reduce_hessian if world is not None else None
    reduce_sum = world.reduce_sum if world is not None else None
    if runner is None:
        for group in SEQUENTIAL_GROUPS:
            solve(group, None)
        return quantized, record
    out = torch.empty_like(hidden) if out is None else out
    if not cfg.true_sequential:
        with clock("hessian"):
            hessians = collect_hessians(layer, runner, hidden, [full_name(g[0]) for g in SEQUENTIAL_GROUPS], accumulate,
                                        reduce=reduce)
        for group in SEQUENTIAL_GROUPS:
            solve(group, hessians.pop(full_name(group[0])))
        with clock("forward"):
            runner.forward(layer, hidden, out=out)
        return quantized, record
    if equalizer is not None and not cfg.true_sequential:
        raise ValueError("equalization in the staged pass needs true-sequential groups")
    if (reference is None) != (cfg.propagate == 0):
        raise ValueError("propagate needs the unquantized layer and its inputs (reference), and only then")
    stages = StagedForward(runner, layer, hidden, out)
    ref_stages = StagedForward(runner, *reference) if reference is not None else None
    ref_inputs = ref_stages.group_inputs() if ref_stages is not None else (None,) * len(SEQUENTIAL_GROUPS)
    for k, (group, inputs, ref) in enumerate(zip(SEQUENTIAL_GROUPS, stages.group_inputs(), ref_inputs)):
        with clock("hessian"):
            paired = runner.batched(reference[1], ref()) if ref is not None else None
            H, mean_abs, C = stage_statistics(runner.batched(hidden, inputs()), accumulate, reduce=reduce,
                                              mean_abs=equalizer is not None, reduce_sum=reduce_sum, paired=paired)
        if equalizer is not None:
            with clock("equalize"):
                H = equalizer.fold(k, H, mean_abs, quantized, record["linears"], stages, cross=C)
        solve(group, H, C, equalizer=equalizer)
        del H, C
    with clock("forward"):
        stages.finish()
        if ref_stages is not None:
            ref_stages.finish()
    return quantized, record


def stage_hessian(inputs: Iterable[torch.Tensor], accumulate: Callable = accumulate_hessian,
                  reduce: Callable | None = None) -> torch.Tensor | None:
    """The Hessian 2/n Σ x xᵀ of one stage's inputs (chunks [..., features]), in chunk order;
    `reduce(H, count)` (-> (H, total)) sums it with the other ranks' when there are any."""
    return stage_statistics(inputs, accumulate, reduce)[0]


def stage_statistics(inputs: Iterable[torch.Tensor], accumulate: Callable = accumulate_hessian,
                     reduce: Callable | None = None, mean_abs: bool = False, reduce_sum: Callable | None = None,
                     paired: Iterable[torch.Tensor] | None = None):
    """(`stage_hessian`'s Hessian; with `mean_abs` the inputs' mean |x| per feature in float32,
    else None; with `paired` (the unquantized model's inputs, chunk for chunk) the cross product
    C = 2/n Σ x̃ xᵀ (`propagate.accumulate_cross`), else None), from one pass over the inputs.
    With several ranks, `reduce` sums the Hessian (and C) and `reduce_sum(t)` the per-feature
    sums of |x| over every rank's tokens (the same mean everywhere)."""
    H, count, sums, C = None, 0, None, None
    references = iter(paired) if paired is not None else None
    for X in inputs:
        X = X.reshape(-1, X.shape[-1])
        if references is not None:  # C holds the same tokens as H
            C, _ = accumulate_cross(C, count, X, next(references))
        H, count = accumulate(H, count, X)
        if mean_abs:
            a = X.abs().sum(dim=0, dtype=torch.float32)
            sums = a if sums is None else sums.add_(a)
    if reduce is not None and H is not None:
        H, total = reduce(H, count)
        if C is not None:
            C = reduce(C, count)[0]
        if sums is not None and reduce_sum is not None:
            sums, count = reduce_sum(sums), total
    means = sums / max(1, count) if sums is not None else None
    return H, means, C


def _solve_group(i: int, layer, cfg: LayerQuantConfig, bar, log, clock, quantized: dict, record: dict,
                 group: tuple[str, ...], H, C=None, world=None, pack_all: bool = False, equalizer=None) -> None:
    """Quantize one group's linears on Hessian `H` (None: RTN), write the dequantized weights
    back, pack each linear where it was computed and fill `quantized` and `record` (`quantized`:
    on the rank that writes the layer, or on every rank with `pack_all`). `C` (with
    `cfg.propagate`): the group's cross product with the unquantized inputs; the linears are
    solved towards their propagated targets (`methods/propagate.py`), and each record's output
    error is measured against the target, its weight error against the source weights."""
    names = [full_name(n) for n in group]
    weights = [layer.get_submodule(name).weight for name in names]
    label = ", ".join(layer_prefix(i) + n for n in names)
    targets = None
    if C is not None:
        with clock("propagate"):
            targets = _targets(label, weights, H, C, cfg)
        if equalizer is not None:  # a later fold remakes the records of v_proj / up_proj
            equalizer.keep_targets(dict(zip(names, targets)))
    with clock("solve"):
        qs = _quantize_group(label, targets or weights, H, cfg.spec, cfg, log, world,
                             sources=weights if targets is not None else None)
    for k, (name, weight, q) in enumerate(zip(names, weights, qs)):
        with clock("record"):
            rows = q.stats.get("row_record")  # split by rows across ranks: the sums of each rank's rows
            target = targets[k] if targets is not None else None
            record["linears"][name] = (linear_record(weight, q, H, target=target) if rows is None
                                       else record_from_rows(q, rows))
        with clock("write_back"), torch.no_grad():
            weight.copy_(q.dequant)
        if world is None or world.is_main or pack_all:  # the rank that writes the layer packs it
            # packed where it was computed: on a GPU, 1/8 of the int32 codes crosses to the host
            with clock("pack"):
                on_device = pack(q, cfg.bits)
            with clock("to_host"):
                quantized[name] = {k: t.cpu() for k, t in on_device.items()}
            del on_device
        bar.step(_linear_detail(layer_prefix(i) + name, record["linears"][name]))


def _quantize_layer_reference(i: int, layer, runner, hidden, cfg: LayerQuantConfig, bar, log,
                              accumulate: Callable = accumulate_hessian, out: torch.Tensor | None = None):
    """The former multi-pass layer quantizer, kept as the reference the staged pass is tested
    against: per true-sequential group, every chunk re-runs the layer from its input up to the
    group (`LayerRunner.feed(until=...)`), then the quantized layer runs once more for `out`."""
    quantized, record = {}, {"layer": i, "linears": {}}
    passes = [[g] for g in SEQUENTIAL_GROUPS] if cfg.true_sequential else [list(SEQUENTIAL_GROUPS)]
    for groups in passes:
        hessians = {}
        if runner is not None:
            hessians = collect_hessians(layer, runner, hidden, [full_name(g[0]) for g in groups], accumulate)
        for group in groups:
            _solve_group(i, layer, cfg, bar, log, _no_clock, quantized, record, group,
                         hessians.get(full_name(group[0])))
    if runner is not None:
        out = runner.forward(layer, hidden, out=out)
    return quantized, record


def _linear_detail(name: str, rec: dict) -> str:
    """Progress detail: the output error where a Hessian measured it (GPTQ), else the weight error (RTN)."""
    if rec.get("rel_output_error") is not None:
        return f"{name} rel. output error {rec['rel_output_error']}"
    return f"{name} rel. weight error {rec['rel_weight_error']}"


def collect_hessians(layer, runner, hidden, names: list[str], accumulate: Callable = accumulate_hessian,
                     reduce: Callable | None = None) -> dict[str, torch.Tensor]:
    """Hessians 2/n Σ x xᵀ of the inputs of linears `names` (execution order) over all chunks;
    each chunk stops once the last of them has seen its input. `reduce` as in `stage_hessian`."""
    modules = {n: layer.get_submodule(n) for n in names}
    state: dict[str, tuple] = {n: (None, 0) for n in names}

    def on_input(name, X):
        state[name] = accumulate(*state[name], X)

    handles = capture_inputs(modules, on_input)
    try:
        runner.feed(layer, hidden, until=modules[names[-1]])
    finally:
        for h in handles:
            h.remove()
    if reduce is not None:
        return {n: reduce(H, count)[0] for n, (H, count) in state.items()}
    return {n: H for n, (H, _) in state.items()}


def _targets(label: str, weights: list[torch.Tensor], H, C, cfg: LayerQuantConfig) -> list[torch.Tensor]:
    """The group's propagated targets (one solve for the stacked rows: they share H and C)."""
    Ws = [w.detach().to(torch.float32) for w in weights]
    try:
        _require_inputs(H)
        T = propagated_target(torch.cat(Ws) if len(Ws) > 1 else Ws[0], H, C, alpha=cfg.propagate, damp=cfg.damp)
    except NumericsError as e:
        raise NumericsError(f"{label}: --propagate: {e}") from None
    return list(T.split([w.shape[0] for w in Ws])) if len(Ws) > 1 else [T]


def _require_inputs(H: torch.Tensor) -> None:
    if not H.any():
        raise NumericsError("its Hessian is all zeros: every calibration input to it was 0 (dead inputs); "
                            "check the source weights (e.g. a zeroed layer norm) or the calibration data")


def _quantize_group(label: str, weights: list[torch.Tensor], H, spec: QuantSpec, cfg: LayerQuantConfig, log,
                    world=None, sources: list[torch.Tensor] | None = None) -> list:
    """Solve `weights` on `H`; `sources` (with --propagate, where `weights` are the targets): the
    source weights the split-by-rows records measure the weight error against."""
    Ws = [w.detach().to(torch.float32) for w in weights]
    try:
        with one_cpu_thread(Ws[0].device):
            if H is not None:
                _require_inputs(H)
            if world is not None and world.distributed and H is not None:
                return _quantize_rows(Ws, H, spec, cfg, label, log, world,
                                      sources=[w.detach().to(torch.float32) for w in sources] if sources else None)
            return _quantize_weights(Ws, H, spec, cfg, label, log)
    except NumericsError as e:
        raise NumericsError(f"{label}: {e}") from None


@contextlib.contextmanager
def one_cpu_thread(device: torch.device):
    """GPTQ's column loop is thousands of small ops: on CPU, thread hand-offs cost more than they
    give, and on busy shared cores they stall it (measured on 2 loaded cores, SmolLM2's
    1536x576 up_proj: 0.75 s with 1 thread, 18.8 s with 2). The layer forwards keep all threads."""
    if device.type != "cpu":
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _quantize_weights(Ws, H, spec: QuantSpec, cfg: LayerQuantConfig, label: str, log) -> list:
    if H is None:
        return [rtn_quantize(W, spec) for W in Ws]
    kwargs = dict(blocksize=cfg.block_size, percdamp=cfg.damp, actorder=cfg.act_order, static_groups=cfg.static_groups,
                  log=lambda m: log(f"{label}: {m}"), fused=_column_loop(Ws[0].device, cfg))
    if not cfg.refine:
        return gptq_quantize_shared(Ws, H, spec, **kwargs)
    W = torch.cat(Ws) if len(Ws) > 1 else Ws[0]
    q = _refined(W, H, gptq_quantize(W, H, spec, **kwargs), cfg)
    return split_rows(q, [w.shape[0] for w in Ws]) if len(Ws) > 1 else [q]


def _refined(W: torch.Tensor, H: torch.Tensor, q, cfg: LayerQuantConfig):
    """`q` after `cfg.refine` coordinate-descent sweeps under the damped Hessian GPTQ solved on
    (rows are independent: a share of the rows refines alone); `q` itself when refine is 0."""
    if not cfg.refine:
        return q
    return refine_codes(W, damped(H, q.damp_used), q, cfg.bits, sweeps=cfg.refine)


def _column_loop(device: torch.device, cfg: LayerQuantConfig):
    """The compiled column loop where `cfg.column_loop` picks it for `device`, else None (eager)."""
    return compiled_columns() if column_loop_for(device, cfg.column_loop) == "compiled" else None


def _quantize_rows(Ws, H, spec: QuantSpec, cfg: LayerQuantConfig, label: str, log, world, sources=None) -> list:
    """This rank's share of the stacked rows solved on the shared `H`, then every rank's share
    gathered (codes as uint8, the per-group scales and zeros, the row losses), so every rank
    holds the whole group's result; its dequantized values are rebuilt from the gathered codes
    exactly as `assemble` builds them from one process's."""
    sizes = [W.shape[0] for W in Ws]
    n = sum(sizes)
    W = stacked_rows(Ws, world.rows(n))
    q = gptq_quantize(W, H, spec, blocksize=cfg.block_size, percdamp=cfg.damp,
                      actorder=cfg.act_order, static_groups=cfg.static_groups,
                      log=(lambda m: log(f"{label}: {m}")) if world.is_main else None, fused=_column_loop(W.device, cfg))
    q = _refined(W, H, q, cfg)
    source = stacked_rows(sources, world.rows(n)) if sources is not None else None
    row_record = world.gather_rows(_row_sums(W if source is None else source, q.dequant, H, target=W), n)
    del W, source
    codes = world.gather_rows(q.intweight.to(torch.uint8), n).to(torch.int32)
    scales = world.gather_rows(q.scales.t().contiguous(), n).t()
    zeros = world.gather_rows(q.zeros.t().contiguous(), n).t()
    stats = {k: v for k, v in q.stats.items() if k not in ("row_losses", "loss")}
    stats["row_losses"] = world.gather_rows(q.stats["row_losses"], n)
    stats["loss"] = float(stats["row_losses"].sum())
    fused = assemble(codes, scales, zeros, q.g_idx, damp_used=q.damp_used, stats=stats)
    parts, start = split_rows(fused, sizes), 0
    for part, size in zip(parts, sizes):
        part.stats["row_record"] = row_record[start:start + size]
        start += size
    return parts


def _row_sums(W: torch.Tensor, Q: torch.Tensor, H: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
    """Per row: ‖w‖², ‖w−q‖², (t−q) H (t−q)ᵀ, t H tᵀ — what `linear_record` sums, [rows, 4]; t is
    the row's target (`target`, with --propagate) or w itself."""
    T = W if target is None else target
    dW, dT = W - Q, T - Q
    return torch.stack([(W * W).sum(1), (dW * dW).sum(1), ((dT @ H) * dT).sum(1), ((T @ H) * T).sum(1)], dim=1)


def record_from_rows(q, rows: torch.Tensor) -> dict:
    """`linear_record` from per-row sums (`_row_sums`), added up in row order in float64."""
    w2, d2, dh, wh = (float(x) for x in rows.to(torch.float64).sum(0))
    out = {"rel_weight_error": _sig((d2 / max(w2, 1e-60)) ** 0.5),
           "rel_output_error": _sig((max(dh, 0.0) / max(wh, 1e-60)) ** 0.5), "damp": float(q.damp_used)}
    for key in ("loss", "dead_columns", "cholesky_retries"):
        if key in q.stats:
            out[key] = _sig(q.stats[key]) if isinstance(q.stats[key], float) else q.stats[key]
    return out


def linear_record(weight: torch.Tensor, q, H, target: torch.Tensor | None = None) -> dict:
    """Relative weight error ‖W−Q‖/‖W‖ and, given the Hessian, relative output error
    sqrt(tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)) = ‖(W−Q)X‖/‖WX‖ over the calibration inputs; with `target`
    (--propagate) the output error is the target's, ‖(T−Q)X‖/‖TX‖ (what the solve minimised)."""
    W = weight.detach().to(torch.float32)
    dW = W - q.dequant.to(W.device)
    out = {"rel_weight_error": _sig(dW.norm() / W.norm().clamp_min(1e-30)), "rel_output_error": None}
    if H is not None:
        T = W if target is None else target.to(device=W.device, dtype=torch.float32)
        dT = T - q.dequant.to(W.device)
        out["rel_output_error"] = _sig(torch.sqrt(((dT @ H) * dT).sum() / ((T @ H) * T).sum().clamp_min(1e-30)))
    out["damp"] = float(q.damp_used)
    for key in ("loss", "dead_columns", "cholesky_retries"):
        if key in q.stats:
            out[key] = _sig(q.stats[key]) if isinstance(q.stats[key], float) else q.stats[key]
    return out


def _sig(x) -> float:
    return float(f"{float(x):.6g}")
