"""`solar-quant run RECIPE`: calibrate, quantize, verify, evaluate and write model cards."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from solar_quant import console
from solar_quant.cli import options as o
from solar_quant.cli.errors import friendly


@friendly
def run(
    recipe: Annotated[str, typer.Argument(help="Recipe TOML file (see recipes/).")],
    model: Annotated[Optional[str], typer.Option("--model", help="16-bit source checkpoint; overrides the recipe's model.path.")] = None,
    out: Annotated[Optional[str], typer.Option(*o.OUT_FLAGS, help="Run folder (default: out/<recipe name>).")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Keep finished variants and continue interrupted ones.")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Redo variants whose folders exist.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Validate the recipe and print the plan with memory and time estimates; run nothing.")] = False,
) -> None:
    """Carry out a recipe end to end; exit 1 if an evaluation gate fails."""
    from solar_quant.errors import GateError, OptionError

    if resume and overwrite:
        raise OptionError("--resume and --overwrite: pick one (resume keeps finished variants, overwrite redoes them)")
    if dry_run:
        from solar_quant.pipeline.dry_run import dry_run_text

        console.result(dry_run_text(recipe, model=model, out=out))
        return
    from solar_quant.pipeline.run import format_summary, run_recipe

    world = _join_world(recipe)
    try:
        result = run_recipe(recipe, model=model, out=out, resume=resume, overwrite=overwrite, world=world)
    finally:
        if world is not None:
            world.close()
    if world is not None and not world.is_main:
        return
    console.result(format_summary(result))
    if result.gate_failure:
        raise GateError(result.gate_failure)


def _join_world(recipe_path: str):
    """Under torchrun (WORLD_SIZE > 1), this process's rank in the job; None in one process."""
    from solar_quant.pipeline.distributed import World, launched

    if not launched():
        return None
    from solar_quant.pipeline.run import check_distributed
    from solar_quant.recipe import load_recipe

    recipe = load_recipe(recipe_path)
    check_distributed(recipe)
    world = World.from_env(recipe.device)
    if not world.is_main:
        console.configure(quiet=True)
    return world


def register(app: typer.Typer) -> None:
    app.command("run")(run)
