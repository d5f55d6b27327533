"""`eval --tasks`: our lm-eval plumbing against lm-eval's own run, paired measures, and bad input.

All on the tiny random Llama with the bundled tiny task set (calibration/tasks/); nothing
reaches a network (the task data are local JSON lines).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, assert_clean_failure, cli
from solar_quant.errors import DependencyError, OptionError
from solar_quant.evaluate import paired

pytest.importorskip("lm_eval", reason="needs the [tasks] extra")

TASKS = ROOT / "calibration" / "tasks"


def perturbed_copy(src: Path, dst: Path, scale: float, seed: int = 0) -> Path:
    """`src` with Gaussian noise of `scale` x each tensor's std added to every weight matrix."""
    from safetensors.torch import load_file, save_file

    dst.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for f in sorted(src.glob("*.safetensors")):
        for k, v in load_file(str(f)).items():
            if v.ndim == 2 and "embed" not in k:
                v = (v.float() + scale * v.float().std() * torch.randn(v.shape, generator=gen)).to(v.dtype)
            tensors[k] = v.contiguous()
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    for f in src.iterdir():
        if f.suffix != ".safetensors" and f.name not in ("manifest.json", "model.safetensors.index.json"):
            shutil.copy(f, dst / f.name)
    return dst


def quiet(*_a, **_k) -> None:
    pass


# -- paired measures on known arrays --------------------------------------------------------
def test_flips_count_changed_outcomes_both_ways():
    base = np.array([1, 1, 0, 0, 1, 0])
    var = np.array([1, 0, 1, 0, 0, 0])
    f = paired.flips(base, var)
    assert (f["lost"], f["gained"], f["paired_items"]) == (2, 1, 6)
    assert f["flips"] == pytest.approx(0.5)
    assert paired.flips(base, base)["flips"] == 0.0
    # same accuracy, every item flipped: what accuracy alone hides
    assert paired.flips(np.array([1, 0, 1, 0]), np.array([0, 1, 0, 1]))["flips"] == 1.0
    # a continuous score (TruthfulQA mc2) is correct at >= 0.5
    assert paired.flips(np.array([0.7, 0.2]), np.array([0.4, 0.6]))["flips"] == 1.0


def test_paired_bootstrap_interval_matches_the_analytic_width_and_is_exact_for_a_constant_shift():
    rng = np.random.default_rng(1)
    base = rng.integers(0, 2, 2000).astype(float)
    var = base.copy()
    flip = rng.random(2000) < 0.1
    var[flip] = 1 - var[flip]
    r = paired.paired_bootstrap(base, var, resamples=4000, seed=0)
    diff = var - base
    assert r["delta"] == pytest.approx(diff.mean())
    assert r["low"] <= r["delta"] <= r["high"]
    half = (r["high"] - r["low"]) / 2
    assert half == pytest.approx(1.96 * diff.std(ddof=1) / np.sqrt(diff.size), rel=0.15)
    shifted = paired.paired_bootstrap(np.zeros(50), np.full(50, 0.25))
    assert shifted["low"] == pytest.approx(0.25) and shifted["high"] == pytest.approx(0.25)
    same = paired.paired_bootstrap(base, base)
    assert (same["delta"], same["low"], same["high"]) == (0.0, 0.0, 0.0)


def test_group_mean_is_the_unweighted_mean_of_subjects():
    values = np.array([1, 1, 1, 1, 0, 0.0])  # subject a: 4/4, subject b: 0/2
    groups = np.array(["a", "a", "a", "a", "b", "b"])
    assert paired.group_means(values, None) == pytest.approx(4 / 6)
    assert paired.group_means(values, groups) == pytest.approx(0.5)
    r = paired.paired_bootstrap(values, np.array([1, 1, 1, 1, 1, 0.0]), groups, resamples=500)
    assert r["delta"] == pytest.approx(0.25)  # subject b: 0 -> 1/2, so the mean of subjects rises by 1/4
    assert paired.stderr(np.array([1, 0, 1, 0.0])) == pytest.approx(np.std([1, 0, 1, 0], ddof=1) / 2)


