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

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from solar_quant import progress
from solar_quant.architecture import LlamaShape, is_linear_weight
from solar_quant.checkpoint.manifest import check_manifest
from solar_quant.checkpoint.reader import CheckpointReader
from solar_quant.errors import InputError, SolarQuantError
from solar_quant.formats.sizes import Variant, linear_tensor_specs

GPTQ_CONFIG = "quantize_config.json"
RECORD = "solar_quant.json"
DTYPE_NAMES = {"float16": "F16", "bfloat16": "BF16", "float32": "F32"}
# A recomputed GPTQ weight error may differ from the recorded 6-significant-digit figure by rounding only.
GPTQ_ERROR_RTOL, GPTQ_ERROR_ATOL = 1e-3, 1e-6
# A stored bitsandbytes weight may be at most this much worse than a fresh quantization of its source
# (a variant made on a GPU may round a few ties differently).
BNB_ERROR_SLACK = 1.01


@dataclass(frozen=True)
class Layout:
    """What the config says the folder holds."""

    kind: str  # "fp16", "bnb" or "gptq"
    variant: Variant
    dtype: str  # safetensors dtype of the 16-bit tensors
    skip_modules: tuple[str, ...] = ()
    sym: bool = True
    desc_act: bool = False

    def quantizes(self, module: str, tied: bool) -> bool:
        """Whether Linear `module` ('model.layers.3.mlp.up_proj' or 'lm_head') is stored quantized."""
        if self.kind == "fp16":
            return False
        if module == "lm_head":
            if self.kind == "gptq" or tied:
                return False
        from solar_quant.formats.bnb import should_quantize

        return self.kind == "gptq" or should_quantize(module, self.skip_modules)


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
    bad = _check_specs(reader, expected, findings)
    _check_values(reader, shape, layout, bad, findings)
    log(f"verify: {folder}: {len(expected)} tensors checked against the {layout.variant} layout")
    if source is not None and not bad:
        findings += compare_with_source(reader, Path(source), shape, layout, samples, log)
    return findings


# -- config ---------------------------------------------------------------------------------
def _read_json(path: Path, findings: list[str]) -> dict | None:
    if not path.is_file():
        findings.append(f"{path}: missing")
        return None
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        findings.append(f"{path}: not valid JSON ({e})")
        return None
    if not isinstance(doc, dict):
        findings.append(f"{path}: must hold a JSON object")
        return None
    return doc


def _config(folder: Path, findings: list[str]) -> dict | None:
    return _read_json(folder / "config.json", findings)


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
    if q is None:
        return Layout("fp16", Variant("fp16"), dtype)
    if not isinstance(q, dict):
        findings.append(f"{where}: quantization_config must be an object")
        return None
    method = q.get("quant_method")
    if method == "gptq":
        return _gptq_layout(folder, q, dtype, findings)
    if method == "bitsandbytes":
        return _bnb_layout(where, q, dtype, findings)
    findings.append(f"{where}: quantization_config.quant_method {method!r} is not one solar-quant writes "
                    "(gptq, bitsandbytes)")
    return None


