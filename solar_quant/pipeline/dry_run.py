"""`run --dry-run`: validate a recipe and print what it would do, with memory and time estimates.

Estimates are arithmetic on the shapes (no tensor is read): host memory for the streaming
quantizers and a wall-time range from throughput figures measured in `bench/` (named below).
"""

from __future__ import annotations

from pathlib import Path

from solar_quant.architecture import LlamaShape
from solar_quant.errors import InputError
from solar_quant.memory import quantize_host_bytes
from solar_quant.recipe import Recipe, load_recipe

# GPTQ time = the layer forwards over the calibration tokens (the Hessian passes and the pass that
# feeds the next layer) + the solves. Forwards, in token x (layer parameters + 2 x seqlen x hidden,
# the attention term) per second, all layers; the solves in seconds per quantized parameter. Measured:
# CPU: SmolLM2-135M layer 0, 32 x 512 tokens, 4-bit g128 act-order + clipping, CPU time of each
#   stage (bench/README.md) gave forwards 1.28e10 and solves 7.9e-7 (clip) / 2.9e-7 s per parameter;
#   a whole `make demo` GPTQ step on a quiet 2-core machine (32 x 256, 4-bit g64 act-order, mse 2.4,
#   bench/README.md "make demo") took 78 s at 2cade1a (one pass per layer, no page-fault storm after
#   the bnb step; bench/results/demo_time_2cade1a.txt) where those rates predicted 157 s, so both
#   are scaled by 157/78: the point estimate matches the whole-run measurement, not one layer's stages.
CPU_TOKEN_PARAM_PER_S = 2.58e10
CPU_SOLVE_S_PER_PARAM = {"clip": 3.93e-7, "plain": 1.44e-7}
GPU_TOKEN_PARAM_PER_S = 7.9e12
# --equalize on GPTQ adds its exponent search alone (the statistics come from the staged pass):
# per pair and exponent, a round-to-nearest of the pair's linears and ΔW H ΔWᵀ, 2·rows·K² FLOP.
# CPU: 0.67 s per SmolLM2 layer on 2 cores for its 115.5 GFLOP (bench/README.md, the race after
# the staged equalization). GPU: not measured; float32 products at an assumed 40 TFLOP/s.
CPU_EQUALIZE_FLOP_PER_S = 1.7e11
GPU_EQUALIZE_FLOP_PER_S = 4.0e13
# --refine SWEEPS (methods/refine.py): per linear group, one [rows, K] x [K, K] product to start and one
# per sweep, plus a column loop of ~8 small ops per column. CPU: 7e9 FLOP/s for the whole of it:
# `--refine 2` added 73-78 s to a SmolLM2 run whose products count 520 GFLOP (64 x 512 tokens,
# 3- and 4-bit, the 2-core EPYC; bench/README.md "Coordinate descent on the codes"; the solve runs
# on one thread). GPU: not measured; the column loop is assumed launch-bound at 80 µs per column and
# sweep (8 launches of ~10 µs), the products at 40 TFLOP/s.
CPU_REFINE_FLOP_PER_S = 7.0e9
GPU_REFINE_S_PER_COLUMN = 8.0e-5
# --propagate ALPHA (methods/propagate.py): the unquantized copy of each layer runs its stages beside
# the quantized one and each group's cross product costs what its Hessian does, so the forward term
# counts twice; the targets' solves (a Cholesky of K x K and two [rows, K] x [K, K] products per
# group) run at the equalization search's rate.
PROPAGATE_FORWARDS = 2.0
DISK_BYTES_PER_S = 1.0e9  # reading 16-bit shards and writing outputs (assumed)


def _shape(recipe: Recipe, model: str | None) -> tuple[LlamaShape, str]:
    from solar_quant.recipe import resolve_model

    path = resolve_model(recipe, model)
    if path is not None and Path(path).exists():
        from solar_quant.checkpoint.reader import CheckpointReader

        reader = CheckpointReader(path)
        reader.require_llama()
        _ = reader.tensors  # validates every header
        return LlamaShape.from_config(reader.config, str(Path(path) / "config.json")), str(path)
    if recipe.model.preset == "solar-0-70b":
        from solar_quant.models.synthetic import SOLAR_70B_CONFIG

        return LlamaShape.from_config(SOLAR_70B_CONFIG), "preset solar-0-70b (checkpoint not at hand)"
    raise InputError(f"model path {path} not found and the recipe names no preset; pass --model PATH")


