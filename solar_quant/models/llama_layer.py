"""A Llama decoder layer in plain torch, computing what transformers' `LlamaDecoderLayer` computes.

The quantize path runs one decoder layer at a time; importing transformers' `modeling_llama`
for that costs ~166 MB of resident memory (it pulls in its model-loading, masking and
quantizer machinery). This module is the same layer without it: the same submodule names
(`self_attn.{q,k,v,o}_proj`, `mlp.{gate,up,down}_proj`, `input_layernorm`,
`post_attention_layernorm`, `self_attn.num_key_value_groups`, `self_attn.head_dim`), so hooks,
`get_submodule` and weight folds see the same tree, and the same tensor ops in the same order
(transformers 5.24: `models/llama/modeling_llama.py`, `integrations/sdpa_attention.py`,
`modeling_rope_utils.py`), so its outputs are bit-identical (tests/test_native_layer.py).

What it covers: SiLU MLPs, SDPA attention over full causal sequences without padding (what
calibration feeds), and the rope types default, linear, dynamic (NTK) and llama3. Other rope
types (`NATIVE_ROPE_TYPES`) are left to transformers' own layer (`pipeline/layers.py` picks).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from solar_quant.errors import CheckpointError

NATIVE_ROPE_TYPES = ("default", "linear", "dynamic", "llama3")
DEFAULT_THETA = 10_000.0  # transformers' `RotaryEmbeddingConfigMixin.default_theta`
SDPA_GQA_MAX_HEAD_DIM = 256  # transformers passes enable_gqa to SDPA up to this head size (`use_gqa_in_sdpa`)


# -- config ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class LlamaLayerConfig:
    """The fields of config.json that one decoder layer and its rope need, with transformers'
    defaults (`LlamaConfig`) for the ones a config may leave out."""

    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    attention_bias: bool = False
    mlp_bias: bool = False
    rope_parameters: dict = field(default_factory=dict)  # rope_type, rope_theta, factor, ...

    @property
    def rope_type(self) -> str:
        return self.rope_parameters["rope_type"]

    @property
    def native(self) -> bool:
        """Whether this module computes the layer (else transformers' own layer must)."""
        return self.rope_type in NATIVE_ROPE_TYPES and self.rope_parameters.get("partial_rotary_factor", 1.0) == 1.0


def layer_config(cfg: dict, where: str = "config.json") -> LlamaLayerConfig:
    """Parse a config.json dict; a field the layer cannot run raises one `CheckpointError` naming it."""
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise CheckpointError(f"{where}: field 'hidden_act' is {act!r}; only 'silu' (Llama's gated SiLU MLP) is "
                              "supported")
    heads = _positive(cfg, "num_attention_heads", where)
    hidden = _positive(cfg, "hidden_size", where)
    kv_heads = cfg.get("num_key_value_heads") or heads
    if not isinstance(kv_heads, int) or heads % kv_heads:
        raise CheckpointError(f"{where}: field 'num_key_value_heads' ({kv_heads!r}) must divide "
                              f"num_attention_heads ({heads})")
    mpe = cfg.get("max_position_embeddings", 2048)
    return LlamaLayerConfig(
        hidden_size=hidden, intermediate_size=_positive(cfg, "intermediate_size", where),
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=cfg.get("head_dim") or hidden // heads,
        max_position_embeddings=mpe, rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        attention_bias=bool(cfg.get("attention_bias", False)), mlp_bias=bool(cfg.get("mlp_bias", False)),
        rope_parameters=rope_parameters(cfg))


def _positive(cfg: dict, key: str, where: str) -> int:
    v = cfg.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise CheckpointError(f"{where}: field '{key}' must be a positive integer (found {v!r})")
    return v


def rope_parameters(cfg: dict) -> dict:
    """The rope settings as transformers 5 standardizes them (`convert_rope_params_to_dict` and
    `standardize_rope_params`): transformers-4 `rope_scaling` replaces `rope_parameters`; the
    top-level `rope_theta` fills in a missing theta; `type` spells `rope_type`; llama3 gains
    `original_max_position_embeddings`."""
    params = dict(cfg.get("rope_scaling") or cfg.get("rope_parameters") or {})
    params.setdefault("rope_theta", cfg.get("rope_theta", DEFAULT_THETA))
    params.setdefault("rope_type", params.get("type", "default"))
    if params["rope_type"] in ("llama3", "yarn", "longrope"):
        if "original_max_position_embeddings" in cfg:
            params["original_max_position_embeddings"] = cfg["original_max_position_embeddings"]
        else:
            params.setdefault("original_max_position_embeddings", cfg.get("max_position_embeddings", 2048))
    return params


# -- rope -----------------------------------------------------------------------------------
def inverse_frequencies(config: LlamaLayerConfig, device=None, seq_len: torch.Tensor | None = None) -> torch.Tensor:
    """The rope inverse frequencies [head_dim / 2], computed as transformers' `ROPE_INIT_FUNCTIONS`
    compute them (same dtypes, same order); `seq_len` matters only for dynamic NTK, where
    transformers passes it as a tensor (so that base is computed in float32)."""
    p, dim = config.rope_parameters, config.head_dim
    base = p["rope_theta"]
    rope_type = config.rope_type
    if rope_type == "default":
        return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
    if rope_type == "dynamic":
        base = _dynamic_base(base, p["factor"], dim, config.max_position_embeddings, seq_len)
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / dim))
    if rope_type == "linear":
        inv_freq /= p["factor"]
    elif rope_type == "llama3":
        inv_freq = _llama3(inv_freq, p)
    elif rope_type != "dynamic":
        raise ValueError(f"rope type {rope_type!r} is not computed here (NATIVE_ROPE_TYPES)")
    return inv_freq


