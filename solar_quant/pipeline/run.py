"""`solar-quant run RECIPE`: calibrate -> quantize -> verify -> evaluate -> model card.

Layout of the run folder (default `out/<recipe name>`):
  calibration/        the calibration artifact (if any variant needs one)
  <variant name>/     each variant folder (atomic; README.md card added after evaluation)
  eval/               report.json, report.md, plots, baseline cache
  eval-<rope>/        the same evaluation under each of eval.also_rope_scaling (e.g. ntk-static-2)
  run.json            the recipe, the resolved paths and the summary
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from solar_quant.checkpoint.reader import CheckpointReader
from solar_quant.checkpoint.writer import atomic_write_bytes
from solar_quant.errors import GateError, OutputError, VerificationError
from solar_quant.options import OutputOptions, parse_size
from solar_quant.progress import log as default_log
from solar_quant.recipe import Recipe, VariantSection, load_recipe, resolve_model


@dataclass
class RunResult:
    out: Path
    variants: dict[str, Path] = field(default_factory=dict)
    summary: list[dict] = field(default_factory=list)
    report: dict | None = None
    gate_failure: str | None = None
    rope_reports: dict[str, dict] = field(default_factory=dict)  # eval.also_rope_scaling -> its report


def run_recipe(recipe_path: str, *, model: str | None = None, out: str | None = None, resume: bool = False,
               overwrite: bool = False, log=default_log, world=None) -> RunResult:
    """Carry out the recipe into its run folder, holding that folder's lock (one run per folder).

    `world` (`pipeline.distributed.World`, under torchrun): every rank takes part in the GPTQ
    variants; rank 0 alone writes the run folder, verifies, evaluates and writes the cards."""
    import contextlib

    from solar_quant.checkpoint.lock import OutputLock

    main = world is None or world.is_main
    with OutputLock(out or Path("out") / load_recipe(recipe_path).name) if main else contextlib.nullcontext():
        return _run_recipe(recipe_path, model=model, out=out, resume=resume, overwrite=overwrite, log=log, world=world)


def check_distributed(recipe: Recipe) -> None:
    """Under torchrun, every variant's method must share its work out (GPTQ does; bnb and RTN do not)."""
    from solar_quant import registry
    from solar_quant.errors import OptionError

    for v in recipe.variants:
        entry = registry.method(v.quantize.method)
        if not entry.distributed:
            raise OptionError(f"variant {v.name}: method {v.quantize.method} {entry.serial_reason}; run this recipe "
                              "in one process (without torchrun), or keep only GPTQ variants in it")


