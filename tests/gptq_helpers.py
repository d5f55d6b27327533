"""Helpers shared by the GPTQ tests: synthetic weights and correlated activations, calibration
from local text, truncated copies of a checkpoint, and the fp32 reference model built from a GPTQ
folder's own tensors."""

from __future__ import annotations

import importlib
import inspect
import json
from pathlib import Path

import torch

# Calibration and held-out text: the docstrings of standard-library modules (English prose
# with some code; present wherever Python is, so no test reaches a network).
CALIB_MODULES = ("subprocess", "argparse", "json", "logging", "collections", "threading", "asyncio", "email",
                 "http.client", "unittest", "decimal", "fractions")
HELDOUT_MODULES = ("datetime", "pathlib", "tarfile", "zipfile", "shutil", "random", "statistics", "textwrap")


def synthetic_inputs(rows: int, columns: int, seed: int = 0) -> torch.Tensor:
    """Activations with correlated features and unequal scales, like a transformer's."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(columns, columns, generator=g) * 0.3 + torch.eye(columns)
    feature_scale = torch.exp(torch.randn(columns, generator=g) * 0.5)
    return (torch.randn(rows, columns, generator=g) @ mixing) * feature_scale


def synthetic_weight(rows: int, columns: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(rows, columns, generator=torch.Generator().manual_seed(seed)) * 0.05


def stdlib_text(modules=CALIB_MODULES) -> str:
    docs = []
    for m in modules:
        mod = importlib.import_module(m)
        for obj in [mod] + [o for n, o in sorted(vars(mod).items()) if not n.startswith("_")]:
            if obj is mod or getattr(obj, "__module__", None) == m:
                doc = inspect.getdoc(obj)
                if doc and len(doc) > 200:
                    docs.append(doc)
    return "\n\n".join(docs)


def text_ids(model_path: Path, modules=CALIB_MODULES) -> torch.Tensor:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_path))
    return torch.tensor(tok(stdlib_text(modules))["input_ids"], dtype=torch.int64)


def text_calibration(model_path: Path, nsamples: int, seqlen: int):
    """`nsamples` consecutive windows of `seqlen` tokens of the calibration text."""
    from solar_quant.calibration.artifact import CalibrationSet
    from solar_quant.calibration.artifact import tokenizer_identity

    ids = text_ids(model_path)[: nsamples * seqlen].reshape(nsamples, seqlen)
    return CalibrationSet(ids, {"tokenizer": tokenizer_identity(model_path), "source": "stdlib docstrings"})


def random_calibration(nsamples: int, seqlen: int, vocab: int, model_path: Path | None = None, seed: int = 0):
    from solar_quant.calibration.artifact import CalibrationSet
    from solar_quant.calibration.artifact import tokenizer_identity

    ids = torch.randint(0, vocab, (nsamples, seqlen), generator=torch.Generator().manual_seed(seed))
    card = {"tokenizer": tokenizer_identity(model_path)} if model_path is not None else {}
    return CalibrationSet(ids, card)


def truncated_copy(src: Path, dst: Path, layers: int) -> Path:
    """The first `layers` decoder layers of `src` (plus embeddings, norm, tokenizer) as a new fp16 folder."""
    from solar_quant.checkpoint.reader import CheckpointReader
    from solar_quant.checkpoint.writer import ShardedWriter, StagedFolder
    from solar_quant.variant import SIDE_FILES

    reader = CheckpointReader(src)
    staged = StagedFolder(dst, overwrite=True)
    writer = ShardedWriter(staged.staging, 64 * 1024**2)
    for name in reader.tensors:
        if name.startswith("model.layers.") and int(name.split(".")[2]) >= layers:
            continue
        writer.add(name, reader.get(name))
    writer.close()
    staged.write_json("config.json", {**reader.config, "num_hidden_layers": layers})
    for name in SIDE_FILES:
        if (Path(src) / name).is_file():
            staged.path(name).write_bytes((Path(src) / name).read_bytes())
    return staged.commit()


def dequantized_reference(folder: Path, dtype=torch.float32):
    """An ordinary LlamaForCausalLM whose linears hold `gptq_v1.dequantize` of the folder's tensors."""
    from safetensors import safe_open
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from solar_quant.formats.gptq_v1 import dequantize

    cfg = json.loads((folder / "config.json").read_text())
    bits = cfg["quantization_config"]["bits"]
    cfg.pop("quantization_config")
    tensors = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    state = {}
    for name in list(tensors):
        if name.endswith(".qweight"):
            base = name[: -len(".qweight")]
            parts = {k: tensors[f"{base}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx")}
            state[base + ".weight"] = dequantize(parts, bits).to(dtype)
        elif not name.endswith((".qzeros", ".scales", ".g_idx")):
            state[name] = tensors[name].to(dtype)
    config = LlamaConfig(**cfg)
    with torch.device("meta"):  # no random initialisation: every weight comes from the folder
        model = LlamaForCausalLM(config)
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    model.model.rotary_emb = LlamaRotaryEmbedding(config)  # its buffers are not in the state dict
    return model.eval()


QUIET = {"SOLAR_QUANT_QUIET": "1"}


def assert_resume_is_byte_identical(src: Path, tmp_path: Path, *flags: str) -> tuple[tuple, Path]:
    """`quantize SRC --method gptq FLAGS` stopped after layer 0 (SIGTERM) and resumed writes the
    folder of an uninterrupted run. Returns (the quantize arguments without OUT, the calibration
    folder) for further checks on the staging folder `tmp_path / ".q.partial"` (resumed: gone)."""
    from conftest import cli, tree_digest

    calib = tmp_path / "calib"
    cli("calibrate", "--model", src, "--out", calib, "--nsamples", "4", "--seqlen", "32", check=True)
    args = ("quantize", src, "--method", "gptq", *flags, "--calibration", calib, "--checkpoint-every", "0")
    cli(*args, tmp_path / "whole", check=True, env=QUIET)
    stopped = cli(*args, tmp_path / "q", env={**QUIET, "SOLAR_QUANT_STOP_AFTER_LAYER": "0:term"})
    assert stopped.returncode != 0 and not (tmp_path / "q").exists()
    cli(*args, tmp_path / "q", "--resume", check=True, env=QUIET)
    assert tree_digest(tmp_path / "q") == tree_digest(tmp_path / "whole")
    return args, calib


def assert_quantize_refused(src: Path, tmp_path: Path, flags: tuple, needles: tuple) -> None:
    """A small quantize with FLAGS fails in one line naming every needle, leaving nothing behind."""
    from conftest import assert_clean_failure, cli

    out = tmp_path / "q"
    proc = cli("quantize", src, out, "--bits", "4", "--group-size", "32", "--nsamples", "2", "--seqlen", "16",
               *flags, env=QUIET)
    assert_clean_failure(proc, *needles)
    assert not out.exists() and not list(tmp_path.glob(".q*"))