def _gptq_layout(folder: Path, q: dict, dtype: str, findings: list[str]) -> Layout | None:
    where = folder / "config.json"
    other = _read_json(folder / GPTQ_CONFIG, findings)
    if other is not None and other != q:
        keys = sorted(k for k in set(q) | set(other) if q.get(k) != other.get(k))
        findings.append(f"{folder / GPTQ_CONFIG}: disagrees with config.json quantization_config on "
                        + ", ".join(f"{k} ({other.get(k)!r} vs {q.get(k)!r})" for k in keys))
    bits, group = q.get("bits"), q.get("group_size")
    problems = []
    if bits not in (2, 3, 4, 8) or isinstance(bits, bool):
        problems.append(f"bits {bits!r} (expected 2, 3, 4 or 8)")
    if not isinstance(group, int) or isinstance(group, bool) or not (group == -1 or group > 0):
        problems.append(f"group_size {group!r} (expected a positive integer or -1)")
    for key in ("desc_act", "sym"):
        if not isinstance(q.get(key), bool):
            problems.append(f"{key} {q.get(key)!r} (expected true or false)")
    if q.get("checkpoint_format", "gptq") != "gptq":
        problems.append(f"checkpoint_format {q.get('checkpoint_format')!r} (solar-quant writes and checks 'gptq' v1)")
    if q.get("pack_dtype", "int32") != "int32":
        problems.append(f"pack_dtype {q.get('pack_dtype')!r} (expected int32)")
    if problems:
        findings.append(f"{where}: quantization_config has " + "; ".join(problems))
        return None
    return Layout("gptq", Variant("gptq", bits=bits, group_size=group, act_order=q["desc_act"]), dtype,
                  sym=q["sym"], desc_act=q["desc_act"])


def _bnb_layout(where: Path, q: dict, dtype: str, findings: list[str]) -> Layout | None:
    eight, four = q.get("load_in_8bit"), q.get("load_in_4bit")
    if bool(eight) == bool(four):
        findings.append(f"{where}: quantization_config must set exactly one of load_in_8bit / load_in_4bit "
                        f"(found {eight!r} / {four!r})")
        return None
    skip = q.get("llm_int8_skip_modules")
    skip = ("lm_head",) if skip is None else tuple(skip) if isinstance(skip, list) else None
    if skip is None:
        findings.append(f"{where}: quantization_config.llm_int8_skip_modules must be a list or null")
        return None
    if eight:
        return Layout("bnb", Variant("bnb-int8", bits=8), dtype, skip)
    quant_type = q.get("bnb_4bit_quant_type")
    if quant_type not in ("nf4", "fp4"):
        findings.append(f"{where}: quantization_config.bnb_4bit_quant_type {quant_type!r} (expected nf4 or fp4)")
        return None
    return Layout("bnb", Variant(f"bnb-{quant_type}", double_quant=bool(q.get("bnb_4bit_use_double_quant")), bits=4),
                  dtype, skip)


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


def _check_specs(reader: CheckpointReader, expected: dict, findings: list[str]) -> set[str]:
    """Findings for missing, mistyped, misshapen or unexpected tensors; returns the bad names."""
    bad = set()
    for name, (dtype, dims) in expected.items():
        info = reader.tensors.get(name)
        where = reader.path / info.shard if info else reader.path
        if info is None:
            findings.append(f"{reader.path}: tensor '{name}' is missing")
        elif ".quant_state.bitsandbytes__" in name:  # packed JSON: its length depends on the data
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
    if layout.kind == "fp16":
        return
    for module, (n_out, n_in) in linear_modules(shape).items():
        if not layout.quantizes(module, shape.tie_word_embeddings):
            continue
        names = [f"{module}.{s}" for s in linear_tensor_specs(layout.variant, n_out, n_in)]
        if any(n in bad for n in names):
            continue
        where = reader.path / reader.info(names[0]).shard
        check = _gptq_values if layout.kind == "gptq" else _bnb_values
        findings += [f"{where}: {module}.{f}" for f in check(reader, module, n_out, n_in, layout)]


