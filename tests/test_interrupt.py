"""Interruption safety: SIGINT or SIGTERM sent to a real `solar-quant` process at random points
leaves nothing partial under the output name, keeps a resumable GPTQ job (staging folder with
`.job/job.json`) or nothing, prints one line saying how to go on, and exits 130; resuming
gives a folder byte-identical to an uninterrupted run.

Random points: the signal follows the K-th progress line the process prints (K drawn per
seed from the lines an uninterrupted run prints) by a random delay, so the points spread
over the whole run whatever the machine's speed."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time

import pytest

from conftest import ROOT, tree_digest
from gptq_helpers import random_calibration

SIGNALS = (signal.SIGINT, signal.SIGTERM)
# A progress line per update, so the signal can be timed by counting lines (plain lines are sparse by default).
ENV = {"HF_HUB_OFFLINE": "1", "GPTQMODEL_CPU_WORKERS": "2", "PYTHONPATH": str(ROOT), "SOLAR_QUANT_PROGRESS_INTERVAL": "0"}


def _default_sigint() -> None:  # a child inherits an ignored SIGINT from a backgrounded test run
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _start(*args) -> subprocess.Popen:
    env = {**os.environ, **ENV}
    env.pop("SOLAR_QUANT_QUIET", None)
    return subprocess.Popen([sys.executable, "-m", "solar_quant", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT, preexec_fn=_default_sigint)


def run(*args) -> tuple[int, str, list[str]]:
    proc = _start(*args)
    out, err = proc.communicate(timeout=600)
    return proc.returncode, out, err.splitlines()


def interrupt(args, after_line: int, delay: float, sig: int, counted=lambda line: True):
    """Run the CLI; send `sig` `delay` s after its `after_line`-th counted stderr line (or at exit)."""
    proc = _start(*args)
    lines: list[str] = []
    seen = threading.Event()

    def read():
        for line in proc.stderr:
            lines.append(line.rstrip("\n"))
            if sum(map(counted, lines)) >= after_line:
                seen.set()
        seen.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    seen.wait(timeout=600)
    time.sleep(delay)
    if proc.poll() is None:
        proc.send_signal(sig)
    out = proc.stdout.read()
    proc.wait(timeout=600)
    reader.join(timeout=60)
    return proc.returncode, out, lines


def error_lines(lines: list[str]) -> list[str]:
    return [ln for ln in lines if ln.startswith("solar-quant: error:")]


def assert_interrupted_cleanly(rc: int, lines: list[str]) -> str:
    """Exit 130, one error line, no traceback; returns the error line."""
    assert rc == 130, (rc, lines[-15:])
    assert not any("Traceback" in ln for ln in lines), lines
    errors = error_lines(lines)
    assert len(errors) == 1, lines[-15:]
    return errors[0]


# -- GPTQ: resumable ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gptq_setup(tmp_path_factory, demo_model):
    """A 4-layer tiny Llama, a saved calibration artifact, and an uninterrupted run's digest."""
    from solar_quant.models.synthetic import llama_config, write_random_llama

    root = tmp_path_factory.mktemp("interrupt")
    src = write_random_llama(root / "src", llama_config(layers=4), seed=3, shard_bytes=1 << 20, tokenizer_from=demo_model)
    random_calibration(8, 32, 49152, src, seed=2).save(root / "calib")
    args = ["--method", "gptq", "--calibration", root / "calib", "--group-size", "32", "--act-order",
            "--shard-size", "300KB"]
    rc, _, lines = run("quantize", src, root / "ref", *args)
    assert rc == 0, lines[-20:]
    return {"src": src, "args": args, "calib": root / "calib", "digest": tree_digest(root / "ref"), "lines": len(lines),
            "source_digest": tree_digest(src)}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gptq_quantize_interrupted_at_random_then_resumed(gptq_setup, tmp_path, seed):
    rng = random.Random(seed)
    sig = SIGNALS[seed % 2]
    after, delay = rng.randrange(1, gptq_setup["lines"] + 1), rng.uniform(0, 0.4)
    out, staging = tmp_path / "q", tmp_path / ".q.partial"
    cmd = ["quantize", gptq_setup["src"], out, *gptq_setup["args"]]
    rc, _, lines = interrupt(cmd, after, delay, sig)
    where = f"seed {seed}: {signal.Signals(sig).name} after line {after} + {delay:.2f}s"

    if rc == 0:  # the run finished before the signal landed
        assert tree_digest(out) == gptq_setup["digest"], where
        return
    message = assert_interrupted_cleanly(rc, lines)
    if out.exists():  # the signal came as the commit finished: the folder is complete
        assert "complete" in message and not staging.exists(), where
        assert tree_digest(out) == gptq_setup["digest"], where
        return
    if staging.exists():
        assert (staging / ".job" / "job.json").is_file(), (where, sorted(p.name for p in staging.iterdir()))
        assert "--resume" in message and str(staging) in message, message
        rc, _, lines = run(*cmd, "--resume")
    else:
        assert "rerun the same command" in message, message
        rc, _, lines = run(*cmd)
    assert rc == 0, (where, lines[-15:])
    assert tree_digest(out) == gptq_setup["digest"], where
    assert not staging.exists()
    assert tree_digest(gptq_setup["src"]) == gptq_setup["source_digest"]


