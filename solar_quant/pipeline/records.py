"""What a GPTQ / RTN run records: its options (one serialisation, used by the resume check in
`.job/job.json` and by `solar_quant.json`), the warnings it gave, and the tool record."""

from __future__ import annotations

from solar_quant.architecture import LlamaShape
from solar_quant.variant import tool_record

# Runtimes that refuse a group size that does not divide a linear's inputs.
PARTIAL_GROUP_REFUSERS = ("transformers' default CPU kernel for 4-bit (GPTQModel TorchAtenLinear)",
                          "vLLM Marlin kernels")


# Options added after the first jobs were saved, with the value that does what those jobs did: a
# resume point saved before an option existed matches a run that leaves it at this value.
ADDED_OPTIONS = {"equalize": False, "clip": "none", "refine": 0, "propagate": 0.0}


def recorded_options(gptq, output, device) -> dict:
    """The options of a run as recorded: the method's, then the output's, then the device kind."""
    return {**gptq.model_dump(), "rope_scaling": output.rope_scaling, "shard_size": output.shard_size,
            "device": device.type}


def calibration_card(calib) -> dict | None:
    if calib is None:
        return None
    from solar_quant.calibration.artifact import ids_sha256

    return {**calib.card, "input_ids_sha256": ids_sha256(calib.input_ids),
            "nsamples": int(calib.input_ids.shape[0]), "seqlen": int(calib.input_ids.shape[1])}


def partial_group_warnings(shape: LlamaShape, group_size: int) -> list[dict]:
    """One warning naming the linears whose inputs the group size does not divide (all layers alike)."""
    G = group_size
    if G == -1:
        return []
    bad = {name: k for name, (_, k) in shape.linear_shapes().items() if k % G}
    if not bad:
        return []
    names = ", ".join(f"{n} (K={k})" for n, k in bad.items())
    message = (f"group size {G} does not divide the inputs of {names} in all {shape.layers} layers: the last group of "
               f"each row is partial. The GPTQ format allows it, but {' and '.join(PARTIAL_GROUP_REFUSERS)} will not "
               f"load these layers; load with GPTQConfig(backend='gptq_torch') "
               f"(solar_quant.formats.gptq_runtime.from_pretrained_kwargs does)")
    return [{"kind": "partial_groups", "group_size": G, "linears": bad, "layers": "all",
             "refused_by": list(PARTIAL_GROUP_REFUSERS), "message": message}]


def run_record(reader, method: str, options: dict, calib, layers: list, warnings: list) -> dict:
    return tool_record(reader, method, options, calibration=calibration_card(calib), layers=layers, warnings=warnings)