def _gptq_values(reader: CheckpointReader, module: str, n_out: int, n_in: int, layout: Layout) -> list[str]:
    from solar_quant.formats.gptq_v1 import unpack_codes

    bits, G = layout.variant.bits, layout.variant.group_size
    maxq = (1 << bits) - 1
    out = []
    scales = reader.get(f"{module}.scales").to(torch.float32)
    n_groups = scales.shape[0]
    if not bool(torch.isfinite(scales).all()) or not bool((scales > 0).all()):
        out.append(f"scales: {int((~(torch.isfinite(scales) & (scales > 0))).sum())} of {scales.numel()} values are "
                   "not finite and > 0")
    stored = unpack_codes(reader.get(f"{module}.qzeros").t().contiguous(), bits, n_out).t()
    if layout.sym:
        want = (1 << (bits - 1)) - 1
        wrong = int((stored != want).sum())
        if wrong:
            out.append(f"qzeros: {wrong} of {stored.numel()} zero points differ from {want} (stored zero - 1 of the "
                       f"symmetric {bits}-bit grid); the file is corrupt")
    else:
        wrapped = int((stored == maxq).sum())  # true zero point 0, stored wrapped to maxq
        if wrapped:
            out.append(f"qzeros: {wrapped} zero points are 0 (stored {maxq}); solar-quant writes 1..{maxq} and "
                       "runtimes disagree on how to read a wrapped zero")
    g_idx = reader.get(f"{module}.g_idx").to(torch.int64)
    if g_idx.numel() and (int(g_idx.min()) < 0 or int(g_idx.max()) >= n_groups):
        out.append(f"g_idx: values span {int(g_idx.min())}..{int(g_idx.max())}, outside 0..{n_groups - 1}")
        return out
    width = n_in if G == -1 else G
    counts = torch.bincount(g_idx, minlength=n_groups)
    if int(counts.max()) > width:
        out.append(f"g_idx: group {int(counts.argmax())} has {int(counts.max())} columns, more than the group size {width}")
    if not layout.desc_act and not torch.equal(g_idx, torch.arange(n_in) // width):
        out.append(f"g_idx: differs from k // {width} although desc_act is false")
    return out


def _bnb_values(reader: CheckpointReader, module: str, n_out: int, n_in: int, layout: Layout) -> list[str]:
    if layout.variant.method == "bnb-int8":
        out = []
        scb = reader.get(f"{module}.SCB")
        if not bool(torch.isfinite(scb).all()) or not bool((scb >= 0).all()):
            out.append("SCB: row scales must be finite and >= 0")
        fmt = reader.get(f"{module}.weight_format")
        if int(fmt) != 0:
            out.append(f"weight_format: {int(fmt)}, expected 0 (row-major int8)")
        return out
    return _bnb4_values(reader, module, n_out, n_in, layout)


def _bnb4_values(reader: CheckpointReader, module: str, n_out: int, n_in: int, layout: Layout) -> list[str]:
    quant_type = layout.variant.method.removeprefix("bnb-")
    name = f"weight.quant_state.bitsandbytes__{quant_type}"
    try:
        state = json.loads(bytes(reader.get(f"{module}.{name}").tolist()).decode("utf-8"))
        if not isinstance(state, dict):
            raise ValueError("not an object")
    except (UnicodeDecodeError, ValueError) as e:
        return [f"{name}: packed quant state is not valid JSON ({e})"]
    out = []
    want = {"quant_type": quant_type, "blocksize": 64, "shape": [n_out, n_in]}
    if layout.variant.double_quant:
        want["nested_blocksize"] = 256
    for key, value in want.items():
        if state.get(key) != value:
            out.append(f"{name}: {key} {state.get(key)!r}, expected {value!r}")
    if state.get("dtype") not in DTYPE_NAMES:
        out.append(f"{name}: dtype {state.get('dtype')!r}, expected float16, bfloat16 or float32")
    if layout.variant.double_quant:
        offset = state.get("nested_offset")
        if not isinstance(offset, (int, float)) or not math.isfinite(offset):
            out.append(f"{name}: nested_offset {offset!r} is not a finite number")
    floats = ["weight.quant_map"] + (["weight.nested_absmax", "weight.nested_quant_map"]
                                     if layout.variant.double_quant else ["weight.absmax"])
    for suffix in floats:
        t = reader.get(f"{module}.{suffix}")
        if not bool(torch.isfinite(t).all()) or (suffix.endswith("absmax") and not bool((t >= 0).all())):
            out.append(f"{suffix}: values must be finite{' and >= 0' if suffix.endswith('absmax') else ''}")
    return out


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
    record = _read_json(reader.path / RECORD, findings := [])
    if record is None:
        return findings
    recorded = (record.get("source") or {}).get("sha256")
    if recorded != src.identity()["sha256"]:
        return [f"{source}: is not the checkpoint {reader.path.name} was made from ({reader.path / RECORD} records "
                f"source {str(recorded)[:16]}…); pass the original 16-bit folder"]
    layers = sample_layers(shape.layers, samples)
    log(f"verify: de-quantizing layers {layers} and comparing with {source}")
    for i in layers:
        for local, (n_out, n_in) in shape.linear_shapes().items():
            module = f"model.layers.{i}.{local}"
            if layout.quantizes(module, shape.tie_word_embeddings):
                findings += _compare_linear(reader, src, module, layout, record, i, local)
        for norm in ("input_layernorm.weight", "post_attention_layernorm.weight"):
            findings += _compare_exact(reader, src, f"model.layers.{i}.{norm}")
    for name in ("model.norm.weight", "model.embed_tokens.weight", "lm_head.weight"):
        if name in reader.tensors:
            findings += _compare_exact(reader, src, name)
    return findings


def _compare_exact(reader: CheckpointReader, src: CheckpointReader, name: str) -> list[str]:
    ours = reader.get(name)
    theirs = src.get(name).to(ours.dtype)
    if not torch.equal(ours, theirs):
        return [f"{reader.path / reader.info(name).shard}: tensor '{name}' differs from the source's "
                f"({int((ours != theirs).sum())} of {ours.numel()} values)"]
    return []


def _rel_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    return float((approx - exact).norm() / exact.norm().clamp_min(1e-30))


def _compare_linear(reader, src, module: str, layout: Layout, record: dict, layer: int, local: str) -> list[str]:
    W = src.get(f"{module}.weight").to(torch.float32)
    where = reader.path / reader.info(f"{module}.{next(iter(linear_tensor_specs(layout.variant, 1, 1)))}").shard
    if layout.kind == "gptq":
        from solar_quant.formats.gptq_v1 import dequantize

        parts = {k: reader.get(f"{module}.{k}") for k in ("qweight", "qzeros", "scales", "g_idx")}
        error = _rel_error(dequantize(parts, layout.variant.bits), W)
        want = _recorded_error(record, layer, local)
        if want is None:
            return [f"{reader.path / RECORD}: no rel_weight_error recorded for {module}"]
        if not abs(error - want) <= GPTQ_ERROR_RTOL * want + GPTQ_ERROR_ATOL:
            return [f"{where}: {module}: de-quantized weight has relative error {error:.6g} against the source, "
                    f"but {want:.6g} was recorded at quantization time; the weights were altered"]
        return []
    from solar_quant.formats import bnb as fmt
    from solar_quant.methods.bnb import STORE_DTYPE, quantize_linear

    tensors = {n: reader.get(n) for n in reader.tensors if n.startswith(f"{module}.")}
    stored = fmt.dequantize_linear(fmt.linear_parts(module, tensors))
    fresh = fmt.dequantize_linear(quantize_linear(W.to(STORE_DTYPE), layout.variant.method, layout.variant.double_quant))
    error, fresh_error = _rel_error(stored, W), _rel_error(fresh, W)
    if error > BNB_ERROR_SLACK * fresh_error + 1e-6:
        return [f"{where}: {module}: de-quantized weight has relative error {error:.6g} against the source, a fresh "
                f"{layout.variant} quantization gives {fresh_error:.6g}; the weights were altered"]
    return []


def _recorded_error(record: dict, layer: int, local: str) -> float | None:
    for entry in record.get("layers") or []:
        if isinstance(entry, dict) and entry.get("layer") == layer:
            value = ((entry.get("linears") or {}).get(local) or {}).get("rel_weight_error")
            return float(value) if isinstance(value, (int, float)) else None
    return None


__all__ = ["verify_variant", "check_rope", "expected_tensors", "sample_layers", "compare_with_source", "Layout"]
