"""Load a baseline or variant folder (fp16, bitsandbytes or GPTQ) for scoring, one at a time.

Rope settings are applied to the config before the model is built: `rope_override` replaces
the model's own rope type, and `trained_length` lowers `max_position_embeddings` so a small
model's dynamic NTK scaling starts where a short training window would have ended.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from solar_quant.checkpoint.reader import CheckpointReader
from solar_quant.errors import CheckpointError, DependencyError, InputError, OptionError
from solar_quant.rope import RopeScaling, rope_theta

GPTQ_EXTRA = "pip install 'solar-quant[gptq]'"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


@dataclass
class LoadedModel:
    model: torch.nn.Module
    path: str
    quant_method: str | None
    rope: dict  # effective rope_parameters + max_position_embeddings
    load_s: float
    notes: list[str] = field(default_factory=list)


# -- identities -------------------------------------------------------------------------
def model_identity(path: str | Path) -> dict:
    """The folder's identity; without a manifest (whose sha256s cover the data) the weight
    files' sizes and modification times are added, so a rewritten folder is not mistaken for the old one."""
    reader = CheckpointReader(path)
    reader.require_llama()
    ident = {**reader.identity(), "quant_method": reader.quant_method}
    if not ident["basis"].startswith("manifest.json"):
        stats = [(s, (reader.path / s).stat().st_size, (reader.path / s).stat().st_mtime_ns) for s in reader.shards]
        ident["files_sha256"] = hashlib.sha256(json.dumps(stats).encode()).hexdigest()
    return ident


def tokenizer_fingerprint(path: str | Path) -> dict:
    """sha256 of the tokenizer's vocabulary file and the config's vocab_size."""
    path = Path(path)
    reader = CheckpointReader(path)
    out = {"vocab_size": reader.config.get("vocab_size")}
    for name in TOKENIZER_FILES:
        if (path / name).is_file():
            out.update(file=name, sha256=hashlib.sha256((path / name).read_bytes()).hexdigest())
            break
    return out


def check_same_tokenizer(base: str | Path, variant: str | Path) -> dict:
    """Refuse a variant whose tokenizer or vocabulary differs from the baseline's."""
    b, v = tokenizer_fingerprint(base), tokenizer_fingerprint(variant)
    if b.get("sha256") is None:
        raise InputError(f"{base}: no tokenizer.json or tokenizer.model; the baseline folder needs its tokenizer files")
    if b["vocab_size"] != v["vocab_size"]:
        raise InputError(f"{variant}: vocab_size {v['vocab_size']} differs from the baseline's {b['vocab_size']}; "
                         "a KL or perplexity comparison across vocabularies is meaningless")
    if v.get("sha256") is not None and (v["file"], v["sha256"]) != (b["file"], b["sha256"]):
        raise InputError(f"{variant}: its {v['file']} differs from the baseline's {b['file']} (sha256 "
                         f"{v['sha256'][:12]} vs {b['sha256'][:12]}); both models must share one tokenizer")
    return b


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot load its tokenizer ({str(e).splitlines()[0]})") from None


