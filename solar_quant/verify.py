"""`verify`: prove that a variant folder is complete, self-consistent and (given its source)
the quantization of that source it claims to be.

Checks, each producing findings (strings that name the file, tensor or field):
1. manifest.json: every file present with its recorded sha256, no unlisted file;
2. config.json: quantization_config well formed; for GPTQ equal to quantize_config.json;
   rope settings present and accepted by transformers (config built, frequencies computed);
3. every tensor the config implies is present with the dtype and shape its format writes
   (`formats.sizes.linear_tensor_specs`), and no other tensor;
4. format invariants, on every Linear: GPTQ qzeros hold the symmetric zero point (or an
   asymmetric one in 1..2^b-1), g_idx in range with at most G columns per group (and k // G
   without act-order), scales finite and > 0; bitsandbytes SCB / absmax finite and >= 0,
   weight_format 0, packed quant-state JSON parses and agrees with the weight's shape;
5. with a source: a sample of layers is de-quantized and compared with the source: GPTQ
   against the relative weight error recorded per Linear in solar_quant.json, bitsandbytes
   against a fresh quantization of the same source weight; 16-bit tensors must be equal.

Reads tensors one at a time (memory-mapped); only the sampled layers are de-quantized.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from solar_quant import progress, registry
from solar_quant.architecture import LlamaShape, is_linear_weight
from solar_quant.checkpoint.manifest import check_manifest
from solar_quant.checkpoint.reader import CheckpointReader
from solar_quant.errors import InputError, SolarQuantError
from solar_quant.formats.checks import RECORD, read_json
from solar_quant.formats.sizes import linear_tensor_specs
from solar_quant.registry import Variant

DTYPE_NAMES = {"float16": "F16", "bfloat16": "BF16", "float32": "F32"}


@dataclass(frozen=True)
class Layout:
    """What the config says the folder holds: its format, its Variant and the 16-bit dtype."""

    format: str  # the registry's format name: "fp16", "bitsandbytes", "gptq", ...
    variant: Variant
    dtype: str  # safetensors dtype of the 16-bit tensors

    @property
    def entry(self):
        return registry.format_entry(self.format)

    def quantizes(self, module: str, tied: bool) -> bool:
        """Whether Linear `module` ('model.layers.3.mlp.up_proj' or 'lm_head') is stored quantized."""
        return self.entry.quantizes(self.variant, module, tied)


def verify_variant(path: str | Path, source: str | Path | None = None, *, samples: int = 2,
                   log=progress.log) -> list[str]:
    """Every problem found with the variant folder `path` (empty: it verifies)."""
    folder = Path(path)
    if not folder.is_dir():
        raise InputError(f"{folder}: no such folder; pass a folder written by `solar-quant quantize`")
    findings = [f"manifest: {f}" for f in check_manifest(folder)]
    log(f"verify: {folder}: manifest {'ok' if not findings else f'{len(findings)} problem(s)'}")
    cfg = _config(folder, findings)
    if cfg is None:
        return findings
    findings += check_rope(cfg, folder / "config.json")
    layout = _layout(folder, cfg, findings)
    try:
        shape = LlamaShape.from_config(cfg, str(folder / "config.json"))
        reader = CheckpointReader(folder)
        reader.tensors  # noqa: B018 - reads and validates every header
    except SolarQuantError as e:
        return findings + [str(e)]
    if layout is None:
        return findings
    expected = expected_tensors(shape, layout)
    bad = _check_specs(reader, expected, layout, findings)
    _check_values(reader, shape, layout, bad, findings)
    log(f"verify: {folder}: {len(expected)} tensors checked against the {layout.variant} layout")
    if source is not None and not bad:
        findings += compare_with_source(reader, Path(source), shape, layout, samples, log)
    return findings


# -- config ---------------------------------------------------------------------------------
def _config(folder: Path, findings: list[str]) -> dict | None:
    return read_json(folder / "config.json", findings)


def check_rope(cfg: dict, where: Path | str = "config.json") -> list[str]:
    """Rope settings present, and transformers builds the config and computes the frequencies."""
    if "rope_parameters" not in cfg and "rope_theta" not in cfg and "rope_scaling" not in cfg:
        return [f"{where}: no rope settings (rope_parameters); the variant cannot say which rope it was made for"]
    try:
        from transformers import LlamaConfig
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
        from transformers.utils import logging as hf_logging

        level = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            doc = {k: v for k, v in cfg.items() if k != "quantization_config"}
            config = LlamaConfig(**doc)
            rotary = LlamaRotaryEmbedding(config)
            positions = torch.arange(2 * int(config.max_position_embeddings) + 1)[None]
            cos, _ = rotary(torch.zeros(1, 1, dtype=torch.float32), positions)
        finally:
            hf_logging.set_verbosity(level)
    except Exception as e:  # transformers raises KeyError/TypeError/ValueError for bad rope settings
        detail = (str(e).strip().splitlines() or [""])[0]
        return [f"{where}: rope_parameters {cfg.get('rope_parameters') or cfg.get('rope_scaling')!r} are not "
                f"usable by transformers ({type(e).__name__}: {detail})"]
    if not bool(torch.isfinite(rotary.inv_freq).all()) or not bool(torch.isfinite(cos).all()):
        return [f"{where}: rope_parameters give non-finite rope frequencies"]
    return []


def _layout(folder: Path, cfg: dict, findings: list[str]) -> Layout | None:
    dtype = DTYPE_NAMES.get(str(cfg.get("dtype") or cfg.get("torch_dtype") or "float16"), "F16")
    q = cfg.get("quantization_config")
    where = folder / "config.json"
    if q is not None and not isinstance(q, dict):
        findings.append(f"{where}: quantization_config must be an object")
        return None
    fmt = registry.format_of_config(q)
    if fmt is None:
        findings.append(f"{where}: quantization_config.quant_method {q.get('quant_method')!r} is not one solar-quant "
                        f"writes ({', '.join(registry.quantized_format_names())})")
        return None
    variant = fmt.variant(folder, q, findings)
    return None if variant is None else Layout(fmt.name, variant, dtype)


# -- tensors present, dtypes and shapes -------------------------------------------------------
def linear_modules(shape: LlamaShape) -> dict[str, tuple[int, int]]:
    """Every Linear of the model -> (out, in): the decoder projections and lm_head."""
    out = {f"model.layers.{i}.{name}": dims for i in range(shape.layers) for name, dims in shape.linear_shapes().items()}
    out["lm_head"] = (shape.vocab, shape.hidden)
    return out


def expected_tensors(shape: LlamaShape, layout: Layout) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Tensor name -> (safetensors dtype, shape) that the variant's checkpoint must hold."""
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    for name, dims in shape.tensor_shapes().items():
        module = name.removesuffix(".weight")
        linear = is_linear_weight(name) or name == "lm_head.weight"
        if linear and layout.quantizes(module, shape.tie_word_embeddings):
            for suffix, spec in linear_tensor_specs(layout.variant, *dims).items():
                out[f"{module}.{suffix}"] = spec
        else:
            out[name] = (layout.dtype, dims)
    return out