def _run_recipe(recipe_path: str, *, model: str | None, out: str | None, resume: bool, overwrite: bool,
                log, world=None) -> RunResult:
    recipe = load_recipe(recipe_path)
    model_path = resolve_model(recipe, model)
    if model_path is None:
        raise OutputError(f"{recipe_path}: model.path is not set; pass --model PATH to the 16-bit checkpoint")
    _preflight(recipe, model_path)
    from solar_quant.pipeline.gptq import column_loop_from_env

    column_loop_from_env()  # a bad $SOLAR_QUANT_COLUMN_LOOP is refused before the first step
    root = Path(out or Path("out") / recipe.name)
    result = RunResult(root)
    _check_outputs(root, recipe, resume, overwrite)
    main = world is None or world.is_main
    if main:
        root.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()

    timings: dict = {"wall_s": {}, "cpu_s": {}}  # per stage, as measured by this process

    def timed(stage: str, fn, *args):
        wall, cpu = time.monotonic(), time.process_time()
        try:
            return fn(*args)
        finally:
            timings["wall_s"][stage] = round(time.monotonic() - wall, 1)
            timings["cpu_s"][stage] = round(time.process_time() - cpu, 1)

    calib = None
    if recipe.needs_calibration():
        calib = timed("calibration", _calibration, recipe, model_path, root, resume, log) if main else \
            _calibration_in_memory(recipe, model_path)
    for v in recipe.variants:
        result.variants[v.name] = timed(f"quantize {v.name}", _quantize, recipe, v, model_path, root, calib, resume,
                                        overwrite, log, world)
    if not main:
        return result  # rank 0 verifies, evaluates and writes the cards and run.json
    for name, path in result.variants.items():
        timed(f"verify {name}", _verify, path, model_path, log)

    if recipe.eval is not None:
        from solar_quant.evaluate.run import evaluate

        log(f"[run] evaluating {len(result.variants)} variant(s) against {model_path}")
        try:
            result.report = timed("eval", evaluate, str(model_path), [str(p) for p in result.variants.values()],
                                  recipe.eval, str(root / "eval"), log)
        except GateError as e:
            result.gate_failure = str(e)
            result.report = json.loads((root / "eval" / "report.json").read_text())
        for rope in recipe.eval.also_rope_scaling:  # e.g. ntk-static:2: the variants as vLLM serves them
            result.rope_reports[rope] = _eval_under(recipe, rope, model_path, result, root, log)
    timed("cards", _write_cards, recipe, Path(recipe_path), model_path, result)
    result.summary = _summary(result)
    atomic_write_bytes(root / "run.json", (json.dumps({  # names and sha256s, no local paths (it may be published)
        "recipe": {"name": Path(recipe_path).name, "sha256": hashlib.sha256(Path(recipe_path).read_bytes()).hexdigest()},
        "model": CheckpointReader(model_path).identity(), "variants": {k: v.name for k, v in result.variants.items()},
        "summary": result.summary, "gate_failure": result.gate_failure,
        "seconds": round(time.monotonic() - started, 1), "timings": timings}, indent=2) + "\n").encode())
    return result


def _preflight(recipe: Recipe, model_path: Path) -> None:
    """Every refusal the source, the device and the variants' options allow before any work:
    nothing is created and no calibration set is built before these pass."""
    from solar_quant.pipeline.preflight import check_source

    from solar_quant import registry

    check_source(model_path)
    entries = [registry.method(v.quantize.method) for v in recipe.variants]
    if any(e.uses_device for e in entries):
        from solar_quant.devices import resolve_device

        resolve_device(recipe.device)
    for v, entry in zip(recipe.variants, entries):  # rope_scaling and shard_size are checked when the recipe loads
        if entry.check_options is not None:
            entry.check_options(v.quantize)


def _check_outputs(root: Path, recipe: Recipe, resume: bool, overwrite: bool) -> None:
    if resume or overwrite:
        return
    for v in recipe.variants:
        if (root / v.name).exists():
            raise OutputError(f"{root / v.name}: already exists; pass --resume to keep finished variants or --overwrite to redo them")


def _calibration(recipe: Recipe, model_path: Path, root: Path, resume: bool, log):
    from solar_quant.calibration.artifact import load_calibration
    from solar_quant.calibration.build import build_calibration

    path = root / "calibration"
    if path.exists() and resume:
        log(f"[run] reusing calibration artifact {path}")
        return load_calibration(path)
    calib = build_calibration(str(model_path), recipe.calibration, log=log)
    calib.save(path, overwrite=True)
    return load_calibration(path)


def _calibration_in_memory(recipe: Recipe, model_path: Path):
    """A rank other than 0 builds the same calibration set without writing it (the job checks
    that every rank's token ids agree)."""
    from solar_quant.calibration.build import build_calibration

    return build_calibration(str(model_path), recipe.calibration, log=lambda m: None)