# -- config -----------------------------------------------------------------------------
def apply_rope_override(config, rope_override: RopeScaling | None, trained_length: int | None) -> dict:
    """Edit a transformers config in place; returns the effective rope settings."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    theta = float(params.get("rope_theta") or rope_theta(config.to_dict()))
    if rope_override is not None and rope_override.kind == "none":
        params = {"rope_type": "default", "rope_theta": theta}
    elif rope_override is not None and rope_override.kind in ("dynamic", "linear"):
        params = {"rope_type": rope_override.kind, "factor": float(rope_override.factor), "rope_theta": theta}
    if trained_length is not None:
        config.max_position_embeddings = int(trained_length)
        if "original_max_position_embeddings" in params:
            params["original_max_position_embeddings"] = int(trained_length)
    params.setdefault("rope_type", "default")
    params.setdefault("rope_theta", theta)
    config.rope_parameters = params
    return {**params, "max_position_embeddings": int(config.max_position_embeddings)}


def effective_rope(path: str | Path, rope_override: RopeScaling | None, trained_length: int | None) -> dict:
    """The rope settings a model will run with, from its config alone (nothing loaded)."""
    from transformers import AutoConfig

    return apply_rope_override(AutoConfig.from_pretrained(str(path)), rope_override, trained_length)


def require_gptq_runtime() -> None:
    for package in ("optimum", "gptqmodel"):
        try:
            importlib.import_module(package)
        except ImportError:
            raise DependencyError(f"loading a GPTQ folder needs optimum and gptqmodel, and {package} is not "
                                  f"importable; run `{GPTQ_EXTRA}`") from None


def _gptq_config(qcfg: dict, device: torch.device, shapes: tuple[int, ...]):
    from transformers import GPTQConfig

    group = int(qcfg.get("group_size", 128))
    kwargs = dict(bits=int(qcfg["bits"]), group_size=group, desc_act=bool(qcfg.get("desc_act", False)),
                  sym=bool(qcfg.get("sym", True)))
    # CPU kernels (and Marlin on GPU) need K % group_size == 0; the torch kernel handles the rest.
    if device.type == "cpu" or (group > 0 and any(k % group for k in shapes)):
        kwargs["backend"] = "gptq_torch"
    return GPTQConfig(**kwargs)


def read_device_map(spec: str | None):
    """'auto', a JSON file ({module: device} or {"device_map": {...}}), or None."""
    if spec is None or spec in ("auto", "balanced", "sequential"):
        return spec
    p = Path(spec)
    if not p.is_file():
        raise OptionError(f"--device-map {spec!r}: expected auto or a JSON file written by `solar-quant plan --device-map-out`")
    try:
        doc = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise OptionError(f"--device-map {p}: not valid JSON ({e})") from None
    doc = doc.get("device_map", doc) if isinstance(doc, dict) else doc
    if not isinstance(doc, dict) or not doc:
        raise OptionError(f"--device-map {p}: must hold an object of module name -> device")
    return doc


def load_model(path: str | Path, device: torch.device, dtype: torch.dtype, device_map=None,
               rope_override: RopeScaling | None = None, trained_length: int | None = None) -> LoadedModel:
    """Build the model in `path` for inference with the given rope settings; fp16, bnb or GPTQ."""
    from transformers import AutoConfig, AutoModelForCausalLM

    start = time.monotonic()
    reader = CheckpointReader(path)
    reader.require_llama()
    method = reader.quant_method
    config = AutoConfig.from_pretrained(str(path))
    rope = apply_rope_override(config, rope_override, trained_length)
    kwargs: dict = {"config": config, "dtype": dtype}
    notes = []
    if method == "gptq":
        require_gptq_runtime()
        kwargs["quantization_config"] = _gptq_config(reader.config["quantization_config"], device,
                                                     (config.hidden_size, config.intermediate_size))
    elif method not in (None, "bitsandbytes"):
        raise CheckpointError(f"{path}/config.json: quant_method {method!r} is not supported; "
                              "eval loads 16-bit, bitsandbytes and GPTQ folders")
    device_map = read_device_map(device_map)
    if device_map is not None:
        kwargs["device_map"] = device_map
    elif method is not None:
        kwargs["device_map"] = {"": str(device)}
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    except ImportError as e:
        hint = f"; run `{GPTQ_EXTRA}`" if method == "gptq" else ""
        raise DependencyError(f"{path}: cannot load ({str(e).splitlines()[0]}){hint}") from None
    if device_map is None and method is None:
        model.to(device)
    if method == "bitsandbytes" and device.type == "cpu":
        notes += _bnb_cpu_compute(model, dtype)
    model.eval()
    return LoadedModel(model, str(path), method, rope, time.monotonic() - start, notes)


BNB_CPU_KERNEL_ENV = "SOLAR_QUANT_BNB_CPU_KERNEL"  # auto (bitsandbytes decides) | generic


def bnb_cpu_kernel_allowed() -> bool:
    """Whether bitsandbytes' AVX-512-bf16 4-bit CPU path may run: the CPU has it and
    SOLAR_QUANT_BNB_CPU_KERNEL does not ask for the generic kernel (dequantize, then a plain
    matmul), which every x86-64 machine runs the same way."""
    choice = os.environ.get(BNB_CPU_KERNEL_ENV, "auto").strip().lower() or "auto"
    if choice not in ("auto", "generic"):
        raise OptionError(f"{BNB_CPU_KERNEL_ENV}={choice!r}: expected auto or generic")
    if choice == "generic":
        return False
    from bitsandbytes.functional import has_avx512bf16

    return bool(has_avx512bf16())


def _bnb_cpu_compute(model: torch.nn.Module, dtype: torch.dtype) -> list[str]:
    """On CPU run bnb 4-bit layers in the eval dtype (fp16 matmuls are slow there); weights unchanged.

    Returns notes for the report describing what runs differently from the folder's own settings,
    and which 4-bit kernel runs: bitsandbytes repacks weights for its AVX-512-bf16 kernel (bf16
    activations) where the CPU has it, and dequantizes them for a plain matmul elsewhere."""
    import bitsandbytes as bnb

    allowed = bnb_cpu_kernel_allowed()
    changed, unpacked, packed, generic, int8 = 0, 0, 0, 0, 0
    for module in model.modules():
        int8 += isinstance(module, bnb.nn.Linear8bitLt)
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        if module.compute_dtype != dtype:
            module.compute_dtype = dtype
            changed += 1
        # bnb 0.50's AVX512-bf16 repacking assumes in_features % blocksize == 0 and fails otherwise;
        # such layers keep the generic kernel (same weights, same math).
        state = getattr(module.weight, "quant_state", None)
        use = allowed and not (state is not None and module.in_features % state.blocksize)
        unpacked += allowed and not use
        module.support_avx512bf16_for_cpu = use
        packed += use
        generic += not use
    notes = [f"bnb 4-bit compute dtype set to {str(dtype).removeprefix('torch.')} on cpu"] if changed else []
    if int8:
        notes.append("bnb int8 layers cast their inputs to float16 for the int8 matmul (as bitsandbytes does)")
    if unpacked:
        notes.append(f"{unpacked} bnb 4-bit layer(s) with in_features not a multiple of the blocksize use the generic cpu kernel")
    if packed or generic:
        notes.append(bnb_kernel_note(packed, generic))
    return notes


def bnb_kernel_note(packed: int, generic: int) -> str:
    """The report's line naming the 4-bit CPU kernels that ran (numbers differ slightly between them)."""
    parts = ([f"AVX-512-bf16 (bf16 activations) on {packed} layer(s)"] if packed else []) + \
        ([f"generic (dequantize + matmul) on {generic} layer(s)"] if generic else [])
    return "bnb 4-bit cpu kernel: " + ", ".join(parts)


def release() -> None:
    """Return a dropped model's memory before the next one loads (callers drop their references first)."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
