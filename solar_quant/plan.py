"""Memory and GPU-fit arithmetic: exact weight bytes per variant, KV cache, runtime overhead
(the per-GPU terms from `solar_quant.memory`),
and a contiguous layer split over GPUs that transformers/accelerate take as a `device_map`.

Pure functions of a `LlamaShape`; nothing here reads tensor data or touches a GPU.

Runtime overhead, per GPU used (measured with `bench/plan_overhead_gpu.py`, bench/README.md):
- CUDA context: `CUDA_CONTEXT_BYTES` (driver + cuBLAS outside PyTorch's allocator, 685 MiB
  measured on an H200 with torch 2.11; 1 GiB leaves room for allocator slack);
- prefill activations of one decoder layer at a time with SDPA attention:
  `tokens x (3 x intermediate + 4 x hidden) x 2` bytes, tokens = context x batch;
- on the GPU holding lm_head, when scoring every position (eval, `logits="all"`):
  `tokens x vocab x 10.52` bytes (fp16 logits, their fp32 upcast and log-softmax), which
  replaces the activations term if larger (the two peaks do not overlap);
- quantized variants: one fp16 copy of the largest Linear (kernels that dequantize the
  weight for prefill matmuls; an estimate, not measured here).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from solar_quant import memory
from solar_quant.architecture import LlamaShape
from solar_quant.errors import OptionError
from solar_quant.formats.sizes import Variant, default_variants, linear_tensor_specs, spec_bytes
from solar_quant.gpus import Gpu

__all__ = ["Variant", "default_variants", "linear_tensor_specs", "weight_bytes", "layer_weight_bytes", "tensor_specs",
           "kv_cache_bytes", "activation_bytes", "scoring_bytes", "plan", "PlanRow", "GpuSlot", "layer_split",
           "device_map", "format_plan", "split_summary", "CUDA_CONTEXT_BYTES"]

GIB = 1024**3
GB = 10**9
CUDA_CONTEXT_BYTES = memory.CUDA_CONTEXT_BYTES
SCORING_BYTES_PER_LOGIT = memory.SCORING_BYTES_PER_LOGIT
ACTIVATION_BYTES = memory.SERVING_VALUE_BYTES  # fp16 activations
MAX_EXTRA_GPUS = 64  # how far `gpus_needed` looks when the given GPUs are too few


def tensor_specs(shape: LlamaShape, variant: Variant, dtype: str = "float16") -> dict[str, tuple[str, tuple[int, ...]]]:
    """Every tensor the variant's checkpoint holds -> (dtype, shape): the exact file contents."""
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    linears = shape.linear_shapes()
    for name, dims in shape.tensor_shapes().items():
        module = name.removesuffix(".weight")
        local = module.split(".", 3)[-1] if name.startswith("model.layers.") else ""
        if local in linears:
            for suffix, spec in linear_tensor_specs(variant, *dims, dtype=dtype).items():
                out[f"{module}.{suffix}"] = spec
        else:
            out[name] = ("F16", dims)
    return out


def weight_bytes(shape: LlamaShape, variant: Variant, dtype: str = "float16") -> int:
    """Exact tensor bytes of the variant's checkpoint (safetensors headers excluded)."""
    return _head_bytes(shape) + shape.layers * layer_weight_bytes(shape, variant, dtype) + _tail_bytes(shape)


def layer_weight_bytes(shape: LlamaShape, variant: Variant, dtype: str = "float16") -> int:
    linears = sum(spec_bytes(s) for dims in shape.linear_shapes().values()
                  for s in linear_tensor_specs(variant, *dims, dtype=dtype).values())
    return linears + 2 * shape.hidden * 2  # two RMSNorm weights


def _head_bytes(shape: LlamaShape) -> int:
    return shape.vocab * shape.hidden * 2  # embed_tokens


def _tail_bytes(shape: LlamaShape) -> int:
    return shape.hidden * 2 + (0 if shape.tie_word_embeddings else shape.vocab * shape.hidden * 2)


def kv_cache_bytes(shape: LlamaShape, context: int, batch: int = 1) -> int:
    """fp16 keys and values for every layer: 2 x layers x kv_heads x head_dim x tokens x 2 bytes."""
    return memory.kv_cache_bytes(shape, context, batch)


def activation_bytes(shape: LlamaShape, context: int, batch: int) -> int:
    return memory.prefill_activation_bytes(shape, context, batch)


def scoring_bytes(shape: LlamaShape, context: int, batch: int) -> int:
    return memory.scoring_bytes(shape, context, batch)


def dequant_workspace_bytes(shape: LlamaShape, variant: Variant) -> int:
    return memory.dequant_workspace_bytes(shape, variant.quantized)


@dataclass(frozen=True)
class GpuSlot:
    """What one GPU holds in a plan."""

    index: int
    capacity: int
    layers: tuple[int, int] | None  # [start, end) decoder layers, None if it holds none
    embed: bool
    head: bool  # final norm + lm_head
    weight_bytes: int
    kv_bytes: int
    overhead_bytes: int

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.kv_bytes + self.overhead_bytes

    @property
    def free_bytes(self) -> int:
        return self.capacity - self.total_bytes


