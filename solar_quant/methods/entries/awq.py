"""The AWQ method entry, "AWQ written as GPTQ v1": activation-aware equalization folded into the
16-bit tensors (`methods/awq.py`, `pipeline/equalize.py`), then RTN (default) or GPTQ on the GPTQ
grid, by the same layer-by-layer driver (`pipeline/gptq.py`). The folder is plain GPTQ v1."""

from __future__ import annotations

from solar_quant.errors import OptionError
from solar_quant.methods.entries import gptq
from solar_quant.options import AwqOptions
from solar_quant.registry import MethodEntry, register_method


def build(src, out, options: AwqOptions, calib, output, *, device: str = "cpu", resume: bool = False, log=None):
    return gptq.build(src, out, options, calib, output, device=device, resume=resume, log=log)


def cli_options(flags: dict) -> dict:
    if flags.get("act_order") or flags.get("static_groups"):
        raise OptionError("--method awq rounds to nearest; --act-order and --static-groups are GPTQ options: "
                          "use --method gptq --equalize for AWQ scales before GPTQ")
    if flags.get("clip") in ("hessian", "hessian-diag", "gptq-loss"):
        raise OptionError(f"--clip {flags['clip']}: the Hessian-weighted clipping search needs the Hessians that only "
                          "GPTQ collects; use --clip mse with awq, or --method gptq --equalize")
    if flags.get("refine"):
        raise OptionError(f"--refine {flags['refine']}: the coordinate descent runs on the layer loss under the "
                          "Hessians that only GPTQ collects; use --method gptq --equalize --refine")
    if flags.get("propagate"):
        raise OptionError(f"--propagate {flags['propagate']:g}: the propagated target is solved for under the Hessians "
                          "that only GPTQ collects; use --method gptq --equalize --propagate")
    fields = gptq.cli_options("awq", flags)
    fields.pop("equalize", None)
    return fields


def host_memory(shape, nsamples: int, seqlen: int, options=None) -> int:
    """GPTQ's: the layer's calibration activations and the Gram matrices of the scale search."""
    return gptq.host_memory(shape, nsamples, seqlen, options)


def time_range(shape, nsamples: int, seqlen: int, device: str, source_bytes: int, options=None) -> tuple[float, float]:
    return gptq.time_range(shape, nsamples, seqlen, device, source_bytes, options)


def describe(o: dict) -> str:
    text = gptq.describe_grid({**o, "equalize": False}, "AWQ (activation-aware scales folded into the 16-bit tensors, "
                              f"then {'GPTQ' if o.get('solver') == 'gptq' else 'round-to-nearest'}), GPTQ v1 layout,")
    return "An" + text[1:]  # "A AWQ ..." reads "An AWQ ..."


register_method(MethodEntry(
    name="awq", options=AwqOptions, format="gptq",
    summary="activation-aware equalization (AWQ scales folded into 16-bit tensors), then RTN, as GPTQ v1",
    build=build, variant=gptq.variant, describe=describe, cli_options=cli_options, host_memory=host_memory,
    time_range=time_range, needs_calibration=True, streams="decoder layer",
    card_tags=lambda o: ("gptq", f"{o['bits']}-bit", "awq")))
