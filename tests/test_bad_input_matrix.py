"""The bad-input matrix: one row per way a user can hand solar-quant something unusable.

Every row asserts: exit code != 0, exactly one `solar-quant: error:` line that names the
file, tensor, field or flag at fault, no traceback, nothing under the output name (nor a
staging folder), and the source folder byte-for-byte unchanged.

Rows run the real Typer app in-process (an unhandled exception would surface as a traceback
in the captured stderr); the disk and permission rows run a real subprocess, because they
depend on the kernel refusing a write.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch

from conftest import ROOT, assert_clean_failure, cli, tree_digest


def invoke(*args) -> subprocess.CompletedProcess:
    """Run the CLI app in this process; an escaped exception is appended to stderr as a traceback."""
    from typer.testing import CliRunner

    from solar_quant.cli.app import app

    result = CliRunner().invoke(app, [str(a) for a in args], env={"SOLAR_QUANT_QUIET": "1", "HF_HUB_OFFLINE": "1"})
    stderr = result.stderr
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        stderr += "\nTraceback (escaped the CLI):\n" + "".join(traceback.format_exception(result.exception))
    return subprocess.CompletedProcess(args, result.exit_code, result.stdout, stderr)


# -- broken copies of the tiny model ----------------------------------------------------------
def _shard_of(src: Path, name: str) -> Path:
    from solar_quant.checkpoint.reader import CheckpointReader

    return src / CheckpointReader(src).info(name).shard


def _rewrite_tensor(src: Path, name: str, change) -> Path:
    """Replace tensor `name` in its shard by change(tensor); returns the shard."""
    from safetensors.torch import load_file, save_file

    shard = _shard_of(src, name)
    tensors = load_file(str(shard))
    tensors[name] = change(tensors[name])
    save_file(tensors, str(shard), metadata={"format": "pt"})
    return shard


def _rewrite_header(shard: Path, change) -> None:
    """Edit the JSON header of `shard` in place, keeping its data section."""
    raw = shard.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    change(header)
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    shard.write_bytes(len(new).to_bytes(8, "little") + new + raw[8 + n:])


def _edit_config(src: Path, **changes) -> None:
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(changes)
    (src / "config.json").write_text(json.dumps(cfg))


W = "model.layers.1.mlp.up_proj.weight"
RTN = ("--method", "rtn", "--group-size", "32")


def case_config_missing(src, tmp):
    (src / "config.json").unlink()
    return ("quantize", src, tmp / "out", *RTN), ("config.json", str(src))


def case_config_garbled(src, tmp):
    (src / "config.json").write_text('{"model_type": "llama", ')
    return ("quantize", src, tmp / "out", "--method", "bnb-nf4"), ("config.json", "not valid JSON")


def case_config_field_missing(src, tmp):
    cfg = json.loads((src / "config.json").read_text())
    del cfg["num_hidden_layers"]
    (src / "config.json").write_text(json.dumps(cfg))
    return ("quantize", src, tmp / "out", *RTN), ("config.json", "num_hidden_layers")


def case_not_llama(src, tmp):
    _edit_config(src, model_type="mistral", architectures=["MistralForCausalLM"])
    return ("quantize", src, tmp / "out", *RTN), ("config.json", "mistral", "Llama")


def case_index_names_missing_shard(src, tmp):
    shard = _shard_of(src, W)
    shard.unlink()
    return ("quantize", src, tmp / "out", "--method", "bnb-int8"), ("model.safetensors.index.json", shard.name)


def case_truncated_shard(src, tmp):
    shard = _shard_of(src, W)
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    return ("quantize", src, tmp / "out", *RTN), (shard.name, "truncated")


def case_header_offsets_disagree_with_shape(src, tmp):
    shard = _shard_of(src, W)
    _rewrite_header(shard, lambda h: h[W]["data_offsets"].__setitem__(1, h[W]["data_offsets"][1] - 2))
    return ("quantize", src, tmp / "out", "--method", "bnb-nf4"), (shard.name, W, "offsets")


def case_header_claims_more_data_than_the_file(src, tmp):
    shard = _shard_of(src, W)

    def grow(h):  # the shard's last tensor claims 64x its rows
        last = max((k for k in h if k != "__metadata__"), key=lambda k: h[k]["data_offsets"][1])
        begin, end = h[last]["data_offsets"]
        h[last]["shape"][0] *= 64
        h[last]["data_offsets"] = [begin, begin + (end - begin) * 64]
    _rewrite_header(shard, grow)
    return ("quantize", src, tmp / "out", *RTN), (shard.name, "truncated")


def case_header_overlapping_tensors(src, tmp):
    shard = _shard_of(src, W)

    def overlap(h):
        other = next(k for k in h if k not in (W, "__metadata__") and h[k]["shape"] == h[W]["shape"])
        h[other]["data_offsets"] = list(h[W]["data_offsets"])
    _rewrite_header(shard, overlap)
    return ("quantize", src, tmp / "out", *RTN), (shard.name, "overlaps")


def _int32(t):
    return (t.float() * 1000).to(torch.int32)


def case_wrong_dtype_gptq(src, tmp):
    _rewrite_tensor(src, W, _int32)
    return ("quantize", src, tmp / "out", *RTN), (W, "I32", "float16")


def case_wrong_dtype_bnb(src, tmp):
    _rewrite_tensor(src, W, _int32)
    return ("quantize", src, tmp / "out", "--method", "bnb-nf4"), (W, "I32")


def case_shape_mismatch_gptq(src, tmp):
    _edit_config(src, intermediate_size=192)
    return ("quantize", src, tmp / "out", *RTN), ("model.layers.0.mlp.gate_proj.weight", "[160, 64]", "[192, 64]")


def case_shape_mismatch_bnb(src, tmp):
    _edit_config(src, num_key_value_heads=4)
    return ("quantize", src, tmp / "out", "--method", "bnb-int8"), ("model.layers.0.self_attn.k_proj.weight", "config.json")


def _poison(value):
    def change(t):
        t = t.clone()
        t.view(-1)[7] = value
        return t
    return change


def case_nan_weight_gptq(src, tmp):
    _rewrite_tensor(src, W, _poison(float("nan")))
    return ("quantize", src, tmp / "out", *RTN), (W, "NaN")


def case_inf_norm_gptq(src, tmp):
    name = "model.layers.0.post_attention_layernorm.weight"
    _rewrite_tensor(src, name, _poison(float("inf")))
    return ("quantize", src, tmp / "out", *RTN), (name, "Inf")


def case_nan_embedding_bnb(src, tmp):
    name = "model.embed_tokens.weight"
    _rewrite_tensor(src, name, _poison(float("nan")))
    return ("quantize", src, tmp / "out", "--method", "bnb-int8"), (name, "NaN")


def case_source_already_bnb(src, tmp):
    from solar_quant.options import BnbOptions, OutputOptions
    from solar_quant.pipeline.bnb import build_bnb_variant

    q = build_bnb_variant(src, tmp / "nf4", BnbOptions(method="bnb-nf4"), OutputOptions(), log=lambda m: None)
    return ("quantize", q, tmp / "out", *RTN), ("already quantized", "bitsandbytes")


def case_source_already_gptq(src, tmp):
    from solar_quant.options import GptqOptions, OutputOptions
    from solar_quant.pipeline.gptq import build_gptq_variant

    q = build_gptq_variant(src, tmp / "rtn", GptqOptions(method="rtn", group_size=32), None, OutputOptions(),
                           log=lambda m: None)
    return ("quantize", q, tmp / "out", "--method", "bnb-int8"), ("already quantized", "gptq")


def case_source_is_a_file(src, tmp):
    return ("quantize", src / "config.json", tmp / "out", *RTN), ("config.json", "not a folder")


# -- options ----------------------------------------------------------------------------------
def _option(*flags, method=RTN, needles):
    def case(src, tmp):
        return ("quantize", src, tmp / "out", *method, *flags), needles
    return case


GPTQ = ("--method", "gptq", "--group-size", "32")


# -- output locations -------------------------------------------------------------------------
def case_output_is_the_source(src, tmp):
    return ("quantize", src, src, *RTN, "--overwrite"), ("inside the source",)


def case_output_inside_the_source(src, tmp):
    return ("quantize", src, src / "nf4", "--method", "bnb-nf4"), ("inside the source",)


def case_output_exists(src, tmp):
    (tmp / "out").mkdir()
    (tmp / "out" / "keep.txt").write_text("mine")
    return ("quantize", src, tmp / "out", *RTN), (str(tmp / "out"), "--overwrite")


def case_output_under_a_regular_file(src, tmp):
    """The parent of OUT is a file: fails for root too (permission bits would not)."""
    (tmp / "afile").write_text("x")
    return ("quantize", src, tmp / "afile" / "out", "--method", "bnb-int8"), ("afile", "Not a directory")


# -- calibration --------------------------------------------------------------------------------
def _jsonl(tmp: Path, lines: list[str]) -> Path:
    path = tmp / "calib.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


ORCA = json.dumps({"question": "What is two plus two?", "response": "Four, because two and two make four."})


def case_calibration_jsonl_malformed_line(src, tmp):
    path = _jsonl(tmp, [ORCA, ORCA, '{"question": "unterminated'])
    return ("calibrate", "--model", src, "--out", tmp / "out", "--source", path), ("calib.jsonl:3", "malformed JSON")


def case_calibration_jsonl_missing_field(src, tmp):
    path = _jsonl(tmp, [ORCA, json.dumps({"question": "no answer here"})])
    return ("calibrate", "--model", src, "--out", tmp / "out", "--source", path), ("calib.jsonl:2", "'response'")


def case_calibration_jsonl_wrong_type(src, tmp):
    path = _jsonl(tmp, [ORCA, json.dumps({"question": 7, "response": "x"})])
    return ("quantize", src, tmp / "out", *GPTQ, "--source", path), ("calib.jsonl:2", "'question'", "string")


def case_calibration_not_an_artifact(src, tmp):
    (tmp / "calib").mkdir()
    return ("quantize", src, tmp / "out", *GPTQ, "--calibration", tmp / "calib"), ("calib", "not a calibration artifact")


def case_calibration_from_another_tokenizer(src, tmp):
    """An artifact built by `calibrate` for a model whose tokenizer differs in one vocabulary entry."""
    other = Path(shutil.copytree(src, tmp / "other"))
    tok = json.loads((other / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = [k for k, v in vocab.items() if v in (1000, 1001)]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (other / "tokenizer.json").write_text(json.dumps(tok))
    made = invoke("calibrate", "--model", other, "--out", tmp / "calib", "--nsamples", "2", "--seqlen", "16")
    assert made.returncode == 0, made.stderr
    return ("quantize", src, tmp / "out", *GPTQ, "--calibration", tmp / "calib"), ("tokenizer", "sha256 differs")


def case_calibration_ids_modified(src, tmp):
    from safetensors.torch import load_file, save_file

    made = invoke("calibrate", "--model", src, "--out", tmp / "calib", "--nsamples", "2", "--seqlen", "16")
    assert made.returncode == 0, made.stderr
    ids = load_file(str(tmp / "calib" / "calibration.safetensors"))["input_ids"]
    save_file({"input_ids": ids.flip(0).contiguous()}, str(tmp / "calib" / "calibration.safetensors"))
    return ("quantize", src, tmp / "out", *GPTQ, "--calibration", tmp / "calib"), ("calibration.safetensors", "sha256")


# -- eval -----------------------------------------------------------------------------------------
def case_eval_variant_of_another_vocabulary(src, tmp):
    from solar_quant.models.synthetic import llama_config, write_random_llama

    other = write_random_llama(tmp / "v32k", llama_config(vocab=32000), seed=1, tokenizer_from=src)
    return ("eval", src, other, "--out", tmp / "out", "--seqlen", "16"), ("v32k", "vocab_size 32000")


def case_eval_missing_variant(src, tmp):
    return ("eval", src, tmp / "nope", "--out", tmp / "out"), ("nope",)


def case_eval_bad_context(src, tmp):
    return ("eval", src, src, "--out", tmp / "out", "--context", "12x"), ("--context", "12x")


def case_verify_a_source_checkpoint_without_manifest(src, tmp):
    (src / "manifest.json").unlink()
    return ("verify", src), ("verify found", "manifest.json")


CASES = {
    "config-missing": case_config_missing,
    "config-garbled": case_config_garbled,
    "config-field-missing": case_config_field_missing,
    "not-llama": case_not_llama,
    "index-names-missing-shard": case_index_names_missing_shard,
    "truncated-shard": case_truncated_shard,
    "header-offsets-vs-shape": case_header_offsets_disagree_with_shape,
    "header-beyond-file": case_header_claims_more_data_than_the_file,
    "header-overlap": case_header_overlapping_tensors,
    "wrong-dtype-gptq": case_wrong_dtype_gptq,
    "wrong-dtype-bnb": case_wrong_dtype_bnb,
    "shape-mismatch-gptq": case_shape_mismatch_gptq,
    "shape-mismatch-bnb": case_shape_mismatch_bnb,
    "nan-weight-gptq": case_nan_weight_gptq,
    "inf-norm-gptq": case_inf_norm_gptq,
    "nan-embedding-bnb": case_nan_embedding_bnb,
    "source-already-bnb": case_source_already_bnb,
    "source-already-gptq": case_source_already_gptq,
    "source-is-a-file": case_source_is_a_file,
    "bits-5": _option("--bits", "5", needles=("--bits",)),
    "group-size-0": _option("--group-size", "0", needles=("--group-size",)),
    "damp-2": _option("--damp", "2", method=GPTQ, needles=("--damp",)),
    "mse-negative": _option("--mse", "-1", method=GPTQ, needles=("--mse",)),
    "nsamples-0": _option("--nsamples", "0", method=GPTQ, needles=("--nsamples",)),
    "seqlen-negative": _option("--seqlen", "-1", method=GPTQ, needles=("--seqlen",)),
    "shard-size-0": _option("--shard-size", "0", needles=("--shard-size",)),
    "shard-size-garbage": _option("--shard-size", "2 apples", method=("--method", "bnb-int8"), needles=("--shard-size",)),
    "rope-dynamic-0.5": _option("--rope-scaling", "dynamic:0.5", needles=("--rope-scaling", "> 1")),
    "rope-foo-2": _option("--rope-scaling", "foo:2", needles=("--rope-scaling", "foo:2")),
    "device-cuda": _option("--device", "cuda", needles=("--device", "CUDA")),
    "device-garbage": _option("--device", "tpu", needles=("--device", "tpu")),
    "device-garbage-bnb": _option("--device", "banana", method=("--method", "bnb-nf4"), needles=("--device", "banana")),
    "device-cuda-bnb": _option("--device", "cuda:7", method=("--method", "bnb-int8"), needles=("--device cuda:7",)),
    "method-unknown": _option(method=("--method", "quip-sharp"), needles=("--method", "quip-sharp")),
    "double-quant-int8": _option("--double-quant", method=("--method", "bnb-int8"), needles=("--double-quant",)),
    "skip-modules-bad-regex": _option("--skip-modules", "lm_head(", method=("--method", "bnb-nf4"),
                                      needles=("--skip-modules",)),
    "output-is-source": case_output_is_the_source,
    "output-inside-source": case_output_inside_the_source,
    "output-exists": case_output_exists,
    "output-under-a-file": case_output_under_a_regular_file,
    "calib-jsonl-malformed": case_calibration_jsonl_malformed_line,
    "calib-jsonl-missing-field": case_calibration_jsonl_missing_field,
    "calib-jsonl-wrong-type": case_calibration_jsonl_wrong_type,
    "calib-not-an-artifact": case_calibration_not_an_artifact,
    "calib-other-tokenizer": case_calibration_from_another_tokenizer,
    "calib-ids-modified": case_calibration_ids_modified,
    "eval-other-vocab": case_eval_variant_of_another_vocabulary,
    "eval-missing-variant": case_eval_missing_variant,
    "eval-bad-context": case_eval_bad_context,
    "verify-no-manifest": case_verify_a_source_checkpoint_without_manifest,
}

if torch.cuda.is_available():  # the row proves the refusal on a machine without CUDA
    del CASES["device-cuda"]
if torch.cuda.device_count() > 7:
    del CASES["device-cuda-bnb"]


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(case, tiny_llama, tmp_path):
    src = Path(shutil.copytree(tiny_llama, tmp_path / "src"))
    work = tmp_path / "work"
    work.mkdir()
    args, needles = CASES[case](src, work)
    before = tree_digest(src)
    existing = sorted(p.name for p in work.iterdir())
    proc = invoke(*args)
    assert_clean_failure(proc, *needles)
    assert tree_digest(src) == before
    assert sorted(p.name for p in work.iterdir()) == existing  # no OUT, no .OUT.partial


# -- the kernel refuses the write: real subprocesses ---------------------------------------------
def _quantize_with_file_limit(kib: int, src, out, flags: str):
    """`solar-quant quantize SRC OUT FLAGS` in a shell whose writes fail past `kib` KiB (`ulimit -f`)."""
    script = f"ulimit -f {kib}; exec {sys.executable} -m solar_quant quantize {src} {out} {flags}"
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env={"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "SOLAR_QUANT_QUIET": "1",
                               "PATH": "/usr/bin:/bin"})


def test_full_disk_file_size_limit(tiny_llama, tmp_path):
    """`ulimit -f` makes every write past 1 MiB fail with EFBIG, as a full disk fails with ENOSPC
    (Python ignores SIGXFSZ, so the write returns the error). Real ENOSPC on a tmpfs is tested in
    tests/test_bnb_variant.py::test_disk_full_on_a_real_tiny_filesystem."""
    before = tree_digest(tiny_llama)
    proc = _quantize_with_file_limit(1024, tiny_llama, tmp_path / "out", "--method rtn --group-size 32")
    assert_clean_failure(proc, "File too large", "free disk space")
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # the embeddings alone pass 1 MiB: no job yet
    assert tree_digest(tiny_llama) == before


def test_full_disk_after_a_saved_layer_keeps_the_job(tiny_llama, tmp_path):
    """Past the first saved layer a GPTQ/RTN job is kept, and the message says to --resume."""
    proc = _quantize_with_file_limit(6200, tiny_llama, tmp_path / "out", "--method rtn --group-size 32 --shard-size 1GB")
    assert_clean_failure(proc, "File too large", "--resume")
    assert not (tmp_path / "out").exists() and (tmp_path / ".out.partial" / ".job" / "job.json").is_file()
    cli("quantize", tiny_llama, tmp_path / "out", "--method", "rtn", "--group-size", "32", "--shard-size", "1GB",
        "--resume", check=True, env={"SOLAR_QUANT_QUIET": "1"})
    assert not (tmp_path / ".out.partial").exists() and (tmp_path / "out" / "manifest.json").is_file()


def test_read_only_output_folder(tiny_llama, tmp_path):
    """Tests run as root, which ignores permission bits: an immutable folder (chattr +i) refuses root."""
    parent = tmp_path / "ro"
    parent.mkdir()
    if subprocess.run(["chattr", "+i", str(parent)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not supported on this filesystem or without CAP_LINUX_IMMUTABLE")
    try:
        proc = cli("quantize", tiny_llama, parent / "out", "--method", "bnb-int8", env={"SOLAR_QUANT_QUIET": "1"})
        assert_clean_failure(proc, str(parent / ".out.partial"), "cannot write")
        assert list(parent.iterdir()) == []
    finally:
        subprocess.run(["chattr", "-i", str(parent)], check=True)


# -- recipes (the `run` verb is wired separately; its parser is tested here) -------------------------
RECIPE = """
name = "r"
[model]
demo = true
[[variants]]
name = "nf4"
quantize = {{ method = "bnb-nf4" }}
{extra}
"""


@pytest.mark.parametrize("extra,needles", [
    ("colour = 'blue'", ("unknown key", "variants.0.colour")),
    ("[eval]\nseqlen = 512\nmax_ppl = 1.1", ("unknown key", "eval.max_ppl")),
    ("[eval]\nseqlen = 512\nmax_kl = 1.1", ("unknown key 'eval.max_kl'", "did you mean 'eval.max_kld'?")),
    ("shard_size = '0'", ("shard_size",)),
    ("rope_scaling = 'dynamic:0.5'", ("rope_scaling",)),
    ("quantize = 3", ("recipe.toml",)),
])
def test_recipe_with_bad_keys(tmp_path, extra, needles):
    from solar_quant.errors import InputError
    from solar_quant.recipe import load_recipe

    path = tmp_path / "recipe.toml"
    path.write_text(RECIPE.format(extra=extra))
    with pytest.raises(InputError) as info:
        load_recipe(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    for needle in needles:
        assert needle in message, message


def test_recipe_unknown_gptq_option(tmp_path):
    from solar_quant.errors import InputError
    from solar_quant.recipe import load_recipe

    path = tmp_path / "recipe.toml"
    path.write_text(RECIPE.format(extra="").replace('method = "bnb-nf4"', 'method = "gptq", bitz = 4'))
    with pytest.raises(InputError, match="unknown key 'variants.0.quantize.bitz'"):
        load_recipe(path)
