"""One decoder layer at a time: a Llama decoder layer built on the meta device and filled with
just that layer's tensors from the source shards, run over calibration activations in chunks
exactly as `LlamaModel.forward` runs it.

The layer is `models.llama_layer.DecoderLayer` (plain torch, bit-identical to transformers'
`LlamaDecoderLayer`, without importing transformers' modeling code) for the rope types it
computes (default, linear, dynamic, llama3); any other rope type runs transformers' own
`LlamaDecoderLayer`, `LlamaRotaryEmbedding` and `create_causal_mask`. `llama_config` picks once,
by the config it returns; everything after follows that config.

Activations live on the CPU (fp32 by default) as one tensor [nsamples, seqlen, hidden]; each
chunk moves to the layer's device, runs, and comes back. Nothing here quantizes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch

from solar_quant.architecture import layer_prefix
from solar_quant.checkpoint.reader import CheckpointReader
from solar_quant.models.llama_layer import LlamaLayerConfig, layer_config

EMBED_NAME = "model.embed_tokens.weight"


def llama_config(source_cfg: dict, attn_implementation: str = "sdpa", where: str = "config.json"):
    """The config the source model's layers run under: a `LlamaLayerConfig` (native layer) when
    the native layer computes its rope type, else a transformers `LlamaConfig`. A field no layer
    runs (hidden_act other than silu) raises `CheckpointError` naming `where`."""
    native = layer_config(source_cfg, where)
    if native.native and attn_implementation == "sdpa":
        return native
    return transformers_config(source_cfg, attn_implementation)


def transformers_config(source_cfg: dict, attn_implementation: str = "sdpa"):
    """A transformers `LlamaConfig` for the source model's layers (the fallback path)."""
    from transformers import LlamaConfig

    cfg = {k: v for k, v in source_cfg.items() if k != "quantization_config"}
    config = LlamaConfig(**cfg)
    config._attn_implementation = attn_implementation
    return config


def is_native(config) -> bool:
    return isinstance(config, LlamaLayerConfig)


def load_decoder_layer(reader: CheckpointReader, config, index: int, device: torch.device,
                       dtype: torch.dtype = torch.float32):
    """Layer `index` on `device` in `dtype` (the layer `config` calls for); reads only its tensors."""
    with torch.device("meta"):
        layer = _new_layer(config, index)
    prefix = layer_prefix(index)
    state = {name: reader.get(prefix + name).to(device=device, dtype=dtype) for name in layer.state_dict()}
    layer.load_state_dict(state, assign=True, strict=True)
    return layer.eval().requires_grad_(False)


def _new_layer(config, index: int) -> torch.nn.Module:
    if is_native(config):
        from solar_quant.models.llama_layer import DecoderLayer

        return DecoderLayer(config)
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    return LlamaDecoderLayer(config, index)


