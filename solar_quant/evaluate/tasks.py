"""Task scores through lm-evaluation-harness, over the model `eval` already loaded.

`--tasks` names lm-eval tasks or groups (`NAME[:SHOTS]`) or the preset `h4`, the Open LLM
Leaderboard v1 set with its settings. Tasks come from the bundled tiny set
(`calibration/tasks/`), `--task-dir`, and lm-eval's own task index (whose data must already be
in the local datasets cache). Every model sees the same items, few-shot examples and seeds;
each item's outcome is kept so `paired.py` can compare models item by item.
"""

from __future__ import annotations

import difflib
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from solar_quant.errors import DependencyError, OptionError

EXTRA = "pip install 'solar-quant[tasks]'"
# lm-eval's defaults, fixed here so the report records them and every model gets the same few-shot draw
SEEDS = {"random_seed": 0, "numpy_random_seed": 1234, "torch_random_seed": 1234, "fewshot_random_seed": 1234}
SUPPORTED_OUTPUTS = ("loglikelihood", "multiple_choice")


@dataclass(frozen=True)
class TaskSpec:
    """One task to score: lm-eval's name, few-shot count (None: the task's own), metric, and
    whether the score is the unweighted mean over the group's subtasks (MMLU on the leaderboard)."""

    name: str
    shots: int | None = None
    metric: str | None = None
    group_mean: bool = False

    def label(self) -> str:
        return self.name if self.shots is None else f"{self.name}:{self.shots}"


# Open LLM Leaderboard v1 ("H4"; harness commit b281b0921b636bc36ad05c0b0b0763bd6dd43463)
H4 = (TaskSpec("arc_challenge", 25, "acc_norm"), TaskSpec("hellaswag", 10, "acc_norm"),
      TaskSpec("mmlu", 5, "acc", group_mean=True), TaskSpec("truthfulqa_mc2", 0, "acc"))
PRESETS = {"h4": H4}


def require_lm_eval() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise DependencyError(f"--tasks needs lm-evaluation-harness (lm-eval), which is not installed; run `{EXTRA}`") from None


def parse_tasks(items: tuple[str, ...] | list[str]) -> list[TaskSpec]:
    """['h4'], ['sq_tiny_mc:2', 'hellaswag'] -> TaskSpecs (presets expanded, duplicates dropped)."""
    out: list[TaskSpec] = []
    for item in items:
        text = item.strip()
        if not text:
            continue
        if text.lower() in PRESETS:
            out += [s for s in PRESETS[text.lower()] if s not in out]
            continue
        name, _, shots = text.partition(":")
        if shots:
            if not shots.isdigit():
                raise OptionError(f"--tasks {text!r}: the few-shot count after ':' must be a whole number, e.g. {name}:5")
            spec = TaskSpec(name, int(shots))
        else:
            spec = TaskSpec(name)
        if spec not in out:
            out.append(spec)
    return out


def bundled_task_dir() -> Path:
    from solar_quant.calibration.bundled import bundled_dir

    return bundled_dir() / "tasks"


def check_task_dir(path: str) -> Path:
    """A --task-dir must hold at least one lm-eval task YAML (a mapping with a `task:` key)."""
    import yaml

    p = Path(path).expanduser()
    if not p.is_dir():
        raise OptionError(f"--task-dir {path}: not a folder; give a folder of lm-eval task YAML files")
    for f in sorted([*p.rglob("*.yaml"), *p.rglob("*.yml")]):
        try:
            doc = yaml.load(f.read_text(), Loader=_loose_loader())
        except (yaml.YAMLError, UnicodeDecodeError):
            continue
        if isinstance(doc, dict) and isinstance(doc.get("task"), str):
            return p
    raise OptionError(f"--task-dir {path}: no lm-eval task file found (a YAML with `task: NAME`, `dataset_path: json` "
                      "and `dataset_kwargs: {data_files: ...}`); see docs/evaluation-tasks.md")


def _loose_loader():
    """A YAML loader that tolerates lm-eval's `!function` tags."""
    import yaml

    class Loose(yaml.SafeLoader):
        pass

    Loose.add_multi_constructor("!", lambda loader, suffix, node: None)
    return Loose


