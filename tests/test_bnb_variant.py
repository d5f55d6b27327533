"""bitsandbytes variants end to end: the streamed folder equals transformers' own
load-quantize-save output tensor for tensor, loads with plain `from_pretrained`, gives the
same logits as transformers' quantized model, carries rope settings, and leaves the source
untouched."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from solar_quant.checkpoint.manifest import check_manifest
from solar_quant.checkpoint.reader import CheckpointReader
from solar_quant.options import BnbOptions, OutputOptions
from solar_quant.pipeline.bnb import build_bnb_variant
from tests.conftest import assert_clean_failure, cli, tree_digest

# method key -> (our options, BitsAndBytesConfig kwargs that describe the same quantization)
METHODS = {
    "int8": (dict(method="bnb-int8"), dict(load_in_8bit=True, bnb_4bit_compute_dtype="float16")),
    "nf4": (dict(method="bnb-nf4"), dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype="float16")),
    "nf4-dq": (dict(method="bnb-nf4", double_quant=True),
               dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                    bnb_4bit_compute_dtype="float16")),
    "fp4": (dict(method="bnb-fp4"), dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_compute_dtype="float16")),
}


def _bnb_config(key: str):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(**METHODS[key][1])


def _transformers_quantized(src: Path, key: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(src, quantization_config=_bnb_config(key), dtype=torch.float16)


def _ours(src: Path, out: Path, key: str, **output) -> Path:
    return build_bnb_variant(src, out, BnbOptions(**METHODS[key][0]), OutputOptions(**output), log=lambda _: None)


def _all_tensors(folder: Path) -> dict[str, torch.Tensor]:
    reader = CheckpointReader(folder)
    return {name: reader.get(name) for name in reader.tensors}


def _assert_same_checkpoint(ours: Path, theirs: Path) -> None:
    a, b = _all_tensors(ours), _all_tensors(theirs)
    assert set(a) == set(b), sorted(set(a) ^ set(b))
    for name in b:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert torch.equal(a[name].reshape(-1).view(torch.uint8), b[name].reshape(-1).view(torch.uint8)), name
    qa = json.loads((ours / "config.json").read_text())["quantization_config"]
    qb = json.loads((theirs / "config.json").read_text())["quantization_config"]
    assert qa == qb


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


def _ids(n: int, vocab: int = 49152, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def tiny64(tmp_path_factory, demo_model) -> Path:
    """tiny_llama's shape with intermediate 192: bitsandbytes' CPU 4-bit kernel (AVX512-BF16
    machines) needs every Linear's in_features to be a multiple of its block size 64."""
    from solar_quant.models.synthetic import llama_config, write_random_llama

    path = tmp_path_factory.mktemp("tiny64") / "tiny64"
    return write_random_llama(path, llama_config(intermediate=192), seed=1, shard_bytes=1024 * 1024,
                              tokenizer_from=demo_model)


@pytest.mark.parametrize("key", list(METHODS))
def test_streamed_folder_equals_transformers_save_pretrained(tiny_llama, tmp_path, key):
    before = tree_digest(tiny_llama)
    ours = _ours(tiny_llama, tmp_path / "ours", key, shard_size=3 * 1024 * 1024)
    _transformers_quantized(tiny_llama, key).save_pretrained(tmp_path / "theirs")
    _assert_same_checkpoint(ours, tmp_path / "theirs")
    assert len(CheckpointReader(ours).shards) > 1  # streamed across several shards
    assert check_manifest(ours) == []
    assert tree_digest(tiny_llama) == before


@pytest.mark.parametrize("key", list(METHODS))
def test_plain_from_pretrained_gives_transformers_logits(tiny64, tmp_path, key):
    from transformers import AutoModelForCausalLM

    out = _ours(tiny64, tmp_path / "out", key)
    ours = AutoModelForCausalLM.from_pretrained(out)  # no quantization_config passed: the folder says it all
    theirs = _transformers_quantized(tiny64, key)
    linear = ours.model.layers[0].mlp.down_proj
    assert type(linear).__name__ == ("Linear8bitLt" if key == "int8" else "Linear4bit")
    ids = _ids(40)
    a, b = _logits(ours, ids), _logits(theirs, ids)
    assert torch.equal(a, b)
    assert a.std() > 0.1  # not a degenerate all-equal output