def _check_specs(reader: CheckpointReader, expected: dict, layout: Layout, findings: list[str]) -> set[str]:
    """Findings for missing, mistyped, misshapen or unexpected tensors; returns the bad names."""
    bad = set()
    variable = layout.entry.variable_length  # tensors whose length depends on the data: a U8 vector
    for name, (dtype, dims) in expected.items():
        info = reader.tensors.get(name)
        where = reader.path / info.shard if info else reader.path
        if info is None:
            findings.append(f"{reader.path}: tensor '{name}' is missing")
        elif any(marker in name for marker in variable):
            if info.dtype != "U8" or len(info.shape) != 1:
                findings.append(f"{where}: tensor '{name}' is {info.dtype} {list(info.shape)}, expected a U8 vector")
            else:
                continue
        elif info.dtype != dtype or tuple(info.shape) != tuple(dims):
            findings.append(f"{where}: tensor '{name}' is {info.dtype} {list(info.shape)}, expected {dtype} {list(dims)}")
        else:
            continue
        bad.add(name)
    for name in reader.tensors:
        if name not in expected:
            findings.append(f"{reader.path / reader.tensors[name].shard}: unexpected tensor '{name}'")
            bad.add(name)
    return bad


# -- format invariants --------------------------------------------------------------------------
def _check_values(reader: CheckpointReader, shape: LlamaShape, layout: Layout, bad: set[str],
                  findings: list[str]) -> None:
    check = layout.entry.check_linear
    if check is None:
        return
    for module, (n_out, n_in) in linear_modules(shape).items():
        if not layout.quantizes(module, shape.tie_word_embeddings):
            continue
        names = [f"{module}.{s}" for s in linear_tensor_specs(layout.variant, n_out, n_in)]
        if any(n in bad for n in names):
            continue
        where = reader.path / reader.info(names[0]).shard
        findings += [f"{where}: {module}.{f}" for f in check(reader, module, n_out, n_in, layout.variant)]