def task_manager(specs: list[TaskSpec], dirs: list[Path]):
    """lm-eval's TaskManager over our folders; its built-in index (slow to build) only when needed."""
    from lm_eval.tasks import TaskManager

    paths = [str(d) for d in dirs]
    tm = TaskManager(include_path=paths, include_defaults=False)
    if all(s.name in tm.all_tasks for s in specs):
        return tm
    tm = TaskManager(include_path=paths)
    for s in specs:
        if s.name not in tm.all_tasks:
            close = difflib.get_close_matches(s.name, tm.all_tasks, n=5, cutoff=0.6)
            hint = f"close matches: {', '.join(close)}" if close else "`lm-eval ls tasks` lists them"
            raise OptionError(f"--tasks {s.name!r}: unknown task; {hint}")
    return tm


def _local_spec(tm, name: str, dirs: list[Path]):
    """A task from our folders as an inline config whose data_files are absolute (lm-eval reads
    relative paths from the working directory); lm-eval's own tasks by name."""
    from lm_eval.tasks._yaml_loader import load_yaml

    entry = tm.task_index.get(name)
    path = getattr(entry, "yaml_path", None)
    if path is None or not any(Path(path).resolve().is_relative_to(d.resolve()) for d in dirs):
        return name
    try:
        cfg = load_yaml(path, resolve_func=True)
    except (OSError, ValueError, ImportError) as e:
        raise OptionError(f"{path}: cannot read this task file ({str(e).splitlines()[0]})") from None
    files = (cfg.get("dataset_kwargs") or {}).get("data_files")
    if isinstance(files, dict):
        cfg["dataset_kwargs"]["data_files"] = {k: _absolute(Path(path).parent, v) for k, v in files.items()}
    elif isinstance(files, (str, list)):
        cfg["dataset_kwargs"]["data_files"] = _absolute(Path(path).parent, files)
    return cfg


def _absolute(root: Path, value):
    if isinstance(value, list):
        return [_absolute(root, v) for v in value]
    p = Path(value).expanduser()
    full = p if p.is_absolute() else root / p
    if not full.is_file():
        raise OptionError(f"{root}: the task's data file {value} does not exist (paths are relative to the task YAML)")
    return str(full)


def _lm_class():
    from lm_eval.api.model import LM

    class LengthProbe(LM):
        """Stands in for the model once, before any model loads: lm-eval builds every request
        (data, few-shot examples, prompts) and we check each fits the context, at no model cost."""

        def __init__(self, tokenizer, max_length: int):
            super().__init__()
            self.tokenizer, self.max_length, self.longest, self.requests = tokenizer, max_length, 0, 0

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            for r in requests:
                context, continuation = r.args
                n = len(self.tokenizer(context + continuation, add_special_tokens=False)["input_ids"]) + 1
                self.requests += 1
                if n > self.longest:
                    self.longest = n
                if n > self.max_length:
                    raise OptionError(f"--tasks {r.task_name}: an item needs {n} tokens (prompt with its few-shot "
                                      f"examples) but the model allows {self.max_length}; use fewer shots "
                                      f"({r.task_name}:0) or a model with a longer context")
            return [(0.0, False)] * len(requests)

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            raise OptionError(f"--tasks {requests[0].task_name}: rolling-loglikelihood (perplexity) tasks are not "
                              "supported; eval's own perplexity sections cover that")

        def generate_until(self, requests, disable_tqdm: bool = False):
            raise OptionError(f"--tasks {requests[0].task_name}: generation tasks are not supported "
                              "(only loglikelihood and multiple-choice); --generate compares free text")

    return LengthProbe


def _simple_evaluate(lm, tm, spec, task, limit):
    """One task through lm-eval; its prints go to stderr (stdout carries only our result). No
    bootstrap there: it forks a process pool, and our standard errors come from the items."""
    import contextlib
    import sys

    import lm_eval

    with contextlib.redirect_stdout(sys.stderr):
        return lm_eval.simple_evaluate(model=lm, tasks=[task], num_fewshot=spec.shots, limit=limit, task_manager=tm,
                                       log_samples=True, bootstrap_iters=0, **SEEDS)


