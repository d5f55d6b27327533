"""`quantize --clip`: recorded, resumable from jobs saved before the option existed, refused where it
cannot work (one line, non-zero exit, nothing under OUT)."""

from __future__ import annotations

import json

import pytest

from conftest import assert_clean_failure, cli, tree_digest
from test_gptq_pipeline import QUIET, _build, tiny_calib  # noqa: F401  (fixture)


def test_hessian_clipping_is_recorded_and_changes_the_grid(tiny_llama, tiny_calib, tmp_path):  # noqa: F811
    from solar_quant.verify import verify_variant

    hess = _build(tiny_llama, tmp_path / "h", tiny_calib, bits=3, group_size=32, act_order=True, clip="hessian")
    mse = _build(tiny_llama, tmp_path / "m", tiny_calib, bits=3, group_size=32, act_order=True, mse=2.4)
    record = json.loads((hess / "solar_quant.json").read_text())
    assert record["options"]["clip"] == "hessian" and record["options"]["mse"] == 0
    assert tree_digest(hess) != tree_digest(mse)
    assert verify_variant(hess, tiny_llama, samples=2, log=lambda m: None) == []


def test_clip_mse_flag_is_the_mse_search(tiny_llama, tmp_path):
    base = ("quantize", tiny_llama, "--method", "rtn", "--bits", "4", "--group-size", "32")
    cli(*base, tmp_path / "a", "--clip", "mse", check=True, env=QUIET)
    cli(*base, tmp_path / "b", "--mse", "2.4", check=True, env=QUIET)
    assert tree_digest(tmp_path / "a") == tree_digest(tmp_path / "b")


@pytest.mark.parametrize("flags,needles", [
    (("--method", "rtn", "--clip", "hessian"), ("--clip hessian", "--method gptq")),
    (("--method", "gptq", "--clip", "hessian", "--mse", "2.4"), ("clip 'hessian'", "mse 2.4")),
    (("--method", "gptq", "--clip", "none", "--mse", "2.4"), ("--clip none", "--mse 2.4")),
    (("--method", "gptq", "--clip", "hessain"), ("--clip 'hessain'", "hessian-diag")),
])
def test_bad_clip_flags_fail_cleanly(tiny_llama, tmp_path, flags, needles):
    out = tmp_path / "q"
    proc = cli("quantize", tiny_llama, out, "--bits", "4", "--group-size", "32", "--nsamples", "2", "--seqlen", "16",
               *flags, env=QUIET)
    assert_clean_failure(proc, *needles)
    assert not out.exists() and not list(tmp_path.glob(".q*"))


def test_resume_point_saved_before_new_options_existed_still_resumes(tiny_llama, tmp_path):
    """A job.json written before `equalize` and `clip` were recorded resumes under today's defaults."""
    out = tmp_path / "q"
    args = ("quantize", tiny_llama, out, "--method", "rtn", "--bits", "4", "--group-size", "32",
            "--checkpoint-every", "0")
    cli(*args, env={**QUIET, "SOLAR_QUANT_STOP_AFTER_LAYER": "0:term"})
    path = tmp_path / ".q.partial" / ".job" / "job.json"
    job = json.loads(path.read_text())
    for key in ("equalize", "clip", "refine"):
        job["options"].pop(key)
    path.write_text(json.dumps(job))

    refused = cli(*args, "--equalize", "--nsamples", "2", "--seqlen", "16", "--resume", env=QUIET)
    assert_clean_failure(refused, "--resume", "equalize")  # an absent option still differs from a non-default one
    cli(*args, "--resume", check=True, env=QUIET)
    fresh = _build(tiny_llama, tmp_path / "fresh", None, method="rtn", bits=4, group_size=32)
    assert tree_digest(out) == tree_digest(fresh)