def test_rope_dynamic_scaling_is_written_and_active(tiny64, tmp_path):
    from transformers import AutoModelForCausalLM

    plain = _ours(tiny64, tmp_path / "plain", "nf4")
    proc = cli("quantize", tiny64, tmp_path / "scaled", "--method", "bnb-nf4", "--rope-scaling", "dynamic:2")
    assert proc.returncode == 0, proc.stderr
    scaled = AutoModelForCausalLM.from_pretrained(tmp_path / "scaled")
    rope = scaled.config.rope_parameters
    assert rope["rope_type"] == "dynamic" and rope["factor"] == 2.0
    assert rope["rope_theta"] == json.loads((tiny64 / "config.json").read_text())["rope_parameters"]["rope_theta"]
    unscaled = AutoModelForCausalLM.from_pretrained(plain)
    assert unscaled.config.rope_parameters["rope_type"] == "default"
    max_pos = scaled.config.max_position_embeddings
    short, long = _ids(max_pos - 8), _ids(3 * max_pos)
    assert torch.equal(_logits(scaled, short), _logits(unscaled, short))  # dynamic NTK is off inside the trained length
    diff = (_logits(scaled, long) - _logits(unscaled, long)).abs().max()
    assert diff > 1e-2  # and on past it


def test_smollm2_nf4_via_cli_equals_transformers(demo_model, tmp_path):
    from transformers import AutoModelForCausalLM

    before = tree_digest(demo_model)
    out = tmp_path / "smol-nf4"
    proc = cli("quantize", demo_model, out, "--method", "bnb-nf4")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(out)
    assert "bnb-nf4: tensor" in proc.stderr  # progress lines
    theirs = _transformers_quantized(demo_model, "nf4")
    theirs.save_pretrained(tmp_path / "theirs")
    _assert_same_checkpoint(out, tmp_path / "theirs")
    ids = _ids(24)
    assert torch.equal(_logits(AutoModelForCausalLM.from_pretrained(out), ids), _logits(theirs, ids))
    for side in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja"):
        assert (out / side).read_bytes() == (demo_model / side).read_bytes(), side
    record = json.loads((out / "solar_quant.json").read_text())
    assert record["method"] == "bnb-nf4" and record["options"]["skip_modules"] == ["lm_head"]
    assert record["source"]["sha256"] == CheckpointReader(demo_model).identity()["sha256"]
    assert record["tensors"] == {"quantized": 30 * 7, "kept": 30 * 2 + 2}  # tied: no lm_head tensor
    assert check_manifest(out) == [] and tree_digest(demo_model) == before


def test_reruns_give_identical_bytes(tiny_llama, tmp_path):
    a = _ours(tiny_llama, tmp_path / "a", "nf4-dq", rope_scaling="linear:2")
    b = _ours(tiny_llama, tmp_path / "b", "nf4-dq", rope_scaling="linear:2")
    assert tree_digest(a) == tree_digest(b)
    cfg = json.loads((a / "config.json").read_text())
    assert cfg["rope_parameters"] == {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}


