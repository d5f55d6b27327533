"""`solar-quant plan [PATH | --preset NAME] --gpus 2x80GB`: bytes, fit and layer split per variant."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer

from solar_quant import console
from solar_quant.cli.errors import friendly

PRESETS = ("solar-0-70b",)


@friendly
def plan(
    path: Annotated[Optional[str], typer.Argument(help="Checkpoint folder (reads config.json and headers only).")] = None,
    preset: Annotated[Optional[str], typer.Option("--preset", help="A bundled model shape instead of PATH: solar-0-70b.")] = None,
    gpus: Annotated[str, typer.Option("--gpus", help="GPUs, e.g. 2x80GB, 1x48GB, 4x24GB, 2xH100 or 80GB,24GB.")] = "1x80GB",
    context: Annotated[int, typer.Option("--context", help="Tokens per sequence held in the KV cache.")] = 10240,
    batch: Annotated[int, typer.Option("--batch", help="Sequences at once.")] = 1,
    variants: Annotated[Optional[list[str]], typer.Option("--variants", help="Only these (repeatable or comma-separated), e.g. fp16,bnb-nf4,gptq-4b-g128.")] = None,
    logits: Annotated[str, typer.Option("--logits", help="all: score every position (eval); last: generation only.")] = "all",
    device_map_out: Annotated[Optional[str], typer.Option("--device-map-out", help="Write the recommended variant's device_map (the best-quality one that fits) as JSON to this file.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")] = False,
) -> None:
    """Exact weight bytes of each variant, KV cache, runtime overhead, whether it fits the GPUs, a per-GPU layer split (device_map), and the best-quality variant that fits."""
    from solar_quant.gpus import describe, parse_gpus
    from solar_quant.plan import Variant, format_plan
    from solar_quant.plan import plan as make_plan

    shape, title = _shape(path, preset)
    gpu_list = parse_gpus(gpus)
    chosen = [Variant.parse(v) for item in (variants or []) for v in item.split(",") if v.strip()] or None
    from solar_quant.quality import best, recommendation, recommendation_lines

    rows = make_plan(shape, gpu_list, context, batch, chosen, logits)
    advice = recommendation(rows, gpus, context, batch, logits)
    if device_map_out:
        _write_device_map(device_map_out, best(rows))
        advice["device_map_out"] = device_map_out
    if as_json:
        doc = {"model": title, "gpus": [g.capacity for g in gpu_list], "context": context, "batch": batch,
               "logits": logits, "figures_for": advice["figures_for"], "recommendation": advice,
               "rows": [r.to_dict() for r in rows]}
        console.result(json.dumps(doc, indent=2))
    else:
        lines = recommendation_lines(advice)
        if device_map_out:
            lines.insert(2, f"  device_map of {advice['variant']} written to {device_map_out}")
        console.result(format_plan(rows, title, f"{gpus} ({describe(gpu_list)})", context, batch, logits)
                       + "\n\n" + "\n".join(lines))


def _shape(path: str | None, preset: str | None):
    from solar_quant.architecture import LlamaShape
    from solar_quant.errors import OptionError

    if (path is None) == (preset is None):
        raise OptionError("give a checkpoint PATH or --preset solar-0-70b (exactly one)")
    if preset is not None:
        if preset.lower() not in PRESETS:
            raise OptionError(f"--preset {preset!r}: unknown preset; available: {', '.join(PRESETS)}")
        from solar_quant.models.synthetic import SOLAR_70B_CONFIG

        return LlamaShape.from_config(SOLAR_70B_CONFIG, "preset solar-0-70b"), "model: SOLAR-0-70b (preset, fp16 source)"
    from solar_quant.checkpoint.reader import CheckpointReader

    reader = CheckpointReader(path)
    reader.require_llama()
    shape = LlamaShape.from_config(reader.config, str(reader.path / "config.json"))
    return shape, f"model: {reader.path} ({shape.parameter_count() / 1e9:.2f} B parameters)"


def _write_device_map(target: str, row) -> None:
    from pathlib import Path

    from solar_quant.errors import OptionError, OutputError

    if row is None:
        raise OptionError(f"--device-map-out {target}: no variant fits the given GPUs, so there is no device_map to write")
    out = Path(target)
    if not out.parent.is_dir():
        raise OutputError(f"--device-map-out {target}: folder {out.parent} does not exist; create it first")
    tmp = out.with_name(f".{out.name}.partial")
    try:
        tmp.write_text(json.dumps(row.device_map, indent=2) + "\n")
        tmp.replace(out)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise OutputError(f"--device-map-out {target}: cannot write ({e.strerror}); choose a writable path") from None


def register(app: typer.Typer) -> None:
    app.command("plan")(plan)
