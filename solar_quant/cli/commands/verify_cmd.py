"""`solar-quant verify OUT [--source SRC]`: check a variant folder; exit 1 with the findings."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from solar_quant import console
from solar_quant.cli.errors import friendly


@friendly
def verify(
    out: Annotated[str, typer.Argument(help="Variant folder written by `solar-quant quantize`.")],
    source: Annotated[Optional[str], typer.Option("--source", help="The 16-bit checkpoint it was made from: also de-quantize sampled layers and compare.")] = None,
    samples: Annotated[int, typer.Option("--samples", help="Layers de-quantized with --source (spread from first to last).")] = 2,
    as_json: Annotated[bool, typer.Option("--json", help="Print {path, source, samples, ok, findings} as JSON.")] = False,
) -> None:
    """Check manifest hashes, tensor names/dtypes/shapes, format invariants (GPTQ qzeros/g_idx/scales,
    bitsandbytes SCB/absmax/quant state), config agreement and rope settings; with --source, the
    de-quantization error of sampled layers. Prints each finding; exits 1 if there is any."""
    from solar_quant.errors import OptionError, VerificationError
    from solar_quant.verify import verify_variant

    if samples < 0:
        raise OptionError(f"--samples {samples}: must be 0 or more")
    findings = verify_variant(out, source, samples=samples)
    if as_json:
        import json

        console.result(json.dumps({"path": out, "source": source, "samples": samples if source else 0,
                               "ok": not findings, "findings": findings}, indent=2))
    else:
        for finding in findings:
            console.result(f"FAIL {finding}")
    if findings:
        raise VerificationError(f"{out}: verify found {len(findings)} problem(s); the first: {findings[0]}")
    if not as_json:
        console.result(f"OK {out}" + (f" (sampled layers match {source})" if source else ""))


def register(app: typer.Typer) -> None:
    app.command("verify")(verify)