@dataclass(frozen=True)
class PlanRow:
    variant: Variant
    weight_bytes: int
    kv_bytes: int
    overhead_bytes: int  # summed over the GPUs used (or the first GPU's share when it does not fit)
    fits: bool
    gpus: tuple[GpuSlot, ...] = ()  # empty when it does not fit
    gpus_needed: int | None = None  # of the last given GPU's size, when it does not fit
    device_map: dict[str, int] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return self.weight_bytes + self.kv_bytes + self.overhead_bytes

    def to_dict(self) -> dict:
        return {"variant": self.variant.name, "weight_bytes": self.weight_bytes, "kv_bytes": self.kv_bytes,
                "overhead_bytes": self.overhead_bytes, "total_bytes": self.total_bytes, "fits": self.fits,
                "gpus_used": len(self.gpus) or None, "gpus_needed": self.gpus_needed,
                "gpus": [{**asdict(g), "layers": list(g.layers) if g.layers else None, "total_bytes": g.total_bytes}
                         for g in self.gpus],
                "device_map": self.device_map}


def plan(shape: LlamaShape, gpus: list[Gpu], context: int = 10240, batch: int = 1,
         variants: list[Variant] | None = None, logits: str = "all") -> list[PlanRow]:
    """One row per variant: bytes, fit on the fewest of `gpus` (in order) and the layer split."""
    if context <= 0:
        raise OptionError(f"--context {context}: must be a positive number of tokens")
    if batch <= 0:
        raise OptionError(f"--batch {batch}: must be a positive number of sequences")
    if not gpus:
        raise OptionError("--gpus: give at least one GPU, e.g. 1x80GB")
    if logits not in ("all", "last"):
        raise OptionError(f"--logits {logits!r}: expected all (score every position) or last (generation)")
    return [_plan_variant(shape, list(gpus), context, batch, v, logits) for v in (variants or default_variants())]


def _plan_variant(shape: LlamaShape, gpus: list[Gpu], context: int, batch: int, variant: Variant,
                  logits: str) -> PlanRow:
    """Use the fewest GPUs (in the order given) that hold the variant."""
    weights = weight_bytes(shape, variant)
    kv = kv_cache_bytes(shape, context, batch)
    for n in range(1, len(gpus) + 1):
        slots = layer_split(shape, variant, [g.capacity for g in gpus[:n]], context, batch, logits)
        if slots is not None:
            return PlanRow(variant, weights, kv, sum(s.overhead_bytes for s in slots), True, tuple(slots),
                           device_map=device_map(shape, slots))
    needed = None
    for n in range(len(gpus) + 1, len(gpus) + MAX_EXTRA_GPUS + 1):
        caps = [g.capacity for g in gpus] + [gpus[-1].capacity] * (n - len(gpus))
        if layer_split(shape, variant, caps, context, batch, logits) is not None:
            needed = n
            break
    overhead = _fixed_overhead(shape, variant, context, batch, True, logits)
    return PlanRow(variant, weights, kv, overhead, False, gpus_needed=needed)


def _fixed_overhead(shape: LlamaShape, variant: Variant, context: int, batch: int, scores: bool, logits: str) -> int:
    """Per-GPU overhead; `scores`: this GPU runs lm_head."""
    peak = activation_bytes(shape, context, batch)
    if scores and logits == "all":
        peak = max(peak, scoring_bytes(shape, context, batch))
    return CUDA_CONTEXT_BYTES + peak + dequant_workspace_bytes(shape, variant)


def layer_split(shape: LlamaShape, variant: Variant, capacities: list[int], context: int, batch: int,
                logits: str = "all") -> list[GpuSlot] | None:
    """Split decoder layers contiguously over all of `capacities` (embed on the first GPU,
    norm and lm_head on the last), minimizing the fullest GPU's load / capacity.
    None when some GPU would overflow."""
    n, layers = len(capacities), shape.layers
    layer_w = layer_weight_bytes(shape, variant)
    layer_kv = kv_cache_bytes(shape, context, batch) // layers  # exact: linear in layers
    scorer = 0 if shape.tie_word_embeddings else n - 1  # a tied lm_head stays with the embedding it shares
    overhead = [_fixed_overhead(shape, variant, context, batch, g == scorer, logits) for g in range(n)]
    ends = [(_head_bytes(shape) if g == 0 else 0) + (_tail_bytes(shape) if g == n - 1 else 0) for g in range(n)]
    fixed = [o + e for o, e in zip(overhead, ends)]
    if not _room(fixed, layer_w + layer_kv, layers, capacities):
        return None
    bounds = _balanced_ranges(fixed, layer_w + layer_kv, layers, capacities)
    return [GpuSlot(g, capacities[g], (a, b) if b > a else None, g == 0, g == n - 1,
                    ends[g] + (b - a) * layer_w, (b - a) * layer_kv, overhead[g])
            for g, (a, b) in enumerate(bounds)]


