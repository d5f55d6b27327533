"""Output integrity when two commands meet, with real `solar-quant` processes: one writer per
output (a second is refused, naming the holder, and touches nothing), no stale lock after
SIGKILL, `--resume` refused after a change to the source or calibration set, a staged
shard that does not read back as written never committed, and kills at points drawn from
a run's own write boundaries (including the final commit and the manifest write) leave
either nothing or the complete output under OUT's name.

A first process is held at a named point (`solar_quant.checkpoint.hooks`: a lock just
taken, or a commit about to start) while the second runs, so the meeting is certain
whatever the machine's speed."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, tree_digest
from gptq_helpers import random_calibration

ENV = {"HF_HUB_OFFLINE": "1", "GPTQMODEL_CPU_WORKERS": "2", "PYTHONPATH": str(ROOT), "SOLAR_QUANT_QUIET": "1"}
RTN = ["--method", "rtn", "--group-size", "32", "--shard-size", "300KB", "--checkpoint-every", "0"]
ERROR = "solar-quant: error:"


def start(*args, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "solar_quant", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **ENV, **(env or {})}, cwd=ROOT)


def run(*args, env: dict | None = None) -> tuple[int, str, str]:
    proc = start(*args, env=env)
    out, err = proc.communicate(timeout=600)
    return proc.returncode, out, err


def one_error(rc: int, err: str) -> str:
    assert rc not in (0, -signal.SIGKILL), (rc, err[-2000:])
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.startswith(ERROR)]
    assert len(lines) == 1, err[-2000:]
    return lines[0]


def held(args, point: str, pause: Path) -> subprocess.Popen:
    """Start a command and wait until it reaches `point`, where it waits for `pause/go`."""
    pause.mkdir()
    proc = start(*args, env={"SOLAR_QUANT_TEST_PAUSE": f"{point}:{pause}"})
    deadline = time.monotonic() + 300
    while not any(pause.glob("paused-*")):
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.monotonic() < deadline, "the first command never reached its pause point"
        time.sleep(0.1)
    return proc


def let_go(proc: subprocess.Popen, pause: Path) -> tuple[int, str, str]:
    (pause / "go").touch()
    out, err = proc.communicate(timeout=600)
    return proc.returncode, out, err


def names_beside(out: Path) -> set[str]:
    """Everything in OUT's parent whose name is built from OUT's (the output, staging, lock, swap)."""
    return {p.name for p in out.parent.iterdir() if out.name in p.name}


def assert_verifies(folder: Path, source: Path) -> None:
    from solar_quant.verify import verify_variant

    assert verify_variant(folder, source=source, log=lambda m: None) == []


@pytest.fixture(scope="module")
def src(tmp_path_factory, demo_model) -> Path:
    from solar_quant.models.synthetic import llama_config, write_random_llama

    root = tmp_path_factory.mktemp("integrity")
    return write_random_llama(root / "src", llama_config(), seed=5, shard_bytes=1 << 20, tokenizer_from=demo_model)


@pytest.fixture(scope="module")
def reference(src, tmp_path_factory) -> dict:
    """An uninterrupted RTN run: its files' digest and the write boundaries it passed, in order."""
    root = tmp_path_factory.mktemp("reference")
    trace = root / "trace.txt"
    rc, _, err = run("quantize", src, root / "q", *RTN, env={"SOLAR_QUANT_TEST_TRACE": str(trace)})
    assert rc == 0, err[-2000:]
    return {"path": root / "q", "digest": tree_digest(root / "q"), "points": trace.read_text().split()}


# -- one writer per output ----------------------------------------------------------------------
RECIPE = """
name = "tiny"
[model]
path = "{model}"
name = "tiny-llama"
license = "apache-2.0"

[[variants]]
name = "tiny-rtn"
[variants.quantize]
method = "rtn"
bits = 4
group_size = 32
"""


