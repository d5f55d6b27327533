"""Load a baseline or variant folder (fp16, bitsandbytes or GPTQ) for scoring, one at a time.

Rope settings are applied to the config before the model is built: `rope_override` replaces
the model's own rope type, and `trained_length` lowers `max_position_embeddings` so a small
model's dynamic NTK scaling starts where a short training window would have ended.
"""

from __future__ import annotations

import hashlib
import importlib  # noqa: F401 - the format entries' runtime checks import through importlib; tests patch it here
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from solar_quant.checkpoint.reader import CheckpointReader
from solar_quant.errors import CheckpointError, DependencyError, InputError, OptionError
from solar_quant.rope import STATIC_NTK, RopeScaling, rope_theta, static_ntk_base

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
    elif rope_override is not None and rope_override.kind == STATIC_NTK:  # vLLM's static base, as a plain rope
        dim = int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)
        params = {"rope_type": "default", "rope_theta": static_ntk_base(theta, float(rope_override.factor), dim)}
    if trained_length is not None:
        config.max_position_embeddings = int(trained_length)
        if "original_max_position_embeddings" in params:
            params["original_max_position_embeddings"] = int(trained_length)
    params.setdefault("rope_type", "default")
    params.setdefault("rope_theta", theta)
    config.rope_parameters = params
    out = {**params, "max_position_embeddings": int(config.max_position_embeddings)}
    if rope_override is not None and rope_override.kind == STATIC_NTK:
        out["emulates"] = f"vLLM dynamic NTK x{rope_override.factor:g} (static base from rope_theta {theta:g})"
    return out


def effective_rope(path: str | Path, rope_override: RopeScaling | None, trained_length: int | None) -> dict:
    """The rope settings a model will run with, from its config alone (nothing loaded)."""
    from transformers import AutoConfig

    return apply_rope_override(AutoConfig.from_pretrained(str(path)), rope_override, trained_length)


def require_runtime(path: str | Path) -> None:
    """Raise DependencyError when the packages that load the folder's format are missing."""
    fmt = _format(CheckpointReader(path))
    if fmt.require_runtime is not None:
        fmt.require_runtime()


def _format(reader: CheckpointReader):
    from solar_quant import registry

    fmt = registry.format_of_config(reader.config.get("quantization_config"))
    if fmt is None:
        names = ", ".join(registry.formats())
        raise CheckpointError(f"{reader.path}/config.json: quant_method {reader.quant_method!r} is not supported; "
                              f"eval loads these formats: {names}")
    return fmt


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


LOAD_QUANTIZED = ("int8", "nf4")


def load_model(path: str | Path, device: torch.device, dtype: torch.dtype, device_map=None,
               rope_override: RopeScaling | None = None, trained_length: int | None = None,
               quantize_on_load: str | None = None) -> LoadedModel:
    """Build the model in `path` for inference with the given rope settings; its format entry gives the load arguments.

    `quantize_on_load` ("int8" or "nf4") quantizes a 16-bit folder with bitsandbytes while it
    loads (transformers' `BitsAndBytesConfig`), as the seed's `load_in_8bit=True` did."""
    from transformers import AutoConfig, AutoModelForCausalLM

    start = time.monotonic()
    reader = CheckpointReader(path)
    reader.require_llama()
    method = reader.quant_method
    fmt = _format(reader)
    config = AutoConfig.from_pretrained(str(path))
    rope = apply_rope_override(config, rope_override, trained_length)
    kwargs: dict = {"config": config, "dtype": dtype}
    notes = []
    if quantize_on_load is not None:
        if fmt.quantized:
            raise OptionError(f"{path}: already quantized ({method}); --load-in-8bit/--load-in-4bit apply to 16-bit folders only")
        kwargs["quantization_config"] = _bnb_on_load(quantize_on_load, dtype)
        from solar_quant import registry

        method, fmt = "bitsandbytes", registry.format_entry("bitsandbytes")  # loads and runs as a bitsandbytes folder
    elif fmt.load_kwargs is not None:
        kwargs.update(fmt.load_kwargs(reader.config["quantization_config"], device, config))
    device_map = read_device_map(device_map)
    if device_map is not None:
        kwargs["device_map"] = device_map
    elif fmt.quantized:
        kwargs["device_map"] = {"": str(device)}
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    except ImportError as e:
        raise DependencyError(f"{path}: cannot load ({str(e).splitlines()[0]}){fmt.install_hint}") from None
    if device_map is None and not fmt.quantized:
        model.to(device)
    if fmt.after_load is not None:
        notes += fmt.after_load(model, device, dtype)
    model.eval()
    return LoadedModel(model, str(path), method, rope, time.monotonic() - start, notes)


def _bnb_on_load(kind: str, dtype: torch.dtype):
    from transformers import BitsAndBytesConfig

    if kind == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    if kind == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    raise OptionError(f"quantize on load {kind!r}: expected one of {', '.join(LOAD_QUANTIZED)}")


def release() -> None:
    """Return a dropped model's memory before the next one loads (callers drop their references first)."""
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