def test_resume_without_a_job_starts_clean(gptq_setup, tmp_path):
    """A staging folder holding files but no job.json (not ours to continue) is cleared, not mixed in."""
    from solar_quant.calibration.artifact import load_calibration
    from solar_quant.options import GptqOptions, OutputOptions, parse_size
    from solar_quant.pipeline.gptq import build_gptq_variant

    out, staging = tmp_path / "q", tmp_path / ".q.partial"
    staging.mkdir()
    (staging / "model-00001-of-00009.safetensors").write_bytes(b"stale")
    build_gptq_variant(gptq_setup["src"], out, GptqOptions(group_size=32, act_order=True),
                       load_calibration(gptq_setup["calib"]), OutputOptions(shard_size=parse_size("300KB")),
                       resume=True, log=lambda m: None)
    assert tree_digest(out) == gptq_setup["digest"]


# -- the others: nothing to resume, nothing left ------------------------------------------------
def test_bnb_quantize_sigterm_leaves_nothing(tiny_llama, tmp_path):
    out = tmp_path / "nf4"
    rc, _, lines = interrupt(["quantize", tiny_llama, out, "--method", "bnb-nf4", "--shard-size", "1MB"], 3, 0.0,
                             signal.SIGTERM, counted=lambda ln: ln.startswith("bnb-nf4: tensor"))
    message = assert_interrupted_cleanly(rc, lines)
    assert "nothing partial was left" in message and str(out) in message
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_calibrate_sigint_leaves_nothing(tiny_llama, tmp_path):
    out = tmp_path / "calib"
    rc, _, lines = interrupt(["calibrate", "--model", tiny_llama, "--out", out, "--nsamples", "8", "--seqlen", "64"],
                             1, 0.0, signal.SIGINT, counted=lambda ln: ln.startswith("calibration:"))
    message = assert_interrupted_cleanly(rc, lines)
    assert "--out" in message and "rerun" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_eval_sigterm_writes_no_report_and_keeps_a_usable_cache(tiny_llama, tmp_path):
    """Stopped while scoring the variant: no report; the baseline sections already scored are
    complete cache files that the next run reuses instead of recomputing."""
    out = tmp_path / "report"
    args = ["eval", tiny_llama, tiny_llama, "--out", out, "--seqlen", "32", "--max-tokens", "384",
            "--passkey-trials", "0"]
    rc, _, lines = interrupt(args, 1, 0.0, signal.SIGTERM, counted=lambda ln: ln.startswith("tiny-llama#2 short"))
    message = assert_interrupted_cleanly(rc, lines)
    assert "report.json" in message and "baseline-cache" in message
    assert not (out / "report.json").exists() and not (out / "report.md").exists()
    cached = sorted(p.name for p in (out / "baseline-cache").iterdir())
    assert cached and not any(n.endswith(".tmp") for n in cached), cached

    rc, _, lines = run(*args)
    assert rc == 0, lines[-10:]
    assert any("found in the cache" in ln for ln in lines), lines
    assert (out / "report.json").is_file() and (out / "report.md").is_file()