def _room(fixed: list[int], per_layer: int, layers: int, caps: list[int]) -> bool:
    """Whether the GPUs can hold every layer at all (each layer costs the same)."""
    if any(f > c for f, c in zip(fixed, caps)):
        return False
    return sum((c - f) // per_layer for f, c in zip(fixed, caps)) >= layers


def _balanced_ranges(fixed: list[int], per_layer: int, layers: int, caps: list[int]) -> list[tuple[int, int]] | None:
    """Contiguous [start, end) layer ranges, one per GPU, minimizing max(load / capacity)
    by dynamic programming; None when even the best split overflows a GPU."""
    n, inf = len(caps), float("inf")
    # best[g][i]: the lowest max ratio placing layers [0, i) on GPUs 0..g; cut[g][i]: where g's range starts.
    best = [[inf] * (layers + 1) for _ in range(n)]
    cut = [[0] * (layers + 1) for _ in range(n)]
    for i in range(layers + 1):
        best[0][i] = (fixed[0] + i * per_layer) / caps[0]
    for g in range(1, n):
        for i in range(layers + 1):
            for j in range(i + 1):
                ratio = max(best[g - 1][j], (fixed[g] + (i - j) * per_layer) / caps[g])
                if ratio < best[g][i]:
                    best[g][i], cut[g][i] = ratio, j
    if best[n - 1][layers] > 1.0:
        return None
    bounds, end = [], layers
    for g in range(n - 1, 0, -1):
        bounds.append((cut[g][end], end))
        end = cut[g][end]
    bounds.append((0, end))
    return bounds[::-1]


def device_map(shape: LlamaShape, slots: list[GpuSlot]) -> dict[str, int]:
    """Module name -> GPU index, in model order, for `from_pretrained(device_map=...)`."""
    first, last = slots[0].index, slots[-1].index
    out: dict[str, int] = {"model.embed_tokens": first, "model.rotary_emb": first}
    for slot in slots:
        if slot.layers:
            for i in range(*slot.layers):
                out[f"model.layers.{i}"] = slot.index
    out["model.norm"] = last
    out["lm_head"] = first if shape.tie_word_embeddings else last
    return out


# -- presentation ----------------------------------------------------------------------------

def split_summary(row: PlanRow) -> str:
    """'0: embed, L0-39 | 1: L40-79, head'."""
    if not row.fits:
        return f"needs {row.gpus_needed} GPUs of that size" if row.gpus_needed else "does not fit"
    parts = []
    for g in row.gpus:
        items = (["embed"] if g.embed else []) + ([f"L{g.layers[0]}-{g.layers[1] - 1}"] if g.layers else [])
        items += ["head"] if g.head else []
        parts.append(f"{g.index}: {', '.join(items)}")
    return " | ".join(parts)


def format_plan(rows: list[PlanRow], title: str, gpus_text: str, context: int, batch: int, logits: str) -> str:
    gib = lambda b: f"{b / GIB:.2f}"  # noqa: E731
    head = (f"{'variant':<16} {'weights GiB':>11} {'(GB)':>8} {'KV GiB':>7} {'overhead':>8} {'total GiB':>9} "
            f"{'fits':>4} {'GPUs':>4}  split")
    lines = [title, f"GPUs {gpus_text}; context {context} x batch {batch}; logits: {logits}", "", head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r.variant.name:<16} {gib(r.weight_bytes):>11} {r.weight_bytes / GB:>8.2f} {gib(r.kv_bytes):>7} "
                     f"{gib(r.overhead_bytes):>8} {gib(r.total_bytes):>9} {'yes' if r.fits else 'no':>4} "
                     f"{len(r.gpus) if r.fits else '-':>4}  {split_summary(r)}")
    lines += ["", "Per-GPU split (GiB): layers, weights + KV + overhead = total of capacity"]
    for r in rows:
        if not r.fits:
            continue
        lines.append(f"{r.variant.name}:")
        for g in r.gpus:
            layers = f"layers {g.layers[0]}-{g.layers[1] - 1} ({g.layers[1] - g.layers[0]})" if g.layers else "no layers"
            extra = ", ".join((["embed_tokens"] if g.embed else []) + (["norm, lm_head"] if g.head else []))
            lines.append(f"  GPU {g.index}: {layers:<20} {extra:<27} {gib(g.weight_bytes)} + {gib(g.kv_bytes)} + "
                         f"{gib(g.overhead_bytes)} = {gib(g.total_bytes)} of {gib(g.capacity)}")
    lines += ["", "weights: exact tensor bytes of each format's safetensors (headers excluded); embeddings, norms and "
              "lm_head stay fp16; act-order GPTQ has the same bytes.",
              "KV: fp16 keys+values, 2 x layers x kv_heads x head_dim x context x batch x 2 B.",
              "overhead per GPU used: 1 GiB CUDA context + prefill activations context x batch x (3 x intermediate "
              "+ 4 x hidden) x 2 B (on the lm_head GPU with logits=all: max of that and context x batch x vocab x "
              "10.52 B) + for quantized variants one fp16 copy of the largest Linear."]
    return "\n".join(lines)