def test_task_names_and_presets_parse():
    from solar_quant.evaluate.tasks import H4, TaskSpec, parse_tasks

    assert parse_tasks(["h4"]) == list(H4)
    assert [s.shots for s in H4] == [25, 10, 5, 0]
    assert parse_tasks(["sq_tiny_mc:2", "sq_tiny_mc:2", "x"]) == [TaskSpec("sq_tiny_mc", 2), TaskSpec("x")]
    with pytest.raises(OptionError, match="few-shot"):
        parse_tasks(["sq_tiny_mc:two"])


# -- our plumbing against lm-eval's own run ---------------------------------------------------
def test_our_task_scores_equal_lm_evals_own_run_on_the_same_model_and_items(tiny_llama):
    """lm-eval loads the folder itself (`model="hf"`); we wrap the model `eval` loaded. Same numbers."""
    import lm_eval

    from solar_quant.evaluate import tasks as tk
    from solar_quant.evaluate.loading import load_model, load_tokenizer

    specs = tk.parse_tasks(["sq_tiny_mc", "sq_tiny_ll:1"])
    dirs = [TASKS]
    tm = tk.task_manager(specs, dirs)
    loaded = load_model(tiny_llama, torch.device("cpu"), torch.float32)
    tok = load_tokenizer(tiny_llama)
    ours = tk.score_tasks(loaded.model, tok, specs, tm, dirs, 64, None, 4, quiet)
    for spec in specs:
        theirs = lm_eval.simple_evaluate(model="hf", model_args={"pretrained": str(tiny_llama), "dtype": "float32"},
                                         tasks=[tk._local_spec(tm, spec.name, dirs)], num_fewshot=spec.shots,
                                         batch_size=4, device="cpu", task_manager=tm, log_samples=True,
                                         bootstrap_iters=0, **tk.SEEDS)
        mine = ours[spec.label()]
        assert mine["n"] == len(theirs["samples"][spec.name]) == {"sq_tiny_mc": 24, "sq_tiny_ll": 16}[spec.name]
        assert mine["score"] == pytest.approx(theirs["results"][spec.name]["acc,none"], abs=1e-12)
        per_item = [s["acc"] for s in sorted(theirs["samples"][spec.name], key=lambda s: s["doc_id"])]
        assert mine["items"] == pytest.approx(per_item, abs=0)
        assert mine["shots"] == (spec.shots or 0)
    # every answer logged: the scores are not all one value, so the comparison above has teeth
    assert len(set(ours["sq_tiny_mc"]["items"])) == 2


def test_cli_tasks_and_generation_end_to_end_with_flips_and_gates(tiny_llama, tmp_path):
    """Baseline vs an exact copy (flips 0) and vs a perturbed copy, tasks and --generate in one run."""
    same = tmp_path / "same"
    shutil.copytree(tiny_llama, same)
    noisy = perturbed_copy(tiny_llama, tmp_path / "noisy", scale=0.5)
    out = tmp_path / "report"
    prompts = tmp_path / "prompts.jsonl"
    shipped = [json.loads(line) for line in (ROOT / "calibration" / "prompts.jsonl").read_text().splitlines()]
    prompts.write_text("".join(json.dumps(p) + "\n" for p in shipped if p["kind"] != "long input"))
    proc = cli("eval", tiny_llama, same, noisy, "--out", out, "--seqlen", "32", "--max-tokens", "128",
               "--passkey-trials", "0", "--tasks", "sq_tiny_mc,sq_tiny_ll:1", "--generate", prompts,
               "--max-new-tokens", "6", "--generate-template", "solar", "--max-flips", "0", "--trained-length", "256")
    report = json.loads((out / "report.json").read_text())
    base, self_copy, variant = report["models"]
    for label in ("sq_tiny_mc", "sq_tiny_ll:1"):
        t = self_copy["tasks"][label]
        assert (t["flips"], t["delta"], t["low"], t["high"]) == (0.0, 0.0, 0.0, 0.0)
        assert t["items"] == base["tasks"][label]["items"]
        v = variant["tasks"][label]
        assert v["flips"] == pytest.approx(np.mean(np.asarray(v["items"]) != np.asarray(base["tasks"][label]["items"])))
        assert v["low"] <= v["delta"] <= v["high"]
    assert all(r["identical"] and r["first_divergence"] is None for r in self_copy["generation"])
    assert [r["base_loglik_of_variant"] for r in self_copy["generation"]] == \
        pytest.approx([r["base_loglik"] for r in base["generation"]])
    rows = variant["generation"]
    assert any(not r["identical"] for r in rows)
    for r, b in zip(rows, base["generation"]):
        if r["first_divergence"] is not None:
            k = r["first_divergence"]
            assert r["tokens_ids"][:k] == b["tokens_ids"][:k]
            assert k == min(len(r["tokens_ids"]), len(b["tokens_ids"])) or r["tokens_ids"][k] != b["tokens_ids"][k]
        assert 0.0 <= r["identical_share"] <= 1.0
    # flips gate: the exact copy passes it; the perturbed copy fails if any of its items flipped
    gates = {(g["model"], g["check"]): g["passed"] for g in report["gates"]["results"]}
    assert gates[("same", "flips (sq_tiny_mc)")]
    flipped = any(variant["tasks"][k]["flips"] > 0 for k in variant["tasks"])
    assert proc.returncode == (1 if flipped else 0), proc.stderr[-2000:]
    md = (out / "report.md").read_text()
    assert "## Tasks (lm-eval)" in md and "## Generation fidelity" in md
    assert "same task sq_tiny_mc acc" in proc.stdout and "bootstrapping" not in proc.stdout


