"""One decoder layer at a time: transformers' own `LlamaDecoderLayer`, built on the meta device
and filled with just that layer's tensors from the source shards, run over calibration
activations in chunks exactly as `LlamaModel.forward` runs it.

Activations live on the CPU (fp32 by default) as one tensor [nsamples, seqlen, hidden]; each
chunk moves to the layer's device, runs, and comes back. Nothing here quantizes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from solar_quant.architecture import layer_prefix
from solar_quant.checkpoint.reader import CheckpointReader

EMBED_NAME = "model.embed_tokens.weight"


def llama_config(source_cfg: dict, attn_implementation: str = "sdpa"):
    """A transformers `LlamaConfig` for running the source model's layers (its own rope settings)."""
    from transformers import LlamaConfig

    cfg = {k: v for k, v in source_cfg.items() if k != "quantization_config"}
    config = LlamaConfig(**cfg)
    config._attn_implementation = attn_implementation
    return config


def load_decoder_layer(reader: CheckpointReader, config, index: int, device: torch.device,
                       dtype: torch.dtype = torch.float32):
    """Layer `index` as a `LlamaDecoderLayer` on `device` in `dtype`; reads only its tensors."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    with torch.device("meta"):
        layer = LlamaDecoderLayer(config, index)
    prefix = layer_prefix(index)
    state = {name: reader.get(prefix + name).to(device=device, dtype=dtype) for name in layer.state_dict()}
    layer.load_state_dict(state, assign=True, strict=True)
    return layer.eval().requires_grad_(False)


def embed_tokens(reader: CheckpointReader, input_ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Embeddings of `input_ids` [n, L] -> [n, L, hidden] on the CPU, looked up row by row from the shard."""
    table = reader.get(EMBED_NAME)  # memory-mapped [vocab, hidden]
    out = torch.empty((*input_ids.shape, table.shape[1]), dtype=dtype)
    for i in range(input_ids.shape[0]):
        out[i] = table[input_ids[i]].to(dtype)
    return out


@dataclass
class LayerRunner:
    """Runs decoder layers over CPU-held activations, `chunk` samples at a time, on `device`."""

    config: object
    device: torch.device
    dtype: torch.dtype = torch.float32
    chunk: int = 8

    def __post_init__(self):
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        self.rotary = LlamaRotaryEmbedding(self.config).to(self.device)

    def inputs(self, hidden: torch.Tensor) -> Iterator[tuple[slice, torch.Tensor, dict]]:
        """(sample slice, chunk on the device, the layer's keyword arguments) for each chunk."""
        from transformers.masking_utils import create_causal_mask

        n, seqlen = hidden.shape[:2]
        position_ids = torch.arange(seqlen, device=self.device).unsqueeze(0)
        for start in range(0, n, self.chunk):
            rows = slice(start, min(start + self.chunk, n))
            h = hidden[rows].to(device=self.device, dtype=self.dtype)
            mask = create_causal_mask(config=self.config, inputs_embeds=h, attention_mask=None, cache=None,
                                      position_ids=position_ids)
            kwargs = {"attention_mask": mask, "position_ids": position_ids,
                      "position_embeddings": self.rotary(h, position_ids)}
            yield rows, h, kwargs

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
