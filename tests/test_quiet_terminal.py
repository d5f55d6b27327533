"""A quiet terminal: stdout is exactly the command's result, library chatter (GPTQModel's banner and
INFO lines, warnings) appears only with --verbose, --quiet prints no progress, progress is a bar
on a terminal and sparse lines otherwise, and importing GPTQModel leaves os.environ as it was."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, cli

CHATTER = ("GPT-QModel", "INFO ", "WARN ", "UserWarning", "FutureWarning", "Failed to load", "┌")
PROGRESS_WORDS = ("ETA", "elapsed", "loading ")


def _has_gptq_runtime() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(p) is not None for p in ("optimum", "gptqmodel"))


@pytest.fixture(scope="module")
def rtn_folder(tiny_llama, tmp_path_factory):
    """A GPTQ v1 folder (RTN, g32) of the tiny model, made once; the command's stdout kept."""
    out = tmp_path_factory.mktemp("quiet") / "tiny-rtn"
    proc = cli("quantize", tiny_llama, out, "--method", "rtn", "--group-size", "32", check=True)
    return out, proc


def test_quantize_stdout_is_exactly_the_path(rtn_folder):
    out, proc = rtn_folder
    assert proc.stdout == f"{out}\n"
    assert not any(word in proc.stderr for word in CHATTER), proc.stderr
    assert "None" not in proc.stderr  # RTN has no output error to report: its progress names the weight error
    assert "rel. weight error" in proc.stderr


def test_quiet_prints_no_progress_and_verbose_keeps_stdout_clean(tiny_llama, tmp_path):
    quiet = cli("quantize", tiny_llama, tmp_path / "q", "--method", "rtn", "--group-size", "32", "--quiet", check=True)
    assert quiet.stdout == f"{tmp_path / 'q'}\n"
    assert not any(word in quiet.stderr for word in PROGRESS_WORDS), quiet.stderr
    # the global flags work before the verb too, and --verbose never sends anything but the result to stdout
    loud = cli("--verbose", "quantize", tiny_llama, tmp_path / "v", "--method", "rtn", "--group-size", "32", check=True)
    assert loud.stdout == f"{tmp_path / 'v'}\n"
    assert "ETA" in loud.stderr


def test_verbose_and_quiet_together_is_one_clear_error(tiny_llama, tmp_path):
    from conftest import assert_clean_failure

    assert_clean_failure(cli("plan", "--preset", "solar-0-70b", "--verbose", "--quiet"), "--verbose", "--quiet")


def test_plan_stdout_is_exactly_the_table_or_json():
    from solar_quant.gpus import describe, parse_gpus
    from solar_quant.models.synthetic import SOLAR_70B_CONFIG
    from solar_quant.architecture import LlamaShape
    from solar_quant.plan import format_plan, plan
    from solar_quant.quality import recommendation, recommendation_lines

    proc = cli("plan", "--preset", "solar-0-70b", "--gpus", "1x80GB", "--context", "4096", check=True)
    shape = LlamaShape.from_config(SOLAR_70B_CONFIG)
    gpus = parse_gpus("1x80GB")
    rows = plan(shape, gpus, 4096, 1)
    expected = format_plan(rows, "model: SOLAR-0-70b (preset, fp16 source)", f"1x80GB ({describe(gpus)})", 4096, 1,
                           "all") + "\n\n" + "\n".join(recommendation_lines(recommendation(rows, "1x80GB", 4096, 1, "all")))
    assert proc.stdout == expected + "\n"
    assert proc.stderr == ""
    doc = json.loads(cli("plan", "--preset", "solar-0-70b", "--json", check=True).stdout)  # the whole stdout parses
    assert doc["rows"]


@pytest.mark.gptq_runtime
@pytest.mark.skipif(not _has_gptq_runtime(), reason="the [gptq] extra is not installed")
def test_eval_of_a_gptq_folder_prints_only_its_table(tiny_llama, rtn_folder, tmp_path):
    from solar_quant.evaluate.report import console_table

    folder, _ = rtn_folder
    args = ("eval", tiny_llama, folder, "--max-tokens", "128", "--seqlen", "64", "--passkey-trials", "0")
    proc = cli(*args, "-o", tmp_path / "r", check=True)
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert proc.stdout == console_table(report) + "\n"
    assert not any(word in proc.stdout + proc.stderr for word in CHATTER), proc.stderr
    loud = cli(*args, "-o", tmp_path / "v", "--verbose", check=True)
    report = json.loads((tmp_path / "v" / "report.json").read_text())
    assert loud.stdout == console_table(report) + "\n"  # chatter goes to stderr even with --verbose
    assert len(loud.stderr) > len(proc.stderr)


