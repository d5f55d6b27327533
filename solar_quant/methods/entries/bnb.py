"""The bitsandbytes methods (bnb-int8, bnb-nf4, bnb-fp4): one registry entry each, sharing one
options model and one builder (`pipeline/bnb.py`), written in the bitsandbytes format."""

from __future__ import annotations

from solar_quant.options import BnbOptions
from solar_quant.registry import MethodEntry, Variant, register_method


def build(src, out, options: BnbOptions, calib, output, *, device: str = "cpu", resume: bool = False, log=None):
    from solar_quant import progress
    from solar_quant.pipeline.bnb import build_bnb_variant

    return build_bnb_variant(src, out, options, output, log=log or progress.log, device=device)


def check_options(options: BnbOptions) -> None:
    from solar_quant.pipeline.bnb import check_options

    check_options(options)


def variant(options: BnbOptions) -> Variant:
    return Variant(options.method, double_quant=options.double_quant, bits=8 if options.method == "bnb-int8" else 4,
                   skip_modules=tuple(options.skip_modules))


def cli_options(name: str, flags: dict) -> dict:
    return {"method": name, "double_quant": flags["double_quant"], "compute_dtype": flags["compute_dtype"],
            "skip_modules": tuple(flags["skip_modules"] or ("lm_head",))}


def host_memory(shape, nsamples: int, seqlen: int) -> int:
    """A few copies of the largest tensor: read, cast, quantized parts, the writer's buffer."""
    from solar_quant.memory import largest_tensor_bytes

    return 4 * largest_tensor_bytes(shape)


def time_range(shape, nsamples: int, seqlen: int, device: str, source_bytes: int, options=None) -> tuple[float, float]:
    from solar_quant.pipeline.dry_run import io_seconds

    io = io_seconds(source_bytes)
    return io, 3 * io


def _describe_int8(o: dict) -> str:
    return "A bitsandbytes LLM.int8() (8-bit) variant"


def _describe_4bit(kind: str):
    def describe(o: dict) -> str:
        return f"A bitsandbytes {kind.upper()} 4-bit variant" + (" with double quantization" if o.get("double_quant") else "")
    return describe


def _tags(name: str):
    def tags(o: dict) -> tuple[str, ...]:
        if name == "bnb-int8":
            return ("bitsandbytes", "8-bit", "int8")
        return ("bitsandbytes", "4-bit", name[4:]) + (("double-quant",) if o.get("double_quant") else ())
    return tags


def _entry(name: str, summary: str, describe) -> MethodEntry:
    return MethodEntry(
        name=name, options=BnbOptions, format="bitsandbytes", summary=summary, build=build, variant=variant,
        describe=describe, cli_options=lambda flags: cli_options(name, flags), host_memory=host_memory,
        time_range=time_range, needs_calibration=False, uses_device=True, check_options=check_options,
        streams="tensor", card_tags=_tags(name),
        serial_reason="quantizes tensor by tensor and is bound by reading and writing the shards, which more "
                      "processes would not make faster")


register_method(_entry("bnb-int8", "bitsandbytes LLM.int8 (8-bit rows with fp32 scales)", _describe_int8))
register_method(_entry("bnb-nf4", "bitsandbytes 4-bit NormalFloat (blocks of 64)", _describe_4bit("nf4")))
register_method(_entry("bnb-fp4", "bitsandbytes 4-bit float (blocks of 64)", _describe_4bit("fp4")))
