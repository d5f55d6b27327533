"""The one memory model: what each stage holds, as arithmetic on a `LlamaShape` (no tensor is
read, no device touched). Every consumer takes its numbers from here:

- `plan` (serving on GPUs): `kv_cache_bytes`, `prefill_activation_bytes`, `scoring_bytes`,
  `dequant_workspace_bytes`, `CUDA_CONTEXT_BYTES`;
- `eval` (one forward at a context, checked before loading): `loaded_weight_bytes`,
  `forward_activation_bytes`;
- `run --dry-run` (the streaming quantizers' host memory): `quantize_host_bytes`;
- the GPTQ layer placement (calibration activations on the GPU or the host):
  `layer_working_bytes`, `activations_fit`.

The terms they share (the KV cache, a layer's linear parameters, the largest Linear) are
written once, so the consumers agree on them (tests/test_memory_model.py).
"""

from __future__ import annotations

from solar_quant.architecture import ATTN_LINEARS, SEQUENTIAL_GROUPS, LlamaShape

GIB = 1024**3
CUDA_CONTEXT_BYTES = 1 * GIB  # driver + cuBLAS outside PyTorch's allocator (685 MiB measured on an H200) + slack
SCORING_BYTES_PER_LOGIT = 10.52  # measured: fp16 logits + fp32 upcast + log-softmax during a loss
SERVING_VALUE_BYTES = 2  # fp16 activations and KV cache when serving
LOGIT_CHUNK = 512  # eval: positions per lm_head chunk, so logits never exist for a whole long window
FP32 = 4


# -- shared terms ---------------------------------------------------------------------------
def linear_params(shape: LlamaShape) -> int:
    """Parameters of one decoder layer's seven linears."""
    return sum(n * k for n, k in shape.linear_shapes().values())


def largest_linear_params(shape: LlamaShape) -> int:
    return max(n * k for n, k in shape.linear_shapes().values())


def kv_cache_bytes(shape: LlamaShape, tokens: int, batch: int = 1, value_bytes: int = SERVING_VALUE_BYTES) -> int:
    """Keys and values for every layer: 2 x layers x kv_heads x head_dim x tokens x batch x value_bytes."""
    return shape.kv_cache_bytes(tokens, batch, value_bytes)


# -- serving (plan) --------------------------------------------------------------------------
def prefill_activation_bytes(shape: LlamaShape, context: int, batch: int) -> int:
    """One decoder layer's prefill activations with SDPA: tokens x (3 x intermediate + 4 x hidden) x 2 B."""
    return context * batch * (3 * shape.intermediate + 4 * shape.hidden) * SERVING_VALUE_BYTES


def scoring_bytes(shape: LlamaShape, context: int, batch: int) -> int:
    """lm_head scoring every position: tokens x vocab x 10.52 B (fp16 logits, fp32 upcast, log-softmax)."""
    return int(context * batch * shape.vocab * SCORING_BYTES_PER_LOGIT)


def dequant_workspace_bytes(shape: LlamaShape, quantized: bool) -> int:
    """Quantized variants: one fp16 copy of the largest Linear (kernels that dequantize for prefill)."""
    return largest_linear_params(shape) * 2 if quantized else 0


# -- one forward (eval) -----------------------------------------------------------------------
def loaded_weight_bytes(file_bytes: int, quantized: bool, value_bits: int) -> int:
    """16-bit folders grow to the compute dtype in memory; quantized folders stay about their file size."""
    if not quantized:
        return file_bytes * value_bits // 16
    return int(file_bytes * 1.2)


def forward_activation_bytes(shape: LlamaShape, context: int, value_bytes: int, attention: str = "sdpa") -> int:
    """Peak activations for one sequence: hidden states, MLP, the KV cache, one lm_head chunk and
    the attention scores (a full context x context matrix per head with eager attention)."""
    live = context * (6 * shape.hidden + 3 * shape.intermediate) * value_bytes
    scores = shape.heads * context * context * 4 * 2 if attention == "eager" else shape.heads * context * 1024 * 4
    logits = LOGIT_CHUNK * shape.vocab * 4 * 3
    return live + kv_cache_bytes(shape, context, 1, value_bytes) + scores + logits


# -- streaming quantizers (run --dry-run) -------------------------------------------------------
def largest_tensor_bytes(shape: LlamaShape) -> int:
    """fp16 bytes of the largest tensor a streaming quantizer reads: the embedding or the largest Linear."""
    return max(shape.vocab * shape.hidden, largest_linear_params(shape)) * 2


def quantize_host_bytes(shape: LlamaShape, method: str, nsamples: int, seqlen: int, options=None) -> int:
    """Peak host memory of the streaming quantizer (excluding the Python/torch baseline), as the
    method's registry entry models it from the terms here: bnb holds a few copies of the largest
    tensor; RTN one layer in fp32; GPTQ adds both fp32 copies of the calibration activations and
    two Hessians of the widest input (`options`, where the entry takes them, refine it: GPTQ's
    --propagate doubles the activations)."""
    from solar_quant import registry

    return registry.call_estimate(registry.method(method).host_memory, shape, nsamples, seqlen, options=options)


# -- GPTQ layer placement -------------------------------------------------------------------------
def layer_working_bytes(shape: LlamaShape, value_bytes: int) -> int:
    """A bound on one layer's GPU memory while it is quantized: its weights and the next layer's
    (read meanwhile) at `value_bytes`, the
    largest stacked solve (weight, its updated copy and dequantized values, fp32, plus
    transients) and the largest Hessian with its damped copy and inverse factor (fp32)."""
    linears = shape.linear_shapes()

    def full(name: str) -> str:
        return f"{'self_attn' if name in ATTN_LINEARS else 'mlp'}.{name}"

    stacked = max(sum(linears[full(n)][0] for n in g) * linears[full(g[0])][1] for g in SEQUENTIAL_GROUPS)
    largest_k = max(k for _, k in linears.values())
    return 2 * linear_params(shape) * value_bytes + 4 * FP32 * stacked + 3 * FP32 * largest_k**2


def calibration_activation_bytes(nsamples: int, seqlen: int, hidden: int, value_bytes: int) -> int:
    """Both copies of the calibration activations (a layer's inputs and outputs)."""
    return 2 * nsamples * seqlen * hidden * value_bytes


def activations_fit(activation_bytes: int, working_bytes: int, free_bytes: int, headroom: float = 0.9) -> bool:
    """Whether the calibration activations (both copies) can stay on the GPU next to one layer's
    working set, within `headroom` of its free memory."""
    return activation_bytes + working_bytes <= headroom * free_bytes