@pytest.mark.gptq_runtime
@pytest.mark.skipif(not _has_gptq_runtime(), reason="the [gptq] extra is not installed")
def test_gptq_runtime_import_leaves_os_environ_unchanged():
    """In a fresh interpreter (so the import really runs): the environment after equals before,
    and nothing reached stdout."""
    code = ("import os, json\n"
            "before = dict(os.environ)\n"
            "from solar_quant.formats.entries.gptq_v1 import require_runtime\n"
            "require_runtime()\n"
            "import sys; assert 'gptqmodel' in sys.modules\n"
            "after = dict(os.environ)\n"
            "sys.stderr.write('DIFF ' + json.dumps(sorted(set(before.items()) ^ set(after.items()))) + '\\n')\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "GPTQMODEL_CPU_WORKERS": "2"}
    for key in ("PYTORCH_ALLOC_CONF", "CUDA_DEVICE_ORDER", "HF_HOME", "TORCHINDUCTOR_CACHE_DIR"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    diff = json.loads(proc.stderr.split("DIFF ")[-1])
    assert diff == []
    assert proc.stdout == ""


def test_import_restores_an_environment_a_package_changes(tmp_path, monkeypatch, capsys):
    """In-process, with a stand-in package that does what GPTQModel does on import."""
    from solar_quant.formats import gptq_runtime

    (tmp_path / "sq_noisy_runtime.py").write_text(
        "import os\nos.environ['PYTORCH_ALLOC_CONF'] = 'expandable_segments:True'\n"
        "os.environ['HF_HOME'] = '/tmp/elsewhere'\nos.environ.pop('SQ_TEST_KEPT', None)\nprint('BANNER')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("SQ_TEST_KEPT", "1")
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    monkeypatch.setattr(gptq_runtime, "RUNTIME_PACKAGES", ("sq_noisy_runtime",))
    before = dict(os.environ)
    gptq_runtime.import_gptq_runtime()
    assert "sq_noisy_runtime" in sys.modules
    assert dict(os.environ) == before
    captured = capsys.readouterr()
    assert captured.out == "" and "BANNER" in captured.err


# -- progress -------------------------------------------------------------------------------
class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_plain_progress_is_sparse(monkeypatch):
    from solar_quant import console, progress

    clock, stream = _Clock(), io.StringIO()
    monkeypatch.setattr(progress.time, "monotonic", clock)
    monkeypatch.setattr(console, "stderr", lambda: stream)
    monkeypatch.setattr(console, "quiet", lambda: False)
    monkeypatch.delenv(progress.INTERVAL_ENV, raising=False)
    bar = progress.Progress(1000, "linear")
    for _ in range(1000):
        clock.now += 0.1  # 100 s in all
        bar.step("x")
    lines = stream.getvalue().splitlines()
    # the first, then at most one per PLAIN_INTERVAL_S, and the last
    assert lines[0].startswith("linear 1/1000") and lines[-1].startswith("linear 1000/1000")
    assert len(lines) <= 2 + 100 / progress.PLAIN_INTERVAL_S
    assert all("ETA" in line for line in lines)


def test_progress_interval_env_sets_the_plain_line_spacing(monkeypatch):
    from solar_quant import console, progress
    from solar_quant.errors import OptionError

    clock, stream = _Clock(), io.StringIO()
    monkeypatch.setattr(progress.time, "monotonic", clock)
    monkeypatch.setattr(console, "stderr", lambda: stream)
    monkeypatch.setattr(console, "quiet", lambda: False)
    monkeypatch.setattr(progress, "_tty", lambda: False)
    monkeypatch.setenv(progress.INTERVAL_ENV, "0")
    bar = progress.Progress(50, "tensor")
    for _ in range(50):
        clock.now += 0.1
        bar.step("x")
    assert len(stream.getvalue().splitlines()) == 50  # a line per update
    for bad in ("soon", "-1", "nan"):
        monkeypatch.setenv(progress.INTERVAL_ENV, bad)
        with pytest.raises(OptionError, match=progress.INTERVAL_ENV):
            progress.Progress(5, "tensor")


def test_terminal_progress_is_a_live_bar(monkeypatch):
    from solar_quant import console, progress

    stream = _Tty()
    monkeypatch.setattr(console, "stderr", lambda: stream)
    monkeypatch.setattr(console, "quiet", lambda: False)
    bar = progress.Progress(50, "layer")
    for i in range(50):
        bar.step(f"model.layers.{i}")
    text = stream.getvalue()
    assert "\r" in text  # redrawn in place, not one line per step
    assert text.count("\n") <= 2
    assert "layer" in text and "/50" in text


def test_quiet_progress_prints_nothing(monkeypatch):
    from solar_quant import console, progress

    stream = _Tty()
    monkeypatch.setattr(console, "stderr", lambda: stream)
    monkeypatch.setattr(console, "quiet", lambda: True)
    bar = progress.Progress(5, "layer")
    for _ in range(5):
        bar.step()
    progress.log("hello")
    assert stream.getvalue() == ""


def test_chatter_summary_names_a_real_warning_and_skips_banners(monkeypatch):
    from solar_quant import console

    out, err = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    monkeypatch.setattr(sys, "stderr", err)
    monkeypatch.setattr(console, "verbose", lambda: False)
    with console.captured():
        print("INFO  Kernel: selected: `TorchLinear`")
        print("┌─────────────┐")
        sys.stderr.write("something.py:3: UserWarning: the weights look odd\n")
        console.result("RESULT")
    assert out.getvalue() == "RESULT\n"
    summary = err.getvalue().splitlines()
    assert len(summary) == 1 and "UserWarning: the weights look odd" in summary[0] and "--verbose" in summary[0]
    err.truncate(0)
    err.seek(0)
    with console.captured():
        print("INFO  only a banner")
    assert err.getvalue() == ""