def verb_args(verb: str, src: Path, out: Path, tmp: Path) -> tuple[list, str]:
    """(the command writing `out`, the point where the first one is held)."""
    if verb == "quantize-rtn":
        return ["quantize", src, out, *RTN], "commit"
    if verb == "quantize-bnb-nf4":
        return ["quantize", src, out, "--method", "bnb-nf4", "--shard-size", "300KB"], "commit"
    if verb == "calibrate":
        return ["calibrate", "--model", src, "--out", out, "--nsamples", "2", "--seqlen", "32", "--template", "raw"], "commit"
    if verb == "eval":
        return ["eval", src, src, "-o", out, "--seqlen", "32", "--max-tokens", "64", "--passkey-trials", "0"], "lock"
    recipe = tmp / "tiny.toml"
    recipe.write_text(RECIPE.format(model=src))
    return ["run", recipe, "--out", out], "lock"


def check_first_output(verb: str, out: Path, src: Path, reference: dict) -> None:
    if verb == "quantize-rtn":
        assert tree_digest(out) == reference["digest"]
    elif verb.startswith("quantize"):
        assert_verifies(out, src)
    elif verb == "calibrate":
        from solar_quant.calibration.artifact import load_calibration
        from solar_quant.checkpoint.manifest import check_manifest

        assert check_manifest(out) == [] and load_calibration(out).input_ids.shape == (2, 32)
    elif verb == "eval":
        report = json.loads((out / "report.json").read_text())
        assert [m["role"] for m in report["models"]] == ["baseline", "variant"]
    else:
        assert list(json.loads((out / "run.json").read_text())["variants"]) == ["tiny-rtn"]
        assert_verifies(out / "tiny-rtn", src)


@pytest.mark.slow
@pytest.mark.parametrize("verb", ["quantize-rtn", "quantize-bnb-nf4", "calibrate", "eval", "run"])
def test_a_second_writer_is_refused_and_touches_nothing(verb, src, reference, tmp_path):
    out = tmp_path / "out"
    args, point = verb_args(verb, src, out, tmp_path)
    first = held(args, point, tmp_path / "pause")
    before = tree_digest(tmp_path)
    rc, stdout, err = run(*args)
    message = one_error(rc, err)
    assert str(out) in message and f"pid {first.pid} on host " in message and "started 20" in message, message
    assert stdout == ""
    if verb == "quantize-rtn":  # resuming a job whose holder is alive is refused the same way
        rc, _, err = run(*args, "--resume")
        assert f"pid {first.pid}" in one_error(rc, err)
    assert tree_digest(tmp_path) == before  # the second writer left the first's files as they were

    rc, stdout, err = let_go(first, tmp_path / "pause")
    assert rc == 0, err[-2000:]
    check_first_output(verb, out, src, reference)
    assert names_beside(out) == {"out"}  # no staging folder, no lock file left


# -- killed writers, changed inputs -------------------------------------------------------------
@pytest.mark.slow
def test_sigkill_leaves_no_stale_lock_and_resume_refuses_a_changed_source_or_calibration(src, tmp_path):
    source = tmp_path / "src"
    shutil.copytree(src, source)
    for seed in (1, 2):
        random_calibration(4, 32, 49152, source, seed=seed).save(tmp_path / f"calib{seed}")
    out = tmp_path / "q"
    args = ["quantize", source, out, "--method", "gptq", "--group-size", "32", "--shard-size", "300KB",
            "--checkpoint-every", "0", "--resume"]
    killed = start(*args, "--calibration", tmp_path / "calib1", env={"SOLAR_QUANT_STOP_AFTER_LAYER": "0"})
    killed.communicate(timeout=600)
    assert killed.returncode == -signal.SIGKILL
    assert json.loads((tmp_path / ".q.lock").read_text())["pid"] == killed.pid  # its note stays; its lock died with it

    rc, _, err = run(*args, "--calibration", tmp_path / "calib2")
    assert "calibration token ids" in one_error(rc, err)

    weight_map = json.loads((source / "model.safetensors.index.json").read_text())["weight_map"]
    shard = source / weight_map["model.layers.1.mlp.down_proj.weight"]
    original = shard.read_bytes()
    changed = bytearray(original)
    changed[-64:] = bytes(64)  # same size, same header: other weights in place
    shard.write_bytes(bytes(changed))
    rc, _, err = run(*args, "--calibration", tmp_path / "calib1")
    message = one_error(rc, err)
    assert f"source file {shard.name} changed content" in message and "--resume" in message, message

    shard.write_bytes(original)
    rc, _, err = run(*args, "--calibration", tmp_path / "calib1")
    assert rc == 0, err[-2000:]
    assert_verifies(out, source)
    assert names_beside(out) == {"q"}


