"""`evaluate()`: check inputs, score the baseline once (cached), then each variant, then report.

One model is in memory at a time: load, score every section, run the passkey probe, drop it.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from solar_quant import progress
from solar_quant.devices import compute_dtype, resolve_device
from solar_quant.errors import GateError, OptionError
from solar_quant.evaluate import behaviour as bh
from solar_quant.evaluate import passkey as pk
from solar_quant.evaluate.baseline_cache import BaselineCache, cache_key
from solar_quant.evaluate.gates import check_gates
from solar_quant.evaluate.loading import (LoadedModel, check_same_tokenizer, load_model, load_tokenizer,
                                          effective_rope, model_identity, read_device_map, release,
                                          require_runtime)
from solar_quant.evaluate.memory import check_fits
from solar_quant.evaluate.report import build_report, console_table, write_report
from solar_quant.evaluate.scoring import BaselineCollector, VariantCollector, input_device, score_window
from solar_quant.evaluate.summary import bucketize, summarize
from solar_quant.evaluate.text import read_text
from solar_quant.evaluate.windows import Window, bucket_edges, default_bucket, long_windows, plan_windows
from solar_quant.options import EvalOptions
from solar_quant.rope import RopeScaling


@dataclass(frozen=True)
class Section:
    """One scoring protocol over the token stream: the short windows or one long context."""

    name: str
    windows: list[Window]
    protocol: dict
    context: int | None = None
    bucket: int | None = None


@dataclass
class Plan:
    device: torch.device
    dtype: torch.dtype
    rope: RopeScaling | None
    tokenizer: object
    stream: torch.Tensor
    sections: list[Section]
    passkey_template: str | None
    protocol: dict
    names: list[str]  # baseline first, then each variant: the names reports use (no local paths)
    behaviour: bh.Behaviour | None = None  # --tasks / --generate


def _sections(opts: EvalOptions, n_tokens: int) -> list[Section]:
    usable = min(n_tokens, opts.max_tokens or n_tokens)
    short = plan_windows(usable, opts.seqlen, opts.stride)
    out = [Section("short", short, {"seqlen": opts.seqlen, "stride": opts.stride or opts.seqlen,
                                    "max_tokens": opts.max_tokens, "windows": len(short),
                                    "scored_tokens": sum(w.scored for w in short)})]
    for c in sorted(set(opts.contexts)):
        if c < 2:
            raise OptionError(f"--context {c}: must be at least 2 tokens")
        wins = long_windows(n_tokens, c, opts.long_windows)
        width = opts.bucket or default_bucket(c)
        out.append(Section(f"context-{c}", wins, {"context": c, "windows": len(wins), "bucket": width,
                                                  "scored_tokens": sum(w.scored for w in wins)}, c, width))
    return out


def prepare(baseline: str, variants: list[str], opts: EvalOptions, log=progress.log,
            allow_quantized_baseline: bool = False) -> tuple[Plan, dict]:
    """Every input check that can fail, before any model loads or anything is written."""
    if not variants:
        raise OptionError("eval needs a BASELINE and at least one VARIANT folder")
    device = resolve_device(opts.device)
    dtype = compute_dtype(device, opts.dtype)
    rope = RopeScaling.parse(opts.rope_scaling, allow_static=True) if opts.rope_scaling else None
    if rope is not None and rope.kind == "keep":
        rope = None
    read_device_map(opts.device_map)
    identities = {p: model_identity(p) for p in [baseline, *variants]}
    paths = [baseline, *variants]
    names = _names(paths)
    if identities[baseline]["quant_method"] and not allow_quantized_baseline:
        raise OptionError(f"BASELINE {baseline}: is a quantized folder ({identities[baseline]['quant_method']}); ratios "
                          "and KL are measured against the 16-bit source, so pass that folder first (or "
                          "--allow-quantized-baseline to compare two variants)")
    tok = {p: check_same_tokenizer(baseline, p) for p in variants}[variants[0]]
    for p in identities:
        require_runtime(p)
    longest = max([opts.seqlen, *opts.contexts])
    memory = {p: check_fits(p, longest, dtype, device, opts.device_map,
                            flag="--context" if opts.contexts else "--seqlen") for p in identities}
    text = read_text(opts.text)
    tokenizer = load_tokenizer(baseline)
    stream = torch.tensor(tokenizer(text.text)["input_ids"], dtype=torch.long)
    sections = _sections(opts, len(stream))
    template = pk.resolve_template(opts.passkey_template, tokenizer) if opts.contexts and opts.passkey_trials else None
    for d in opts.passkey_depths:
        if not 0.0 <= d <= 1.0:
            raise OptionError(f"--passkey-depths {d}: depths are fractions between 0 and 1")
    if template is not None:
        for c in sorted(set(opts.contexts)):  # fails now, not after the baseline pass, when c is too short
            pk.build_prompt(tokenizer, "00000", 0.5, c - pk.NEW_TOKENS, template)
    protocol = {
        "text": {"source": text.label, "sha256": text.sha256, "chars": len(text.text)},
        "tokenizer": {**tok, "add_special_tokens": True}, "tokens": len(stream),
        "tokens_sha256": hashlib.sha256(stream.numpy().tobytes()).hexdigest(),
        "sections": {s.name: s.protocol for s in sections},
        "kl": {"method": "top-k + rest" if opts.kl_topk < (tok.get("vocab_size") or 0) else "exact (k >= vocab)",
               "k": opts.kl_topk},
        "rope_override": str(rope) if rope else None, "trained_length": opts.trained_length,
        "passkey": None if template is None else {"template": template, "depths": list(opts.passkey_depths),
                                                  "trials": opts.passkey_trials, "seed": opts.passkey_seed,
                                                  "new_tokens": pk.NEW_TOKENS, "contexts": sorted(set(opts.contexts))},
        "dtype": str(dtype).removeprefix("torch."), "device": str(device), "device_map": opts.device_map,
        "memory_estimate": {n: memory[p] for p, n in zip(paths, names)},
        "identities": {n: identities[p] for p, n in zip(paths, names)},
        "rope": {n: effective_rope(p, rope, opts.trained_length) for p, n in zip(paths, names)},
    }
    behaviour = bh.prepare_behaviour(opts, tokenizer, protocol["rope"][names[0]], rope)
    protocol.update(behaviour.protocol)
    return Plan(device, dtype, rope, tokenizer, stream, sections, template, protocol, names, behaviour), identities


def _load(path: str, plan: Plan, opts: EvalOptions, log) -> LoadedModel:
    log(f"loading {path}")
    return load_model(path, plan.device, plan.dtype, opts.device_map, plan.rope, opts.trained_length)


def _score(loaded: LoadedModel, plan: Plan, section: Section, collector, label: str) -> None:
    bar = progress.Progress(len(section.windows), f"{label} {section.name}", min_interval=2.0)
    for w in section.windows:
        score_window(loaded.model, plan.stream, w, collector)
        bar.step(f"windows ({w.length} tokens)")


def _passkey(loaded: LoadedModel, plan: Plan, opts: EvalOptions, label: str) -> dict:
    out = {}
    contexts = sorted(set(opts.contexts))
    bar = progress.Progress(len(contexts) * len(opts.passkey_depths) * opts.passkey_trials, f"{label} passkey")
    for c in contexts:
        rows = {}
        for d in opts.passkey_depths:
            answers = []
            for key in pk.trial_keys(opts.passkey_seed, c, d, opts.passkey_trials):
                prompt = pk.build_prompt(plan.tokenizer, key, d, c - pk.NEW_TOKENS, plan.passkey_template)
                said = pk.generate_answer(loaded.model, plan.tokenizer, prompt, input_device(loaded.model))
                answers.append({"key": key, "answer": said.strip(), "correct": pk.passkey_correct(said, key),
                                "prompt_tokens": len(prompt.ids)})
                bar.step(f"context {c} depth {d}")
            rows[str(d)] = {"accuracy": sum(a["correct"] for a in answers) / len(answers), "trials": answers}
        out[str(c)] = rows
    return out


def _baseline(baseline: str, plan: Plan, opts: EvalOptions, cache: BaselineCache, log) -> tuple[dict, dict, dict]:
    """Per-section baseline tensors and passkey results, from the cache or computed once and saved."""
    ident = [plan.protocol["identities"][plan.names[0]].get(k) for k in ("sha256", "files_sha256")]
    common = {"baseline": ident, "tokens": plan.protocol["tokens_sha256"], "k": opts.kl_topk,
              "dtype": plan.protocol["dtype"], "device": plan.device.type, "rope": plan.protocol["rope_override"],
              "trained_length": opts.trained_length}
    keys = {s.name: cache_key({**common, "section": s.protocol}) for s in plan.sections}
    data = {s.name: cache.load_tensors(s.name, keys[s.name]) for s in plan.sections}
    pk_key = cache_key({**common, "passkey": plan.protocol["passkey"]})
    passkey = cache.load_json("passkey", pk_key) if plan.passkey_template else {}
    status = {name: "hit" if t is not None else "computed" for name, t in data.items()}
    if plan.passkey_template:
        status["passkey"] = "hit" if passkey is not None else "computed"
    extra_key = cache_key({**common, **{k: plan.protocol.get(k) for k in ("tasks", "generation")}})
    extra = cache.load_json("behaviour", extra_key) if plan.behaviour.active else {}
    if plan.behaviour.active:
        status["tasks/generation"] = "hit" if extra is not None else "computed"
    timing = {"load_s": 0.0, "eval_s": 0.0}
    if "computed" in status.values():
        loaded = _load(baseline, plan, opts, log)
        timing["load_s"] = loaded.load_s
        start = time.monotonic()
        for s in plan.sections:
            if data[s.name] is None:
                collector = BaselineCollector(opts.kl_topk)
                _score(loaded, plan, s, collector, "baseline")
                data[s.name] = collector.tensors()
                cache.save_tensors(s.name, keys[s.name], data[s.name], {**common, "section": s.protocol})
        if plan.passkey_template and passkey is None:
            passkey = _passkey(loaded, plan, opts, "baseline")
            cache.save_json("passkey", pk_key, passkey)
        if plan.behaviour.active and extra is None:
            extra = bh.run_on(loaded.model, plan.tokenizer, plan.behaviour, opts, input_device(loaded.model), log)
            cache.save_json("behaviour", extra_key, extra)
        timing["eval_s"] = time.monotonic() - start
        timing["notes"] = loaded.notes
        loaded = None
        release()
    else:
        log(f"baseline: every section found in the cache at {cache.root}")
    return data, passkey or {}, {**timing, "cache": status, "cache_dir": str(cache.root)}, extra or {}


def _model_result(plan: Plan, per_section: dict, base: dict, variant: bool) -> dict:
    out = {}
    for s in plan.sections:
        r = per_section[s.name]
        b = base[s.name]
        kl, agree = (r.get("kl"), r.get("agree")) if variant else (None, None)
        overall = summarize(r["nll"], kl, agree, b["nll"] if variant else None)
        if s.context is None:
            out["short"] = overall
        else:
            edges = bucket_edges(s.context, s.bucket)
            rows = bucketize(r["positions"], edges, r["nll"], kl, agree, b if variant else None)
            out.setdefault("long", {})[str(s.context)] = {"overall": overall, "buckets": rows}
    return out


def _relative(path: Path, root: Path) -> str:
    """`path` relative to the report folder when inside it, else its name (reports carry no local path)."""
    try:
        return str(path.resolve().relative_to(root.resolve()))
    except ValueError:
        return path.name


def _names(paths: list[str]) -> list[str]:
    """Folder names, made unique ('x', 'x#2') so a model compared with itself stays readable."""
    seen: dict[str, int] = {}
    out = []
    for p in paths:
        name = Path(p).name or str(p)
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name}#{seen[name]}")
    return out


def evaluate(baseline: str, variants: list[str], opts: EvalOptions, out_dir: str, log=progress.log,
             show=progress.log, allow_quantized_baseline: bool = False) -> dict:
    """Score `variants` against `baseline`; write report.json, report.md and plots to `out_dir`.

    `show` receives the console table. Raises GateError (after writing the report) when a gate fails.
    A quantized baseline is refused unless `allow_quantized_baseline`.
    Holds the locks of `out_dir` and of a baseline cache outside it while it runs (one writer each).
    """
    from contextlib import ExitStack

    from solar_quant.checkpoint.lock import OutputLock

    cache_dir = Path(opts.cache_dir or Path(out_dir) / "baseline-cache").resolve()
    with ExitStack() as locks:
        locks.enter_context(OutputLock(out_dir))
        if Path(out_dir).resolve() not in cache_dir.parents:
            locks.enter_context(OutputLock(cache_dir))
        return _evaluate(baseline, variants, opts, out_dir, log, show, allow_quantized_baseline)


def _evaluate(baseline: str, variants: list[str], opts: EvalOptions, out_dir: str, log, show,
              allow_quantized_baseline: bool) -> dict:
    wall = time.monotonic()
    plan, identities = prepare(baseline, variants, opts, log, allow_quantized_baseline)
    cache = BaselineCache(opts.cache_dir or Path(out_dir) / "baseline-cache")
    base_data, base_passkey, base_info, base_extra = _baseline(baseline, plan, opts, cache, log)
    names = _names([baseline, *variants])
    base_info["cache_dir"] = _relative(Path(base_info["cache_dir"]), Path(out_dir))
    base_entry = {"name": names[0], "role": "baseline",
                  "identity": identities[baseline], "rope": plan.protocol["rope"][names[0]], **base_info,
                  **_model_result(plan, base_data, base_data, variant=False), "passkey": base_passkey,
                  **bh.decorate_baseline(base_extra, plan.tokenizer, opts)}
    entries = [base_entry]
    for path, name in zip(variants, names[1:]):
        loaded = _load(path, plan, opts, log)
        start = time.monotonic()
        per_section = {}
        for s in plan.sections:
            collector = VariantCollector(base_data[s.name])
            _score(loaded, plan, s, collector, name)
            per_section[s.name] = collector.tensors()
        passkey = _passkey(loaded, plan, opts, name) if plan.passkey_template else {}
        extra = bh.run_on(loaded.model, plan.tokenizer, plan.behaviour, opts, input_device(loaded.model), log) \
            if plan.behaviour.active else {}
        entries.append({"name": name, "role": "variant", "identity": identities[path],
                        "rope": loaded.rope, "notes": loaded.notes, "load_s": loaded.load_s,
                        "eval_s": time.monotonic() - start,
                        **_model_result(plan, per_section, base_data, variant=True), "passkey": passkey,
                        **bh.decorate_variant(extra, base_extra, plan.tokenizer)})
        loaded = None
        release()
    if plan.behaviour.prompts:  # fp16's log-likelihood of every answer needs the baseline once more
        loaded = _load(baseline, plan, opts, log)
        bh.score_answers(loaded.model, plan.behaviour, entries, input_device(loaded.model))
        loaded = None
        release()
    report = build_report(entries, plan.protocol, time.monotonic() - wall)
    report["gates"] = check_gates(report, opts)
    from solar_quant.signals import deferred

    with deferred():  # Ctrl-C/SIGTERM never split plots, report.json and report.md
        write_report(report, out_dir)
    show(console_table(report))
    failed = [f"{g['model']}: {g['check']} {g['value']:.4g} vs limit {g['limit']:g}"
              for g in report["gates"]["results"] if not g["passed"]]
    if failed:
        raise GateError(f"gate failed ({len(failed)}): " + "; ".join(failed) + f" (report: {Path(out_dir) / 'report.json'})")
    return report
