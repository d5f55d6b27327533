"""The shape of a Llama-family model, read from config.json, and the names of its tensors."""

from __future__ import annotations

from dataclasses import dataclass

from solar_quant.errors import CheckpointError

ATTN_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_LINEARS = ("gate_proj", "up_proj", "down_proj")
# True-sequential order: each group sees the already-quantized outputs of the groups before it.
SEQUENTIAL_GROUPS = (("q_proj", "k_proj", "v_proj"), ("o_proj",), ("gate_proj", "up_proj"), ("down_proj",))


@dataclass(frozen=True)
class LlamaShape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    max_positions: int
    tie_word_embeddings: bool

    @classmethod
    def from_config(cls, cfg: dict, source: str = "config.json") -> "LlamaShape":
        def need(key: str) -> int:
            v = cfg.get(key)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise CheckpointError(f"{source}: field '{key}' must be a positive integer (found {v!r})")
            return v

        hidden, heads = need("hidden_size"), need("num_attention_heads")
        kv = cfg.get("num_key_value_heads") or heads
        head_dim = cfg.get("head_dim") or hidden // heads
        if not isinstance(kv, int) or kv <= 0 or heads % kv:
            raise CheckpointError(f"{source}: num_key_value_heads={kv!r} must divide num_attention_heads={heads}")
        return cls(hidden, need("num_hidden_layers"), heads, kv, head_dim, need("intermediate_size"), need("vocab_size"),
                   need("max_position_embeddings"), bool(cfg.get("tie_word_embeddings", False)))

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """Per-layer linear name -> (out_features, in_features)."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return {
            "self_attn.q_proj": (q, self.hidden), "self_attn.k_proj": (kv, self.hidden),
            "self_attn.v_proj": (kv, self.hidden), "self_attn.o_proj": (self.hidden, q),
            "mlp.gate_proj": (self.intermediate, self.hidden), "mlp.up_proj": (self.intermediate, self.hidden),
            "mlp.down_proj": (self.hidden, self.intermediate),
        }

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor of the 16-bit checkpoint -> shape, in checkpoint order."""
        out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (self.vocab, self.hidden)}
        for i in range(self.layers):
            p = f"model.layers.{i}."
            out[p + "input_layernorm.weight"] = (self.hidden,)
            for name, shape in self.linear_shapes().items():
                out[p + name + ".weight"] = shape
            out[p + "post_attention_layernorm.weight"] = (self.hidden,)
        out["model.norm.weight"] = (self.hidden,)
        if not self.tie_word_embeddings:
            out["lm_head.weight"] = (self.vocab, self.hidden)
        return out

    def parameter_count(self) -> int:
        n = 0
        for shape in self.tensor_shapes().values():
            size = 1
            for d in shape:
                size *= d
            n += size
        return n

    def kv_cache_bytes(self, tokens: int, batch: int = 1, bytes_per_value: int = 2) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * tokens * batch * bytes_per_value


def layer_prefix(i: int) -> str:
    return f"model.layers.{i}."


def is_linear_weight(name: str) -> bool:
    """True for the seven decoder-layer projection weights."""
    return name.startswith("model.layers.") and name.endswith(".weight") and \
        name.rsplit(".", 2)[-2] in ATTN_LINEARS + MLP_LINEARS