@pytest.mark.slow
def test_a_staged_shard_that_does_not_read_back_as_written_is_never_committed(src, tmp_path):
    out = tmp_path / "out"
    first = held(["quantize", src, out, *RTN], "commit", tmp_path / "pause")
    shard = tmp_path / ".out.partial" / "model-00001-of-00003.safetensors"
    with open(shard, "r+b") as f:  # another process (or a failing disk) appends to a staged shard
        f.seek(0, os.SEEK_END)
        f.write(b"\0" * 64)
    rc, stdout, err = let_go(first, tmp_path / "pause")
    message = one_error(rc, err)
    assert "failed its final check" in message and shard.name in message, message
    assert stdout == "" and names_beside(out) == set()


# -- kills at a run's own write boundaries --------------------------------------------------------
CATEGORIES = ("commit", "manifest", "any", "any", "swap")  # by seed; seeds 3 and 4 overwrite an older OUT


def kill_point(points: list[str], seed: int) -> tuple[str, int]:
    """(boundary, occurrence) drawn from the reference run's trace for this seed's category."""
    rng = random.Random(seed)
    occurrences = [(p, points[: i + 1].count(p)) for i, p in enumerate(points)]
    after_commit = occurrences[points.index("commit"):]
    pool = {"commit": [o for o in after_commit if o[0].startswith("commit")],
            "manifest": [o for o in after_commit if o[0] in ("manifest-hash", "atomic-write")],
            "any": occurrences,
            "swap": [("commit-old-moved", 1), ("commit-renamed", 1)]}[CATEGORIES[seed]]
    return rng.choice(pool)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(5))
def test_a_run_killed_at_a_write_boundary_leaves_nothing_or_the_whole(reference, src, tmp_path, seed):
    point, count = kill_point(reference["points"], seed)
    out = tmp_path / "q"
    overwrite = ["--overwrite"] if seed >= 3 else []
    if overwrite:
        shutil.copytree(reference["path"], out)
    args = ["quantize", src, out, *RTN, *overwrite]
    rc, _, err = run(*args, env={"SOLAR_QUANT_TEST_KILL_AT": f"{point}:{count}"})
    where = f"seed {seed}: SIGKILL at {point} #{count}"
    assert rc == -signal.SIGKILL, (where, err[-2000:])
    if out.exists():  # the complete output, never a partial one
        assert tree_digest(out) == reference["digest"], where
    assert names_beside(out) <= {"q", ".q.partial", ".q.lock", ".q.old"}, where

    job = tmp_path / ".q.partial" / ".job" / "job.json"
    if job.is_file():
        rc, _, err = run(*args, "--resume")
    elif not out.exists() or overwrite:
        rc, _, err = run(*args)
    else:  # killed after the final rename: the output is complete and kept
        rc = 0
    assert rc == 0, (where, err[-2000:])
    assert tree_digest(out) == reference["digest"], where
    assert names_beside(out) <= {"q", ".q.lock"}, where  # a killed holder's lock file may stay; it blocks nothing


