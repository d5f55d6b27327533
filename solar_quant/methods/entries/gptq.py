"""The GPTQ method entry: calibrated, layer by layer (`pipeline/gptq.py`), written as GPTQ v1."""

from __future__ import annotations

from solar_quant.errors import OptionError
from solar_quant.options import GptqOptions
from solar_quant.registry import MethodEntry, Variant, register_method

GPTQ_FLAGS = ("bits", "group_size", "act_order", "static_groups", "sym", "damp", "mse", "clip", "block_size", "equalize", "refine",
              "propagate")


def build(src, out, options: GptqOptions, calib, output, *, device: str = "cpu", resume: bool = False, log=None,
          world=None):
    from solar_quant import progress
    from solar_quant.pipeline.gptq import build_gptq_variant

    return build_gptq_variant(src, out, options, calib, output, device=device, resume=resume, log=log or progress.log,
                              world=world)


def variant(options: GptqOptions) -> Variant:
    """The GPTQ v1 tensors these options write (RTN writes the same layout)."""
    return Variant("gptq", bits=options.bits, group_size=options.group_size, act_order=options.act_order,
                   sym=options.sym)


DEFAULT_MSE_NORM = 2.4  # `--clip mse` without `--mse`: GPTQ's own norm


def cli_options(name: str, flags: dict) -> dict:
    """quantize's flags -> GptqOptions fields. `--clip mse|hessian|hessian-diag|none` picks the clipping
    search; `--mse NORM` alone keeps meaning `--clip mse` with that norm."""
    fields = {"method": name, **{k: flags[k] for k in GPTQ_FLAGS if k in flags}}
    clip = flags.get("clip")
    if clip is None:
        fields["clip"] = "none"
    elif clip == "mse":
        fields.update(clip="none", mse=flags.get("mse") or DEFAULT_MSE_NORM)
    elif clip == "none":
        if flags.get("mse"):
            raise OptionError(f"--clip none and --mse {flags['mse']:g} contradict each other; drop one")
    elif clip not in ("hessian", "hessian-diag", "gptq-loss"):
        raise OptionError(f"--clip {clip!r}: expected none, mse, hessian, hessian-diag or gptq-loss")
    return fields


def describe_grid(o: dict, name: str) -> str:
    g = o.get("group_size")
    grouping = "no grouping" if g == -1 else f"group size {g}"
    clip = f"clipping search (norm {o['mse']}), " if o.get("mse") else ""
    clip += {"hessian": "Hessian-weighted clipping search, ", "hessian-diag": "clipping search weighted by the Hessian "
             "diagonal, ", "gptq-loss": "clipping search under GPTQ's loss, "}.get(o.get("clip") or "none", "")
    clip += "activation-aware equalization, " if o.get("equalize") else ""
    clip += f"{o['refine']} coordinate-descent sweeps on the codes, " if o.get("refine") else ""
    clip += f"targets from the unquantized model's inputs (alpha {o['propagate']:g}), " if o.get("propagate") else ""
    return (f"A {name} {o.get('bits')}-bit variant ({grouping}, {'act-order, ' if o.get('act_order') else ''}{clip}"
            f"{'symmetric' if o.get('sym', True) else 'asymmetric'})")


def host_memory(shape, nsamples: int, seqlen: int, options=None) -> int:
    """Two layers in fp32 (the one quantized and the next, read meanwhile), the calibration
    activations entering and leaving it, two Hessians. --propagate: the unquantized model's
    activations beside them (twice the activations), a third layer (its unquantized copy) and
    the cross product beside the Hessian."""
    from solar_quant.memory import FP32, calibration_activation_bytes, largest_tensor_bytes, linear_params

    streams = 2 if getattr(options, "propagate", 0) else 1
    acts = calibration_activation_bytes(nsamples, seqlen, shape.hidden, FP32) * streams  # layer inputs and outputs
    hessians = (1 + streams) * max(shape.hidden, shape.intermediate) ** 2 * FP32
    return (1 + streams) * linear_params(shape) * FP32 + acts + hessians + 2 * largest_tensor_bytes(shape)


def time_range(shape, nsamples: int, seqlen: int, device: str, source_bytes: int, options=None) -> tuple[float, float]:
    """0.6x-1.6x the point estimate measured in bench/ (pipeline/dry_run.py), plus reading and writing the shards."""
    from solar_quant.pipeline.dry_run import gptq_compute_s, io_seconds

    io = io_seconds(source_bytes)
    clip = getattr(options, "mse", 0) > 0 or getattr(options, "clip", "none") != "none"
    compute = gptq_compute_s(shape, nsamples, seqlen, device, clip=clip, equalize=bool(getattr(options, "equalize", False)),
                             refine=int(getattr(options, "refine", 0) or 0),
                             propagate=bool(getattr(options, "propagate", 0)))
    return 0.6 * compute + io, 1.6 * compute + 2 * io


register_method(MethodEntry(
    name="gptq", options=GptqOptions, format="gptq", summary="GPTQ with calibration data (Hessian error feedback)",
    build=build, variant=variant, describe=lambda o: describe_grid(o, "GPTQ"),
    cli_options=lambda flags: cli_options("gptq", flags), host_memory=host_memory, time_range=time_range,
    needs_calibration=True, streams="decoder layer", card_tags=lambda o: ("gptq", f"{o['bits']}-bit"),
    distributed=True))
