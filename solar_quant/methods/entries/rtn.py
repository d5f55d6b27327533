"""The RTN (round-to-nearest) method entry: GPTQ's grid without calibration, written as GPTQ v1
by the same layer-by-layer driver."""

from __future__ import annotations

from solar_quant.methods.entries import gptq
from solar_quant.errors import OptionError
from solar_quant.options import GptqOptions
from solar_quant.registry import MethodEntry, register_method


def check_options(options: GptqOptions) -> None:
    if options.clip != "none":
        raise OptionError(f"--clip {options.clip}: the Hessian-weighted clipping search needs the Hessians that only "
                          "--method gptq collects; use --clip mse with rtn, or --method gptq")
    if options.refine:
        raise OptionError(f"--refine {options.refine}: the coordinate descent runs on the layer loss under the "
                          "Hessians that only --method gptq collects; use --method gptq, or drop --refine")
    if options.propagate:
        raise OptionError(f"--propagate {options.propagate:g}: the propagated target is solved for under the Hessians "
                          "that only --method gptq collects; use --method gptq, or drop --propagate")


def build(src, out, options: GptqOptions, calib, output, *, device: str = "cpu", resume: bool = False, log=None):
    check_options(options)
    # --equalize measures activations: then the calibration set is used (for the scales only)
    return gptq.build(src, out, options, calib if options.equalize else None, output, device=device, resume=resume, log=log)


def host_memory(shape, nsamples: int, seqlen: int) -> int:
    """Two layers in fp32 (the one quantized and the next, read meanwhile) and two copies of the
    largest tensor; no activations, no Hessians."""
    from solar_quant.memory import FP32, largest_tensor_bytes, linear_params

    return 2 * linear_params(shape) * FP32 + 2 * largest_tensor_bytes(shape)


def time_range(shape, nsamples: int, seqlen: int, device: str, source_bytes: int, options=None) -> tuple[float, float]:
    from solar_quant.pipeline.dry_run import io_seconds

    io = io_seconds(source_bytes)
    return io, 3 * io


register_method(MethodEntry(
    name="rtn", options=GptqOptions, format="gptq", summary="round-to-nearest on the GPTQ grid, no calibration",
    build=build, variant=gptq.variant, describe=lambda o: gptq.describe_grid(o, "round-to-nearest (RTN), GPTQ v1 layout,"),
    cli_options=lambda flags: gptq.cli_options("rtn", flags), host_memory=host_memory, time_range=time_range,
    needs_calibration=False, check_options=check_options, streams="decoder layer", card_tags=lambda o: ("gptq", f"{o['bits']}-bit", "rtn")))