# -- the pieces, in process ---------------------------------------------------------------------
def test_the_lock_is_exclusive_across_processes_and_reentrant_within_one(tmp_path):
    from solar_quant.checkpoint.lock import OutputLock

    out = tmp_path / "out"
    probe = ("import sys; from solar_quant.checkpoint.lock import OutputLock; from solar_quant.errors import OutputError\n"
             "try:\n    OutputLock(sys.argv[1]).acquire()\nexcept OutputError as e:\n    print(e)\n")
    with OutputLock(out):
        with OutputLock(out):  # a nested step of the same process
            pass
        other = subprocess.run([sys.executable, "-c", probe, str(out)], capture_output=True, text=True,
                               env={**os.environ, **ENV}, timeout=120)
        assert f"another solar-quant command is writing it (pid {os.getpid()} on host " in other.stdout, other
        assert (tmp_path / ".out.lock").is_file()
    assert not (tmp_path / ".out.lock").exists()
    free = subprocess.run([sys.executable, "-c", probe, str(out)], capture_output=True, text=True,
                          env={**os.environ, **ENV}, timeout=120)
    assert free.returncode == 0 and free.stdout == "", free


def test_sampled_identities_see_new_weights_under_the_same_header(tmp_path):
    from solar_quant.checkpoint.identity import changes, file_identity

    shard = tmp_path / "model.safetensors"
    header = b'{"w":{"dtype":"U8","shape":[65536],"data_offsets":[0,65536]}}'
    shard.write_bytes(len(header).to_bytes(8, "little") + header + bytes(65536))
    small = {"samples": 4, "sample_bytes": 16, "full_hash_bytes": 1024}
    before = file_identity(shard, **small)
    assert "sampled_sha256" in before and "header_sha256" in before
    data = bytearray(shard.read_bytes())
    data[-1] = 1  # the last sample ends at the file's last byte
    shard.write_bytes(bytes(data))
    after = file_identity(shard, **small)
    assert changes({"model.safetensors": before}, {"model.safetensors": after}, "source") == [
        "source file model.safetensors changed content"]
    assert file_identity(shard, **{**small, "full_hash_bytes": 1 << 30})["sha256"]  # small files: whole-file hash


@pytest.mark.parametrize("damage", ["none", "appended", "other header", "index", "unlisted", "size"])
def test_the_final_check_finds_a_staged_folder_that_does_not_read_back_as_written(tmp_path, damage):
    import torch

    from solar_quant.checkpoint import integrity
    from solar_quant.checkpoint.manifest import write_manifest
    from solar_quant.checkpoint.writer import ShardedWriter, StagedFolder
    from solar_quant.errors import IntegrityError

    staged = StagedFolder(tmp_path / "out")
    writer = ShardedWriter(staged.staging, max_shard_bytes=300)
    for i in range(4):
        writer.add(f"t{i}", torch.arange(64, dtype=torch.float16) + i)
    writer.close()
    shard, other = sorted(staged.staging.glob("model-*.safetensors"))
    index = staged.staging / "model.safetensors.index.json"
    write_manifest(staged.staging)
    if damage == "appended":
        with open(shard, "ab") as f:
            f.write(bytes(8))
    elif damage == "other header":  # a valid shard, but not the one this writer wrote
        shard.write_bytes(other.read_bytes())
    elif damage == "index":
        doc = json.loads(index.read_text())
        doc["weight_map"]["t0"] = other.name
        index.write_text(json.dumps(doc))
    elif damage == "unlisted":
        (staged.staging / "stray.txt").write_text("x")
    elif damage == "size":
        doc = json.loads((staged.staging / "manifest.json").read_text())
        doc["files"][shard.name]["bytes"] += 1
        (staged.staging / "manifest.json").write_text(json.dumps(doc))
    findings = integrity.staged_findings(staged.staging)
    assert (findings == []) == (damage == "none"), findings
    if damage == "none":
        assert staged.commit() == tmp_path / "out"
        return
    if damage in ("unlisted", "size"):
        return  # the manifest disagrees with the disk; commit's fresh manifest would list the truth
    with pytest.raises(IntegrityError, match="failed its final check"):  # damage a fresh manifest cannot hide
        staged.commit()
    assert names_beside(tmp_path / "out") == set()
