"""`solar-quant demo-model`: print the path of the embedded SmolLM2 folder, converting once."""

from __future__ import annotations

import typer

from solar_quant import console
from solar_quant.cli.errors import friendly


@friendly
def demo_model() -> None:
    """Print the path of the embedded SmolLM2-135M-Instruct fp16 folder (converted from GGUF on first use)."""
    from solar_quant.models.demo import demo_model_path

    console.result(str(demo_model_path()))


def register(app: typer.Typer) -> None:
    app.command("demo-model")(demo_model)
