"""`solar-quant calibrate --model PATH --out DIR`: build a calibration artifact for a tokenizer."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from solar_quant.cli import options as o
from solar_quant import console
from solar_quant.cli.errors import friendly


@friendly
def calibrate(
    model: Annotated[str, typer.Option("--model", help="Model folder whose tokenizer makes the token ids.")],
    out: Annotated[str, typer.Option(*o.OUT_FLAGS, help="Artifact folder (calibration.safetensors + calibration.json); appears only when complete.")],
    source: o.CalibSource = None,
    fmt: o.CalibFormat = None,
    template: o.Template = "solar",
    nsamples: o.NSamples = 128,
    seqlen: o.SeqLen = 2048,
    short: o.Short = "pack",
    seed: o.Seed = 0,
    overwrite: o.Overwrite = False,
) -> None:
    """Render sources with a prompt template, tokenize, mix by weight and save NSAMPLES x SEQLEN token ids with a JSON card."""
    from solar_quant.calibration.build import build_calibration, calibration_options, summary
    from solar_quant.errors import OutputError
    from solar_quant.signals import set_interrupt_hint

    set_interrupt_hint(f"interrupted; nothing partial was left under --out {out} (the artifact appears there only "
                       "when complete); rerun the same command to start again")

    opts = calibration_options(source, fmt, template=template, nsamples=nsamples, seqlen=seqlen, seed=seed, short=short)
    if Path(out).exists() and not overwrite:
        raise OutputError(f"--out {out}: already exists; pass --overwrite to replace it or choose another folder")
    calib = build_calibration(model, opts)
    path = calib.save(out, overwrite=overwrite)
    console.result(summary(calib))
    console.result(str(path))


def register(app: typer.Typer) -> None:
    app.command("calibrate")(calibrate)