def io_seconds(source_bytes: int) -> float:
    """Reading the 16-bit shards and writing the outputs."""
    return 2 * source_bytes / DISK_BYTES_PER_S


def host_memory_bytes(shape: LlamaShape, method: str, nsamples: int, seqlen: int, options=None) -> int:
    """Peak host memory of the streaming quantizer (excluding the Python/torch baseline): the method's own estimate."""
    return quantize_host_bytes(shape, method, nsamples, seqlen, options)


def time_range_s(shape: LlamaShape, method: str, nsamples: int, seqlen: int, device: str, source_bytes: int,
                 options=None) -> tuple[float, float]:
    """The method's own wall-time range (its entry's `time_range`; `options` refine it where they matter)."""
    from solar_quant import registry

    return registry.call_estimate(registry.method(method).time_range, shape, nsamples, seqlen, device, source_bytes,
                                  options=options)


def gptq_compute_s(shape: LlamaShape, nsamples: int, seqlen: int, device: str, clip: bool = False,
                   equalize: bool = False, refine: int = 0, propagate: bool = False) -> float:
    """Point estimate of GPTQ's compute on an idle machine of the kind measured (see the constants)."""
    from solar_quant.memory import linear_params

    layer_params = linear_params(shape)
    token_params = nsamples * seqlen * shape.layers * (layer_params + 2 * seqlen * shape.hidden)
    token_params *= PROPAGATE_FORWARDS if propagate else 1.0
    search = (equalize_search_flop(shape) if equalize else 0.0) + (propagate_flop(shape) if propagate else 0.0)
    descent = refine_flop(shape, refine)
    if device.startswith("cuda"):
        columns = shape.layers * sum(k for _, k in _group_shapes(shape))
        return (token_params / GPU_TOKEN_PARAM_PER_S + search / GPU_EQUALIZE_FLOP_PER_S
                + descent / GPU_EQUALIZE_FLOP_PER_S + refine * columns * GPU_REFINE_S_PER_COLUMN)
    solve = shape.layers * layer_params * CPU_SOLVE_S_PER_PARAM["clip" if clip else "plain"]
    return (token_params / CPU_TOKEN_PARAM_PER_S + solve + search / CPU_EQUALIZE_FLOP_PER_S
            + descent / CPU_REFINE_FLOP_PER_S)


def _group_shapes(shape: LlamaShape) -> tuple[tuple[int, int], ...]:
    """(rows, K) of each true-sequential group's stacked weights: q/k/v, o, gate/up, down."""
    kv = shape.kv_heads * shape.head_dim
    return ((shape.heads * shape.head_dim + 2 * kv, shape.hidden), (shape.hidden, shape.heads * shape.head_dim),
            (2 * shape.intermediate, shape.hidden), (shape.hidden, shape.intermediate))


def refine_flop(shape: LlamaShape, sweeps: int) -> float:
    """--refine's products over all layers: 2 · rows · K² per group to start and per sweep."""
    if not sweeps:
        return 0.0
    return float(shape.layers * (sweeps + 1) * sum(2 * rows * k * k for rows, k in _group_shapes(shape)))


def propagate_flop(shape: LlamaShape) -> float:
    """--propagate's target solves over all layers: per group K³/3 + 4 · rows · K²."""
    return float(shape.layers * sum(k ** 3 / 3 + 4 * rows * k * k for rows, k in _group_shapes(shape)))


def equalize_search_flop(shape: LlamaShape) -> float:
    """The exponent search's products over all layers: per exponent and pair, 2 · rows · K²."""
    from solar_quant.methods.awq import ALPHA_GRID

    return float(shape.layers * ALPHA_GRID * sum(2 * rows * k * k for rows, k in _group_shapes(shape)))


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f}" if seconds >= 90 else f"{seconds / 60:.1f}"