# -- against the source -------------------------------------------------------------------------
def sample_layers(layers: int, samples: int) -> list[int]:
    """`samples` layers spread evenly from the first to the last."""
    if samples <= 0 or layers <= 0:
        return []
    n = min(samples, layers)
    if n == 1:
        return [0]
    return sorted({round(i * (layers - 1) / (n - 1)) for i in range(n)})


def compare_with_source(reader: CheckpointReader, source: Path, shape: LlamaShape, layout: Layout, samples: int,
                        log=progress.log) -> list[str]:
    src = CheckpointReader(source)
    src.require_llama()
    record = read_json(reader.path / RECORD, findings := [])
    if record is None:
        return findings
    recorded = (record.get("source") or {}).get("sha256")
    if recorded != src.identity()["sha256"]:
        return [f"{source}: is not the checkpoint {reader.path.name} was made from ({reader.path / RECORD} records "
                f"source {str(recorded)[:16]}…); pass the original 16-bit folder"]
    layers = sample_layers(shape.layers, samples)
    log(f"verify: de-quantizing layers {layers} and comparing with {source}")
    equalized = "equalization" in record
    for i in layers:
        fold = _equalization_fold(reader, src, shape, i) if equalized else None
        if isinstance(fold, str):
            findings.append(fold)
            continue
        for local, (n_out, n_in) in shape.linear_shapes().items():
            module = f"model.layers.{i}.{local}"
            if layout.quantizes(module, shape.tie_word_embeddings):
                findings += _compare_linear(reader, src, module, layout, record, i, local, fold)
        for norm in ("input_layernorm.weight", "post_attention_layernorm.weight"):
            findings += _compare_exact(reader, src, f"model.layers.{i}.{norm}", fold)
    for name in ("model.norm.weight", "model.embed_tokens.weight", "lm_head.weight"):
        if name in reader.tensors:
            findings += _compare_exact(reader, src, name)
    return findings


def _equalization_fold(reader: CheckpointReader, src: CheckpointReader, shape: LlamaShape, i: int):
    """For an equalized variant: (name -> source tensor folded by the recorded scales), or a finding."""
    from solar_quant.formats.equalization import folded_source_tensor, load_scales, scales_path

    scales = load_scales(reader.path, i)
    if scales is None:
        return f"{scales_path(reader.path, i)}: missing; {reader.path / RECORD} records equalization for layer {i}"
    kv_groups, head_dim = shape.heads // shape.kv_heads, shape.head_dim
    prefix = f"model.layers.{i}."

    def fold(name: str) -> torch.Tensor:
        return folded_source_tensor(name, name[len(prefix):], src.get(name), scales, kv_groups, head_dim)

    return fold


def _compare_exact(reader: CheckpointReader, src: CheckpointReader, name: str, fold=None) -> list[str]:
    """16-bit tensors equal the source's, or (equalized) the source's folded by the recorded scales."""
    ours = reader.get(name)
    theirs = (fold(name) if fold is not None else src.get(name)).to(ours.dtype)
    if not torch.equal(ours, theirs):
        what = "the source's folded by the recorded equalization scales" if fold is not None else "the source's"
        return [f"{reader.path / reader.info(name).shard}: tensor '{name}' differs from {what} "
                f"({int((ours != theirs).sum())} of {ours.numel()} values)"]
    return []


def _compare_linear(reader, src, module: str, layout: Layout, record: dict, layer: int, local: str,
                    fold=None) -> list[str]:
    compare = layout.entry.compare_linear
    if compare is None:
        return []
    W = (fold(f"{module}.weight") if fold is not None else src.get(f"{module}.weight")).to(torch.float32)
    where = reader.path / reader.info(f"{module}.{next(iter(linear_tensor_specs(layout.variant, 1, 1)))}").shard
    return compare(reader, src, module, layout.variant, record, layer, local, W, where)


__all__ = ["verify_variant", "check_rope", "expected_tensors", "sample_layers", "compare_with_source", "Layout"]