def probe(specs: list[TaskSpec], tm, dirs: list[Path], tokenizer, max_length: int, limit: int | None) -> dict:
    """Build every task's requests once without a model: data found, prompts built, lengths checked."""
    out = {}
    for spec in specs:
        lm = _lm_class()(tokenizer, max_length)
        try:
            _simple_evaluate(lm, tm, spec, _local_spec(tm, spec.name, dirs), limit)
        except OptionError:
            raise
        except (OSError, ValueError, KeyError, TypeError, ImportError, RuntimeError) as e:
            first = (str(e).splitlines() or [type(e).__name__])[0][:300]
            raise OptionError(f"--tasks {spec.name}: lm-eval could not build the task ({type(e).__name__}: {first}); "
                              "its data must be local (--task-dir, or the datasets cache)") from None
        out[spec.label()] = {"requests": lm.requests, "longest_tokens": lm.longest}
    return out


def _items(result: dict, spec: TaskSpec) -> tuple[str, list[float], list[str], list[int], bool, float | None]:
    """(metric, per-item values, subtask per item, doc ids, higher_is_better, lm-eval's own score)."""
    leaves = sorted(result["samples"])
    first = result["configs"][leaves[0]]
    metric = spec.metric or first["metric_list"][0]["metric"]
    for leaf in leaves:
        kind = result["configs"][leaf].get("output_type")
        if kind not in SUPPORTED_OUTPUTS:
            raise OptionError(f"--tasks {spec.name}: subtask {leaf} has output_type {kind}; only loglikelihood and "
                              "multiple-choice tasks are supported")
    values, groups, docs = [], [], []
    for leaf in leaves:
        for s in sorted(result["samples"][leaf], key=lambda s: s["doc_id"]):
            if metric not in s:
                raise OptionError(f"--tasks {spec.name}: subtask {leaf} has no per-item metric {metric!r}")
            values.append(float(s[metric]))
            groups.append(leaf)
            docs.append(int(s["doc_id"]))
    higher = bool(result.get("higher_is_better", {}).get(leaves[0], {}).get(metric, True))
    own = result["results"].get(spec.name, {}).get(f"{metric},none")
    return metric, values, groups, docs, higher, own


def score_tasks(model, tokenizer, specs: list[TaskSpec], tm, dirs: list[Path], max_length: int, limit: int | None,
                batch_size: int, log) -> dict:
    """Every task on one loaded model: score, stderr and per-item outcomes, with timing."""
    from lm_eval.models.huggingface import HFLM

    from solar_quant.evaluate.paired import group_means, stderr

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
    out = {}
    for spec in specs:
        log(f"task {spec.label()}")
        start = time.monotonic()
        result = _simple_evaluate(lm, tm, spec, _local_spec(tm, spec.name, dirs), limit)
        seconds = time.monotonic() - start
        metric, values, groups, docs, higher, own = _items(result, spec)
        g = np.asarray(groups) if spec.group_mean else None
        v = np.asarray(values)
        out[spec.label()] = {
            "task": spec.name, "shots": result["n-shot"].get(sorted(result["samples"])[0]), "metric": metric,
            "higher_is_better": higher, "score": group_means(v, g), "stderr": stderr(v, g),
            "lm_eval_score": own, "subtasks": len(set(groups)), "group_mean": spec.group_mean, "n": len(values),
            "seconds": seconds, "items_per_s": len(values) / seconds if seconds > 0 else None,
            "items": values, "item_groups": groups if len(set(groups)) > 1 else None, "doc_ids": docs}
    return out


def paired_rows(base: dict, variant: dict, resamples: int = 2000, seed: int = 0) -> dict:
    """Per task: delta vs baseline with its paired bootstrap interval, and flips."""
    from solar_quant.evaluate.paired import flips, paired_bootstrap

    out = {}
    for label, v in variant.items():
        b = base[label]
        if b["doc_ids"] != v["doc_ids"] or b["item_groups"] != v["item_groups"]:
            raise OptionError(f"task {label}: the baseline and the variant were scored on different items")
        g = np.asarray(b["item_groups"]) if b["group_mean"] and b["item_groups"] else None
        boot = paired_bootstrap(np.asarray(b["items"]), np.asarray(v["items"]), g, resamples=resamples, seed=seed)
        drop = -boot["delta"] if b["higher_is_better"] else boot["delta"]
        out[label] = {**boot, "drop": drop, **flips(np.asarray(b["items"]), np.asarray(v["items"]))}
    return out