def gptq_time_line(shape: LlamaShape, nsamples: int, seqlen: int, device: str, options=None) -> str:
    """The line `quantize --method gptq` and `run` print before GPTQ starts."""
    lo, hi = time_range_s(shape, "gptq", nsamples, seqlen, device, shape.parameter_count() * 2, options)
    return (f"gptq: {nsamples} x {seqlen} calibration tokens, {shape.layers} layers: expected ~{_minutes(lo)}-"
            f"{_minutes(hi)} min on {device} (estimate for an idle machine; slower on shared cores; time grows "
            f"with --nsamples x --seqlen)")


def log_gptq_estimate(src, calib, device: str, options, log=None) -> None:
    """Print the expected GPTQ time before a run starts (the dry run's estimate, same arithmetic).
    Silent when the source's config cannot be read: the quantizer itself then reports that."""
    from solar_quant.checkpoint.reader import CheckpointReader
    from solar_quant.errors import SolarQuantError
    from solar_quant.progress import log as default_log

    try:
        shape = LlamaShape.from_config(CheckpointReader(src).config)
    except SolarQuantError:
        return
    nsamples, seqlen = (int(n) for n in calib.input_ids.shape)
    (log or default_log)(gptq_time_line(shape, nsamples, seqlen, device, options))


def dry_run_text(recipe_path: str, model: str | None = None, out: str | None = None) -> str:
    from solar_quant import registry
    from solar_quant.pipeline.cards import fit_rows
    from solar_quant.plan import weight_bytes

    recipe = load_recipe(recipe_path)
    shape, where = _shape(recipe, model)
    source_bytes = shape.parameter_count() * 2
    root = Path(out or Path("out") / recipe.name)
    lines = [f"recipe {recipe_path}: valid ({len(recipe.variants)} variant(s))", f"model: {where}",
             f"  {shape.layers} layers, hidden {shape.hidden}, {shape.heads}/{shape.kv_heads} heads, "
             f"{shape.parameter_count() / 1e9:.2f} B parameters, {source_bytes / 1e9:.1f} GB at 16 bits",
             f"run folder: {root}"]
    c = recipe.calibration
    if recipe.needs_calibration():
        lines.append(f"calibration: template {c.template}, {c.nsamples} x {c.seqlen} tokens, seed {c.seed}, "
                     f"sources {[s.path for s in c.sources] or 'bundled default'}")
    for v in recipe.variants:
        q = v.quantize
        variant = registry.method(q.method).variant(q)
        wb = weight_bytes(shape, variant)
        mem = host_memory_bytes(shape, q.method, c.nsamples, c.seqlen, q)
        lo, hi = time_range_s(shape, q.method, c.nsamples, c.seqlen, recipe.device, source_bytes, q)
        lines.append(f"- {v.name}: {variant.name}, rope {v.rope_scaling}, shards <= {v.shard_size}")
        lines.append(f"    output weights {wb / 1e9:.2f} GB ({wb:,} bytes); host memory while quantizing ~{mem / 1e9:.1f} GB; "
                     f"time on {recipe.device} ~{_minutes(lo)}-{_minutes(hi)} min")
        fits = [r for r in fit_rows(shape, variant) if r["fits"] != "no"]
        for context in sorted({r["context"] for r in fits}):
            first = next(r for r in fits if r["context"] == context)
            lines.append(f"    fits {first['gpus']} at context {context} ({first['total_gib']:.1f} GiB with KV cache and overhead)")
    if recipe.eval:
        e = recipe.eval
        lines.append(f"evaluation: seqlen {e.seqlen}, stride {e.stride or e.seqlen}, max tokens {e.max_tokens}, "
                     f"contexts {list(e.contexts)}, rope {e.rope_scaling or 'from config'}, gates ppl-ratio<={e.max_ppl_ratio} "
                     f"kld<={e.max_kld} top1>={e.min_top1}")
        if e.tasks:
            lines.append(f"    tasks {', '.join(e.tasks)} (lm-eval, limit {e.limit or 'none'}); again under rope "
                         f"{', '.join(e.also_rope_scaling) or '-'}")
    return "\n".join(lines)
