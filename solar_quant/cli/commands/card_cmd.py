"""`solar-quant card OUT [--report R]`: write or refresh the model card of a variant folder."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from solar_quant import console
from solar_quant.cli.errors import friendly


@friendly
def card(
    out: Annotated[str, typer.Argument(help="Variant folder written by `solar-quant quantize` or `run`.")],
    report: Annotated[Optional[str], typer.Option("--report", help="report.json from `solar-quant eval` that covered OUT: adds its quality table, protocol and plots.")] = None,
    license: Annotated[Optional[str], typer.Option("--license", help="Licence id for the front matter, e.g. apache-2.0 (default: the recipe's, else what the source declares).")] = None,
    base_model: Annotated[Optional[str], typer.Option("--base-model", help="Hub id of the source model, e.g. upstage/SOLAR-0-70b-16bit (default: the recipe's, else told from the source).")] = None,
) -> None:
    """Write OUT/README.md (Hub front matter, size, memory table from `plan`, loading and serving code,
    options or recipe, and with --report the evaluation against fp16), atomically, and refresh
    OUT/manifest.json. Prints the card's path."""
    from pathlib import Path

    from solar_quant.pipeline.cards import write_card

    doc, eval_dir = None, None
    if report is not None:
        doc, eval_dir = _read_report(Path(report))
    console.result(write_card(out, report=doc, eval_dir=eval_dir, license=license, base_model=base_model))


def _read_report(path):
    import json

    from solar_quant.errors import InputError

    if path.is_dir():
        path = path / "report.json"
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"--report {path}: no such file; pass the report.json written by `solar-quant eval`") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"--report {path}: not valid JSON ({e})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("models"), list):
        raise InputError(f"--report {path}: not a report written by `solar-quant eval` (no models list)")
    return doc, path.parent


def register(app: typer.Typer) -> None:
    app.command("card")(card)