def test_skip_modules_keeps_them_16bit_like_transformers(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    opts = BnbOptions(method="bnb-int8", skip_modules=("lm_head", "down_proj"))
    ours = build_bnb_variant(tiny_llama, tmp_path / "ours", opts, OutputOptions(), log=lambda _: None)
    qcfg = BitsAndBytesConfig(load_in_8bit=True, bnb_4bit_compute_dtype="float16", llm_int8_skip_modules=["lm_head", "down_proj"])
    AutoModelForCausalLM.from_pretrained(tiny_llama, quantization_config=qcfg, dtype=torch.float16).save_pretrained(tmp_path / "theirs")
    _assert_same_checkpoint(ours, tmp_path / "theirs")
    tensors = CheckpointReader(ours).tensors
    assert tensors["model.layers.0.mlp.down_proj.weight"].dtype == "F16"
    assert tensors["model.layers.0.mlp.up_proj.weight"].dtype == "I8"


# -- refusals ---------------------------------------------------------------------------------

def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_refuses_an_already_quantized_source(tiny_llama, tmp_path):
    quantized = _ours(tiny_llama, tmp_path / "q", "int8")
    proc = cli("quantize", quantized, tmp_path / "out", "--method", "bnb-nf4")
    assert_clean_failure(proc, "already quantized", "bitsandbytes")
    assert not (tmp_path / "out").exists()


def test_refuses_a_non_llama_source(tiny_llama, tmp_path):
    src = _copy(tiny_llama, tmp_path / "mistral")
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(model_type="mistral", architectures=["MistralForCausalLM"])
    (src / "config.json").write_text(json.dumps(cfg))
    assert_clean_failure(cli("quantize", src, tmp_path / "out", "--method", "bnb-int8"), "mistral", "Llama")
    assert not (tmp_path / "out").exists()


def test_refuses_an_unknown_method(tiny_llama, tmp_path):
    assert_clean_failure(cli("quantize", tiny_llama, tmp_path / "out", "--method", "bnb-int4"), "--method", "bnb-int4")
    assert not (tmp_path / "out").exists()


def test_refuses_double_quant_with_int8(tiny_llama, tmp_path):
    proc = cli("quantize", tiny_llama, tmp_path / "out", "--method", "bnb-int8", "--double-quant")
    assert_clean_failure(proc, "--double-quant")


def test_refuses_an_output_inside_the_source(tiny_llama, tmp_path):
    src = _copy(tiny_llama, tmp_path / "src")
    before = tree_digest(src)
    assert_clean_failure(cli("quantize", src, src / "nf4", "--method", "bnb-nf4"), "inside the source")
    assert_clean_failure(cli("quantize", src, src, "--method", "bnb-nf4", "--overwrite"), "inside the source")
    assert tree_digest(src) == before


def test_existing_output_is_kept_unless_overwrite(tiny_llama, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    proc = cli("quantize", tiny_llama, out, "--method", "bnb-nf4")
    assert_clean_failure(proc, str(out), "--overwrite")
    assert (out / "precious.txt").read_text() == "keep me"
    assert "bnb-nf4: tensor" not in proc.stderr  # refused before any tensor was read
    assert not (tmp_path / ".out.partial").exists()
    cli("quantize", tiny_llama, out, "--method", "bnb-nf4", "--overwrite", check=True)
    assert not (out / "precious.txt").exists() and check_manifest(out) == []


def test_nan_in_a_weight_is_named(tiny_llama, tmp_path):
    from solar_quant.checkpoint.headers import read_header

    src = _copy(tiny_llama, tmp_path / "src")
    name = "model.layers.1.mlp.up_proj.weight"
    shard = src / CheckpointReader(src).info(name).shard
    entries, _ = read_header(str(shard))
    header_len = int.from_bytes(shard.read_bytes()[:8], "little")
    with open(shard, "r+b") as f:  # overwrite element 5 with an fp16 NaN
        f.seek(8 + header_len + entries[name].begin + 5 * 2)
        f.write(torch.tensor([float("nan")], dtype=torch.float16).view(torch.uint8).numpy().tobytes())
    proc = cli("quantize", src, tmp_path / "out", "--method", "bnb-nf4")
    assert_clean_failure(proc, name, "NaN")
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.partial").exists()


def test_disk_full_leaves_nothing_under_out(tiny_llama, tmp_path, monkeypatch):
    """ENOSPC from the shard writer's own write, through the real CLI entry point."""
    import errno

    from typer.testing import CliRunner

    import solar_quant.checkpoint.writer as writer
    from solar_quant.cli.app import app

    real_open, budget = open, {"bytes": 200_000}

    class Full:
        def __init__(self, f):
            self.f = f

        def write(self, data):
            budget["bytes"] -= len(data)
            if budget["bytes"] < 0:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(data)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def __getattr__(self, name):
            return getattr(self.f, name)

    monkeypatch.setattr(writer, "open", lambda *a, **k: Full(real_open(*a, **k)), raising=False)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["quantize", str(tiny_llama), str(out), "--method", "bnb-int8"])
    assert result.exit_code != 0 and budget["bytes"] < 0
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("solar-quant: error:")]
    assert len(errors) == 1 and "No space left on device" in errors[0], result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # neither OUT nor its staging folder


def test_disk_full_on_a_real_tiny_filesystem(tiny_llama, tmp_path):
    """The same on a 1 MiB tmpfs, where the kernel itself answers ENOSPC (needs user namespaces)."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    mnt = tmp_path / "mnt"
    mnt.mkdir()
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                            f"mount -t tmpfs -o size=1m tmpfs {mnt}"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs in a user namespace here ({probe.stderr.decode().strip()})")
    script = (f"mount -t tmpfs -o size=1m tmpfs {mnt} && "
              f"{sys.executable} -m solar_quant quantize {tiny_llama} {mnt}/out --method bnb-nf4; rc=$?; "
              f"ls -A {mnt}; exit $rc")
    proc = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script],
                          capture_output=True, text=True, env={"PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1",
                                                               "PATH": "/usr/bin:/bin"}, timeout=300)
    assert_clean_failure(proc, "No space left on device")
    assert proc.stdout.strip() == ""  # `ls -A` of the full filesystem: nothing left behind
