"""`solar-quant inspect PATH`: a checkpoint's facts from its headers alone."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from solar_quant import console
from solar_quant.cli.errors import friendly


@friendly
def inspect(
    path: Annotated[str, typer.Argument(help="Checkpoint folder (config.json + safetensors).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print machine-readable JSON.")] = False,
) -> None:
    """Architecture, sizes, heads, rope settings, shards and quantization of a checkpoint, read from headers only."""
    from solar_quant.inspect import format_inspect, inspect_checkpoint

    info = inspect_checkpoint(path)
    console.result(json.dumps(info, indent=2) if as_json else format_inspect(info))


def register(app: typer.Typer) -> None:
    app.command("inspect")(inspect)