def _quantize(recipe: Recipe, v: VariantSection, model_path: Path, root: Path, calib, resume: bool, overwrite: bool, log,
              world=None) -> Path:
    final = root / v.name
    complete = resume and (final / "manifest.json").is_file()
    if world is not None:
        complete = world.share(complete)  # rank 0's folder decides
    if complete:
        log(f"[run] {v.name}: already complete, kept")
        return final
    output = OutputOptions(shard_size=parse_size(v.shard_size, "shard_size"), rope_scaling=v.rope_scaling, overwrite=overwrite)
    log(f"[run] {v.name}: quantizing with {v.quantize.method}")
    from solar_quant import registry

    entry = registry.method(v.quantize.method)
    if v.quantize.method == "gptq" and calib is not None and (world is None or world.is_main):
        from solar_quant.pipeline.dry_run import log_gptq_estimate

        log_gptq_estimate(model_path, calib, recipe.device, v.quantize, log)
    extra = {"world": world} if world is not None else {}
    return entry.build(str(model_path), str(final), v.quantize, calib if entry.needs_calibration or getattr(v.quantize, "equalize", False) else None, output,
                       device=recipe.device, resume=resume, log=log, **extra)


def _verify(path: Path, source: Path, log) -> None:
    from solar_quant.verify import verify_variant

    findings = verify_variant(path, source=source)
    if findings:
        raise VerificationError(f"{path}: verify found {len(findings)} problem(s), first: {findings[0]}")
    log(f"[run] {path.name}: verified")


def _eval_under(recipe: Recipe, rope: str, model_path: Path, result: RunResult, root: Path, log) -> dict:
    """The recipe's evaluation again with every model's rope set to `rope`, into eval-<rope>/."""
    from solar_quant.evaluate.run import evaluate

    out = root / f"eval-{rope.replace(':', '-')}"
    opts = recipe.eval.model_copy(update={"rope_scaling": rope, "also_rope_scaling": ()})
    log(f"[run] evaluating again with --rope-scaling {rope} into {out}")
    try:
        return evaluate(str(model_path), [str(p) for p in result.variants.values()], opts, str(out), log=log)
    except GateError as e:
        result.gate_failure = "; ".join(filter(None, [result.gate_failure, f"rope {rope}: {e}"]))
        return json.loads((out / "report.json").read_text())


def _write_cards(recipe: Recipe, recipe_path: Path, model_path: Path, result: RunResult) -> None:
    from solar_quant.pipeline.cards import write_card

    text = recipe_path.read_text()
    for v in recipe.variants:
        write_card(result.variants[v.name], report=result.report, eval_dir=result.out / "eval", recipe=recipe,
                   recipe_text=text, recipe_name=recipe_path.name, rope_reports=result.rope_reports)


def _summary(result: RunResult) -> list[dict]:
    from solar_quant.pipeline.cards import eval_row_for

    rows = []
    for name, path in result.variants.items():
        size = sum(p.stat().st_size for p in path.iterdir() if p.suffix == ".safetensors")
        row = {"variant": name, "weights_gb": round(size / 1e9, 4), "path": path.name}
        if result.report:
            row.update(eval_row_for(result.report, path))
        rows.append(row)
    return rows


def format_summary(result: RunResult) -> str:
    """The console table printed at the end of `run`, then where things are."""
    if not result.summary:
        return f"run folder: {result.out}"
    cols = list(dict.fromkeys(k for row in result.summary for k in row if k != "path"))
    lines = ["  ".join(f"{c:>14}" if i else f"{c:<28}" for i, c in enumerate(cols))]
    for row in result.summary:
        cells = []
        for i, c in enumerate(cols):
            v = row.get(c, "")
            text = f"{v:.4g}" if isinstance(v, float) else str(v)
            cells.append(f"{text:>14}" if i else f"{text:<28}")
        lines.append("  ".join(cells))
    lines.append("")
    for name, path in result.variants.items():
        lines.append(f"{name}: {path} (model card: {path / 'README.md'})")
    if result.report:
        lines.append(f"evaluation report: {result.out / 'eval' / 'report.md'}")
    lines.append(f"run record: {result.out / 'run.json'}")
    if result.gate_failure:
        lines.append(f"GATE FAILED: {result.gate_failure}")
    return "\n".join(lines)
