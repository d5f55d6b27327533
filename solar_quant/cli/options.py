"""Shared `Annotated` option aliases, so every verb spells a flag the same way."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

Device = Annotated[str, typer.Option("--device", help="cpu, cuda or cuda:N.")]
RopeScalingOpt = Annotated[str, typer.Option("--rope-scaling", help="keep (the model's own), none, dynamic:F or linear:F.")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace OUT if it exists (only once the new one is complete).")]
ShardSize = Annotated[str, typer.Option("--shard-size", help="Largest output shard, e.g. 2GB, 500MB.")]
CalibrationArtifact = Annotated[Optional[str], typer.Option("--calibration", help="A calibration artifact folder made by `solar-quant calibrate`.")]
CalibSource = Annotated[Optional[list[str]], typer.Option("--source", help="Calibration source FILE[:WEIGHT] (repeatable); default: the bundled set.")]
CalibFormat = Annotated[Optional[list[str]], typer.Option("--format", help="Force a source's format (auto, orca, alpaca, chat, text); one per --source, or one for all.")]
Template = Annotated[str, typer.Option("--template", help="solar, chat_template (the tokenizer's own) or raw.")]
NSamples = Annotated[int, typer.Option("--nsamples", help="Calibration samples.")]
SeqLen = Annotated[int, typer.Option("--seqlen", help="Tokens per calibration sample.")]
Seed = Annotated[int, typer.Option("--seed", help="Sampling seed (same inputs + seed give byte-identical output).")]
Short = Annotated[str, typer.Option("--short", help="Samples shorter than --seqlen: pack (concatenate) or drop.")]
OUT_FLAGS = ("--out", "-o")  # the output folder, spelled the same by quantize, calibrate, eval and run