def _dynamic_base(base, factor, dim: int, trained: int, seq_len):
    """NTK-aware base for `seq_len` positions (`_compute_dynamic_ntk_parameters`)."""
    if seq_len is None:
        seq_len = trained
    else:
        seq_len = torch.maximum(seq_len, torch.tensor(trained, dtype=seq_len.dtype, device=seq_len.device))
    return base * ((factor * seq_len / trained) - (factor - 1)) ** (dim / (dim - 2))


def _llama3(inv_freq: torch.Tensor, p: dict) -> torch.Tensor:
    """Llama 3.1's smoothed frequency scaling (`_compute_llama3_parameters`)."""
    factor, low, high = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
    old_context_len = p["original_max_position_embeddings"]
    low_freq_wavelen = old_context_len / low
    high_freq_wavelen = old_context_len / high
    wavelen = 2 * math.pi / inv_freq
    inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth_factor = (old_context_len / wavelen - low) / (high - low)
    smoothed_inv_freq = (1 - smooth_factor) * inv_freq_llama / factor + smooth_factor * inv_freq_llama
    is_medium_freq = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium_freq, smoothed_inv_freq, inv_freq_llama)


class RotaryEmbedding(nn.Module):
    """cos/sin for `position_ids`, as `LlamaRotaryEmbedding` (with `dynamic_rope_update`) gives them,
    including its state: a dynamic rope's frequencies grow with the longest sequence seen and
    return to the trained ones for a sequence shorter than `max_position_embeddings`."""

    def __init__(self, config: LlamaLayerConfig):
        super().__init__()
        self.config = config
        self.max_seq_len_cached = self.original_max_seq_len = config.max_position_embeddings
        self.attention_scaling = 1.0  # every native rope type leaves cos/sin unscaled
        inv_freq = inverse_frequencies(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.register_buffer("original_inv_freq", inv_freq.clone(), persistent=False)

    def _dynamic_update(self, position_ids: torch.Tensor, device) -> None:
        seq_len = torch.max(position_ids) + 1
        if seq_len > self.max_seq_len_cached:  # growth
            self.register_buffer("inv_freq", inverse_frequencies(self.config, device, seq_len), persistent=False)
            self.max_seq_len_cached = seq_len
        if seq_len < self.original_max_seq_len and self.max_seq_len_cached > self.original_max_seq_len:  # reset
            self.original_inv_freq = self.original_inv_freq.to(device)
            self.register_buffer("inv_freq", self.original_inv_freq, persistent=False)
            self.max_seq_len_cached = self.original_max_seq_len

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.config.rope_type == "dynamic":
            self._dynamic_update(position_ids, x.device)
        freqs = position_ids[..., None].float() * self.inv_freq.to(device=x.device, dtype=torch.float)
        emb = torch.cat((freqs, freqs), dim=-1)
        cos = emb.cos() * self.attention_scaling
        sin = emb.sin() * self.attention_scaling
        return cos.to(dtype=x.dtype), sin.to(dtype=x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin):
    cos = cos.unsqueeze(1)
    sin = sin.unsqueeze(1)
    return (q * cos) + (rotate_half(q) * sin), (k * cos) + (rotate_half(k) * sin)


# -- the layer ------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


def repeat_kv(hidden_states: torch.Tensor, n_rep: int) -> torch.Tensor:
    batch, num_key_value_heads, slen, head_dim = hidden_states.shape
    if n_rep == 1:
        return hidden_states
    hidden_states = hidden_states[:, :, None, :, :].expand(batch, num_key_value_heads, n_rep, slen, head_dim)
    return hidden_states.reshape(batch, num_key_value_heads * n_rep, slen, head_dim)


def sdpa_attention(module: "Attention", query, key, value) -> torch.Tensor:
    """Causal attention as transformers' `sdpa_attention_forward` runs it without a mask (the mask
    `create_causal_mask` gives a full, unpadded sequence is None): GQA through SDPA's enable_gqa
    up to head_dim 256, else heads repeated (or, for one query, packed)."""
    kwargs = {}
    q_length = query.shape[2]
    groups = module.num_key_value_groups
    if groups > 1:
        if key.shape[-1] == value.shape[-1] <= SDPA_GQA_MAX_HEAD_DIM:
            kwargs["enable_gqa"] = True
        elif q_length == 1:
            batch, heads, _, dim = query.shape
            query = query.reshape(batch, heads // groups, groups, dim)
        else:
            key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    out = torch.nn.functional.scaled_dot_product_attention(
        query, key, value, attn_mask=None, dropout_p=0.0, scale=module.scaling, is_causal=q_length > 1, **kwargs)
    out = out.reshape(out.shape[0], -1, q_length, value.shape[-1])
    return out.transpose(1, 2).contiguous()


class Attention(nn.Module):
    def __init__(self, config: LlamaLayerConfig):
        super().__init__()
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim ** -0.5
        bias, hidden = config.attention_bias, config.hidden_size
        self.q_proj = nn.Linear(hidden, config.num_attention_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, config.num_key_value_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, config.num_key_value_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(config.num_attention_heads * self.head_dim, hidden, bias=bias)

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                attention_mask: None = None, **kwargs) -> tuple[torch.Tensor, None]:
        if attention_mask is not None:
            raise ValueError("the native Llama layer runs full causal sequences only (attention_mask must be None)")
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, -1, self.head_dim)
        query_states = self.q_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        key_states = self.k_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        value_states = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        cos, sin = position_embeddings
        query_states, key_states = apply_rotary_pos_emb(query_states, key_states, cos, sin)
        attn_output = sdpa_attention(self, query_states, key_states, value_states)
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.o_proj(attn_output), None


class MLP(nn.Module):
    def __init__(self, config: LlamaLayerConfig):
        super().__init__()
        hidden, inter, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = nn.Linear(hidden, inter, bias=bias)
        self.up_proj = nn.Linear(hidden, inter, bias=bias)
        self.down_proj = nn.Linear(inter, hidden, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """`LlamaDecoderLayer` for a forward pass without cache: residual + attention, residual + MLP."""

    def __init__(self, config: LlamaLayerConfig):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.self_attn = Attention(config)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, hidden_states: torch.Tensor, attention_mask: None = None, position_ids=None,
                position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None, **kwargs) -> torch.Tensor:
        residual = hidden_states
        hidden_states = self.input_layernorm(hidden_states)
        hidden_states, _ = self.self_attn(hidden_states=hidden_states, attention_mask=attention_mask,
                                          position_embeddings=position_embeddings)
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = self.post_attention_layernorm(hidden_states)
        hidden_states = self.mlp(hidden_states)
        return residual + hidden_states


__all__ = ["NATIVE_ROPE_TYPES", "LlamaLayerConfig", "layer_config", "rope_parameters", "inverse_frequencies",
           "RotaryEmbedding", "RMSNorm", "Attention", "MLP", "DecoderLayer"]