# -- bad input ------------------------------------------------------------------------------
def test_unknown_task_lists_close_matches(tiny_llama, tmp_path):
    proc = cli("eval", tiny_llama, tiny_llama, "--out", tmp_path / "r", "--tasks", "sq_tiny_m", "--passkey-trials", "0")
    assert_clean_failure(proc, "--tasks 'sq_tiny_m'", "sq_tiny_mc")
    assert not (tmp_path / "r").exists()


def test_task_dir_without_a_task_file_is_refused(tiny_llama, tmp_path):
    empty = tmp_path / "tasks"
    empty.mkdir()
    (empty / "notes.yaml").write_text("hello: world\n")
    proc = cli("eval", tiny_llama, tiny_llama, "--out", tmp_path / "r", "--tasks", "sq_tiny_mc", "--task-dir", empty)
    assert_clean_failure(proc, "--task-dir", "no lm-eval task file")
    assert not (tmp_path / "r").exists()


def test_a_task_dir_of_ones_own_tasks_is_used(tiny_llama, tmp_path):
    """A user's folder: data next to the YAML, found relative to it, whatever the working directory."""
    from solar_quant.evaluate import tasks as tk

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "data.jsonl").write_text((TASKS / "sq_tiny_mc.test.jsonl").read_text())
    (mine / "my_mc.yaml").write_text((TASKS / "sq_tiny_mc.yaml").read_text().replace("task: sq_tiny_mc", "task: my_mc")
                                     .replace("test: sq_tiny_mc.test.jsonl", "test: data.jsonl")
                                     .replace("    train: sq_tiny_mc.train.jsonl\n", "").replace("fewshot_split: train\n", ""))
    dirs = [tk.check_task_dir(str(mine))]
    specs = tk.parse_tasks(["my_mc"])
    tm = tk.task_manager(specs, dirs)
    from solar_quant.evaluate.loading import load_tokenizer

    assert tk.probe(specs, tm, dirs, load_tokenizer(tiny_llama), 64, 5) == {"my_mc": {"requests": 20, "longest_tokens": pytest.approx(14, abs=8)}}


def test_missing_lm_eval_names_the_extra(tiny_llama, monkeypatch, tmp_path):
    from solar_quant.evaluate.run import prepare
    from solar_quant.options import EvalOptions

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval -> ImportError
    opts = EvalOptions(text=str(ROOT / "calibration" / "eval.txt"), seqlen=32, max_tokens=64, passkey_trials=0,
                       tasks=("sq_tiny_mc",))
    with pytest.raises(DependencyError, match=r"pip install 'solar-quant\[tasks\]'"):
        prepare(str(tiny_llama), [str(tiny_llama)], opts, log=quiet)


