"""How to load a GPTQ folder with transformers so that a working kernel runs it.

transformers (through optimum + GPTQModel) picks a kernel by itself. On CPU it picks
GPTQModel's `TorchAtenLinear` for 4-bit, which fails at the first forward when the group
size does not divide a linear's inputs (SmolLM2: K=576, G=128); `backend="gptq_torch"`
handles partial groups everywhere. Eval, verify and the tests all load through
`from_pretrained_kwargs`, so they pick the same working kernel.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import sys
from pathlib import Path

from solar_quant.architecture import LlamaShape

SAFE_BACKEND = "gptq_torch"
RUNTIME_PACKAGES = ("optimum", "gptqmodel")


def import_gptq_runtime() -> None:
    """Import optimum and GPTQModel the way the rest of the process expects: GPTQModel prints a
    banner and INFO lines to stdout on import and sets environment variables for itself
    (PYTORCH_ALLOC_CONF, CUDA_DEVICE_ORDER, TORCHINDUCTOR_CACHE_DIR, KMP_DUPLICATE_LIB_OK, and
    through tokenicer HF_HOME / HF_HUB_CACHE / TRANSFORMERS_CACHE pointing into /tmp). Its
    printing goes to stderr (held back by the CLI unless --verbose) and `os.environ` is put back
    exactly as it was. Raises ImportError like `import gptqmodel` would."""
    before = dict(os.environ)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            for name in RUNTIME_PACKAGES:
                importlib.import_module(name)
    finally:
        restore_environ(before)


def restore_environ(before: dict[str, str]) -> None:
    """Make `os.environ` equal `before` again (added keys removed, changed ones reset)."""
    for key in [k for k in os.environ if k not in before]:
        del os.environ[key]
    for key, value in before.items():
        if os.environ.get(key) != value:
            os.environ[key] = value


def gptq_settings(path: str | Path) -> dict | None:
    """The folder's GPTQ `quantization_config`, or None when it is not a GPTQ folder."""
    cfg = json.loads((Path(path) / "config.json").read_text())
    q = cfg.get("quantization_config")
    return q if isinstance(q, dict) and q.get("quant_method") == "gptq" else None


def partial_group_linears(path: str | Path) -> dict[str, int]:
    """Per-layer linear name -> K for every linear whose inputs K the group size does not divide."""
    cfg = json.loads((Path(path) / "config.json").read_text())
    q = gptq_settings(path) or {}
    G = int(q.get("group_size", -1))
    if G <= 0:
        return {}
    return {name: k for name, (_, k) in LlamaShape.from_config(cfg).linear_shapes().items() if k % G}


def from_pretrained_kwargs(path: str | Path) -> dict:
    """Extra keyword arguments for `AutoModelForCausalLM.from_pretrained(path, ...)`.

    Empty for non-GPTQ folders and for GPTQ folders every kernel can run; otherwise a
    `GPTQConfig` naming the `gptq_torch` backend."""
    q = gptq_settings(path)
    if q is None or not partial_group_linears(path):
        return {}
    from transformers import GPTQConfig

    return {"quantization_config": GPTQConfig(bits=int(q["bits"]), group_size=int(q["group_size"]),
                                              desc_act=bool(q.get("desc_act", False)), sym=bool(q.get("sym", True)),
                                              backend=SAFE_BACKEND)}


def dequantize_once(model) -> list[str]:
    """On CPU, let each GPTQ linear dequantize its weight once and keep it, instead of on every forward.

    GPTQModel's torch kernel wraps every layer's `dequantize_weight` in its own `torch.compile`
    (a bound method per instance): dynamo compiles the first 8 (a C++ build each on the CPU), then
    hits its recompile limit, warns, and runs the rest eagerly, and every forward dequantizes all
    weights again. The kernel's own weight cache keeps the tensor its dequantization returns, so
    the logits are the same bits; the cost is a dense copy of the linears in the compute dtype
    (`evaluate.memory.dequantized_cache_bytes` counts it)."""
    count = 0
    for module in model.modules():
        if not (callable(getattr(module, "enable_weight_cache", None)) and hasattr(module, "qweight")):
            continue
        module.__dict__.pop("dequantize_weight", None)  # the per-instance compiled wrapper; the class method stays
        module.enable_weight_cache(True)
        count += 1
    return [f"{count} GPTQ linear(s) on cpu dequantize once and keep the result (same logits; no per-layer "
            "torch.compile)"] if count else []