def embed_tokens(reader: CheckpointReader, input_ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Embeddings of `input_ids` [n, L] -> [n, L, hidden] on the CPU, looked up row by row from the shard."""
    table = reader.get(EMBED_NAME)  # memory-mapped [vocab, hidden]
    out = torch.empty((*input_ids.shape, table.shape[1]), dtype=dtype)
    for i in range(input_ids.shape[0]):
        out[i] = table[input_ids[i]].to(dtype)
    return out


@dataclass
class LayerRunner:
    """Runs decoder layers over CPU-held activations, `chunk` samples at a time, on `device`.

    `pieces` > 1 (the staged pass): each chunk runs as that many smaller pieces, so the
    activations in flight (the MLP's [piece, L, intermediate] products above all) shrink by
    that factor; `batched` joins the pieces' inputs back into one per chunk before they reach a
    Hessian, whose sums are then the same as with whole chunks (a row's forward does not
    depend on the rows beside it; the Hessian's product does)."""

    config: object
    device: torch.device
    dtype: torch.dtype = torch.float32
    chunk: int = 8
    pieces: int = 1

    def __post_init__(self):
        if is_native(self.config):
            from solar_quant.models.llama_layer import RotaryEmbedding
        else:
            from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding as RotaryEmbedding
        self.rotary = RotaryEmbedding(self.config).to(self.device)

    def inputs(self, hidden: torch.Tensor, pieces: bool = False) -> Iterator[tuple[slice, torch.Tensor, dict]]:
        """(sample slice, chunk on the device, the layer's keyword arguments) for each chunk
        (each piece with `pieces`)."""
        seqlen = hidden.shape[1]
        position_ids = torch.arange(seqlen, device=self.device).unsqueeze(0)
        for rows in self.rows(hidden, pieces):
            h = hidden[rows].to(device=self.device, dtype=self.dtype)
            mask = self.causal_mask(h, position_ids)
            kwargs = {"attention_mask": mask, "position_ids": position_ids,
                      "position_embeddings": self.rotary(h, position_ids)}
            yield rows, h, kwargs

    def causal_mask(self, h: torch.Tensor, position_ids: torch.Tensor):
        """None for the native layer: a full, unpadded causal sequence needs no mask (SDPA's is_causal;
        transformers' `create_causal_mask` gives None for it too)."""
        if is_native(self.config):
            return None
        from transformers.masking_utils import create_causal_mask

        # (config, inputs_embeds, attention_mask, cache) positionally: the cache argument's name changed in 5.x
        return create_causal_mask(self.config, h, None, None, position_ids=position_ids)

    def rows(self, hidden: torch.Tensor, pieces: bool = False) -> Iterator[slice]:
        """The sample slices of `inputs`, without moving anything: the chunks, or with `pieces`
        each chunk's pieces."""
        n = hidden.shape[0]
        step = -(-self.chunk // self.pieces) if pieces else self.chunk
        for start in range(0, n, self.chunk):
            stop = min(start + self.chunk, n)
            for a in range(start, stop, step):
                yield slice(a, min(a + step, stop))

    def batched(self, hidden: torch.Tensor, inputs: Iterable[torch.Tensor]) -> Iterator[torch.Tensor]:
        """The per-piece tensors `inputs` (in `rows(hidden, pieces=True)` order, samples first)
        joined into one tensor per chunk."""
        n, parts = hidden.shape[0], []
        for rows, X in zip(self.rows(hidden, pieces=True), inputs):
            parts.append(X)
            if rows.stop % self.chunk == 0 or rows.stop == n:
                yield parts[0] if len(parts) == 1 else torch.cat(parts)
                parts = []

    @torch.no_grad()
    def forward(self, layer, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """The layer's outputs for every sample, written into `out` (CPU, same shape as `hidden`)."""
        out = torch.empty_like(hidden) if out is None else out
        for rows, h, kwargs in self.inputs(hidden):
            out[rows] = layer(h, **kwargs).to(device=out.device, dtype=out.dtype)
        return out

    @torch.no_grad()
    def feed(self, layer, hidden: torch.Tensor, until: torch.nn.Module | None = None) -> None:
        """Run every chunk through the layer for the sake of its hooks; stop each chunk early
        once `until` has seen its inputs (later modules' work would be thrown away)."""
        handle = until.register_forward_pre_hook(_stop) if until is not None else None
        try:
            for _, h, kwargs in self.inputs(hidden):
                try:
                    layer(h, **kwargs)
                except _InputsSeen:
                    pass
        finally:
            if handle is not None:
                handle.remove()


class _InputsSeen(Exception):
    """Raised by a pre-hook once the last module whose inputs we need has been reached."""


def _stop(module, args):
    raise _InputsSeen


def capture_inputs(modules: dict[str, torch.nn.Module], on_input: Callable[[str, torch.Tensor], None]):
    """Forward pre-hooks calling `on_input(name, X)` with each module's input as [tokens, features].

    Returns the hook handles; call `.remove()` on each when done."""
    handles = []
    for name, module in modules.items():
        def hook(mod, args, name=name):
            on_input(name, args[0].reshape(-1, args[0].shape[-1]))
        handles.append(module.register_forward_pre_hook(hook))
    return handles


def _input_of(module: torch.nn.Module, call: Callable[[], object]) -> torch.Tensor:
    """The input `module` receives when `call()` runs; the call stops there (nothing after it runs)."""
    seen = []

    def hook(mod, args):
        seen.append(args[0])
        raise _InputsSeen

    handle = module.register_forward_pre_hook(hook)
    try:
        call()
    except _InputsSeen:
        pass
    finally:
        handle.remove()
    return seen[0]


class StagedForward:
    """The decoder layer's forward cut at the inputs of the four true-sequential groups, run once.

    Each `*_inputs` method runs one stage over every chunk and yields that stage's group inputs
    (which the caller folds into a Hessian); the caller quantizes the group before the next
    stage reads it. The stages use the layer's own modules with the runner's mask and rotary
    embeddings, in the decoder layer's order, so the values are those of `layer(h, ...)`:

    1. `qkv_inputs`: input_layernorm(x);
    2. `o_inputs`: the attention up to o_proj's input (quantized q/k/v), kept in `out`;
    3. `gate_up_inputs`: h_mid = x + o_proj(attention), kept in `out`; yields post_attention_layernorm(h_mid);
    4. `down_inputs`: act(gate(.)) * up(.) of the quantized gate/up;
    5. `finish`: out = h_mid + down_proj(act(gate(.)) * up(.)), the next layer's input.

    Stored between stages: only hidden-sized activations, in the `out` buffer the caller gives for
    the layer's output (the attention output first, then h_mid, then the output; chunk by chunk
    in place), so memory is what the two-pass pipeline held. The MLP's [n, L, intermediate]
    product is not kept: `finish` recomputes gate/up once. Kept, it would be 3.5x the hidden
    activations for a 70B (~30 GB fp32 at 128 x 2048 x 28672) and 2.7x for SmolLM2, more than
    the whole calibration state the memory model (solar_quant/memory.py) budgets for; one extra
    gate/up product costs ~2/3 of a stage's matmuls instead (docs/algorithms.md)."""

    def __init__(self, runner: LayerRunner, layer, hidden: torch.Tensor, out: torch.Tensor):
        self.runner, self.layer, self.hidden, self.out = runner, layer, hidden, out
        width = layer.self_attn.o_proj.in_features
        # the attention output (o_proj's input) shares `out` when it has the hidden size (Llama: always)
        self.attn = out if width == hidden.shape[-1] else hidden.new_empty((*hidden.shape[:2], width))

    def _load(self, buffer: torch.Tensor, rows: slice) -> torch.Tensor:
        return buffer[rows].to(device=self.runner.device, dtype=self.runner.dtype)

    def _store(self, buffer: torch.Tensor, rows: slice, value: torch.Tensor) -> None:
        buffer[rows] = value.to(device=buffer.device, dtype=buffer.dtype)

    @torch.no_grad()
    def qkv_inputs(self) -> Iterator[torch.Tensor]:
        for _, h, _ in self.runner.inputs(self.hidden, pieces=True):
            yield self.layer.input_layernorm(h)

    @torch.no_grad()
    def o_inputs(self) -> Iterator[torch.Tensor]:
        attn = self.layer.self_attn
        for rows, h, kwargs in self.runner.inputs(self.hidden, pieces=True):
            x = self.layer.input_layernorm(h)
            a = _input_of(attn.o_proj, lambda: attn(hidden_states=x, **kwargs))
            self._store(self.attn, rows, a)
            yield a

    @torch.no_grad()
    def gate_up_inputs(self) -> Iterator[torch.Tensor]:
        for rows in self.runner.rows(self.hidden, pieces=True):
            h = self.hidden[rows].to(device=self.runner.device, dtype=self.runner.dtype)
            h_mid = h + self.layer.self_attn.o_proj(self._load(self.attn, rows))
            self._store(self.out, rows, h_mid)
            yield self.layer.post_attention_layernorm(h_mid)

    def _mlp_product(self, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        h_mid = self._load(self.out, rows)
        mlp = self.layer.mlp
        x = self.layer.post_attention_layernorm(h_mid)
        return h_mid, _input_of(mlp.down_proj, lambda: mlp(x))

    @torch.no_grad()
    def down_inputs(self) -> Iterator[torch.Tensor]:
        for rows in self.runner.rows(self.hidden, pieces=True):
            yield self._mlp_product(rows)[1]

    @torch.no_grad()
    def finish(self) -> torch.Tensor:
        for rows in self.runner.rows(self.hidden, pieces=True):
            h_mid, product = self._mlp_product(rows)
            self._store(self.out, rows, h_mid + self.layer.mlp.down_proj(product))
        return self.out

    def rescale_attention(self, s: torch.Tensor) -> None:
        """Divide the kept attention output (o_proj's input, per channel) by `s`: what v_proj with
        its rows divided by `s` gives, attention being linear in v (the v → o equalization)."""
        self.attn.div_(s.to(device=self.attn.device, dtype=self.attn.dtype))

    def group_inputs(self) -> tuple[Callable[[], Iterator[torch.Tensor]], ...]:
        """One stage per group of `architecture.SEQUENTIAL_GROUPS`, in order."""
        return (self.qkv_inputs, self.o_inputs, self.gate_up_inputs, self.down_inputs)