def test_a_task_longer_than_the_context_is_refused_before_any_model_loads(tiny_llama, tmp_path):
    proc = cli("eval", tiny_llama, tiny_llama, "--out", tmp_path / "r", "--tasks", "sq_tiny_mc:3", "--seqlen", "8",
               "--max-tokens", "64", "--passkey-trials", "0", "--trained-length", "16")
    assert_clean_failure(proc, "--tasks sq_tiny_mc", "the model allows 16")
    assert "loading" not in proc.stderr
    assert not (tmp_path / "r").exists()


# -- the model card ----------------------------------------------------------------------------
def _task(score, ref=None, **paired_values):
    return {"task": "arc_challenge", "metric": "acc_norm", "score": score, "stderr": 0.01, "reference": ref,
            **paired_values}


def test_card_shows_published_ours_and_the_variant_under_each_rope(tmp_path):
    from solar_quant.pipeline.cards import serving_rope_line, tasks_section

    folder = tmp_path / "v"
    folder.mkdir()
    protocol = {"rope_override": "dynamic:2", "tasks": {"lm_eval": "0.4.13", "limit": None,
                                                         "seeds": {"fewshot_random_seed": 1234},
                                                         "reference_source": "the model card"}}

    def report(variant_score, ppl):
        return {"protocol": protocol, "models": [
            {"role": "baseline", "path": "base", "name": "base", "tasks": {"arc_challenge:25": _task(0.70, ref=0.711)},
             "short": {"ppl": 3.0}},
            {"role": "variant", "path": str(folder), "name": "v", "short": {"ppl": ppl},
             "tasks": {"arc_challenge:25": _task(variant_score, delta=variant_score - 0.70, low=-0.03, high=0.01,
                                                 flips=0.05)}}]}

    main, static = report(0.69, 3.1), report(0.66, 3.3)
    text = tasks_section(main, folder, {"ntk-static:2": static})
    row = next(line for line in text.splitlines() if line.startswith("| arc_challenge:25"))
    assert "| 71.1 |" in row and "70.0 ± 1.0" in row and "69.0 ± 1.0" in row and "5.0 %" in row
    assert "66.0 (Δ -4.0, flips 5.0 %)" in row
    assert "the model card" in text
    cfg = {"hidden_size": 8192, "num_attention_heads": 64, "max_position_embeddings": 4096}
    line = serving_rope_line({"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0}, cfg, main, folder,
                             {"ntk-static:2": static})
    assert "static base 3.053e+04 (×3.05)" in line
    assert "69.0 under transformers' rope vs 66.0 under `ntk-static:2`" in line and "3.1 vs 3.3" in line
    assert serving_rope_line({"rope_type": "default", "rope_theta": 1e4}, cfg, main, folder, {}) is None


def test_report_adds_the_h4_average_beside_the_published_one():
    from solar_quant.evaluate.report import H4_LABELS, _tasks_markdown

    refs = {"arc_challenge": 0.711, "hellaswag": 0.879, "mmlu": 0.706, "truthfulqa_mc2": 0.622}
    def tasks(shift):
        return {label: {"task": label.split(":")[0], "metric": "acc", "group_mean": False, "shots": 0, "n": 10,
                        "score": refs[label.split(":")[0]] + shift, "stderr": 0.01, "items_per_s": 1.0,
                        "reference": refs[label.split(":")[0]], "delta": shift, "low": shift, "high": shift,
                        "flips": 0.0} for label in H4_LABELS}
    report = {"protocol": {"tasks": {"lm_eval": "0.4.13", "seeds": {}, "limit": None, "batch_size": 8, "context": 4096,
                                     "reference": {**{k: 100 * v for k, v in refs.items()}, "h4": 73.0},
                                     "reference_source": "card"}},
              "models": [{"name": "fp16", "role": "baseline", "tasks": tasks(0.0)},
                         {"name": "q", "role": "variant", "tasks": tasks(-0.02)}]}
    row = next(line for line in _tasks_markdown(report) if "H4 average" in line).splitlines()[-1]
    assert row.split(" | ")[-3:] == ["73.0", "72.9", "70.9 |"]
