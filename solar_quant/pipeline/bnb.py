"""Stream a 16-bit Llama checkpoint into a bitsandbytes 8-bit or 4-bit variant, one tensor at a time.

Each tensor is read (memory-mapped), quantized if it is a Linear weight that the skip list
does not name, and appended to the output shards; nothing else is held. The folder is
staged beside OUT and renamed into place only when complete, so a failure (disk full,
NaN in a weight, Ctrl-C) leaves nothing under OUT's name.
"""

from __future__ import annotations

from pathlib import Path

import torch

from solar_quant import progress
from solar_quant.architecture import is_linear_weight
from solar_quant.checkpoint.reader import CheckpointReader
from solar_quant.checkpoint.writer import ShardedWriter, StagedFolder
from solar_quant.errors import OptionError
from solar_quant.formats import bnb as fmt
from solar_quant.methods import bnb as method
from solar_quant.options import BnbOptions, OutputOptions
from solar_quant.pipeline import malloc
from solar_quant.pipeline.preflight import check_source
from solar_quant.rope import RopeScaling
from solar_quant.variant import copy_side_files, tool_record, variant_config

STORE_DTYPE = method.STORE_DTYPE


def build_bnb_variant(src: str | Path, out: str | Path, bnb: BnbOptions, output: OutputOptions,
                      log=progress.log, device: str = "cpu") -> Path:
    """Write the bitsandbytes variant of checkpoint `src` to folder `out`; return its path.

    `device` (cpu, cuda, cuda:N) is where bitsandbytes quantizes; it is checked before any work."""
    from solar_quant.devices import resolve_device

    device = str(resolve_device(device))
    reader, rope = _check_inputs(src, out, bnb, output)
    staged = StagedFolder(out, overwrite=output.overwrite)
    try:
        with malloc.freed_memory_returned_promptly():
            counts = _write_tensors(reader, staged, bnb, output.shard_size, device)
        qcfg = fmt.quantization_config(bnb)
        staged.write_json("config.json", variant_config(reader.config, qcfg, rope, dtype="float16"))
        copy_side_files(reader, staged)
        options = {**bnb.model_dump(mode="json"), "shard_size": output.shard_size, "rope_scaling": str(rope)}
        staged.write_json("solar_quant.json", tool_record(reader, bnb.method, options, tensors=counts))
        final = staged.commit()
    except BaseException:
        staged.abandon()
        raise
    log(f"wrote {final} ({counts['quantized']} linears quantized, {counts['kept']} tensors kept in 16-bit)")
    return final


def _check_inputs(src, out, bnb: BnbOptions, output: OutputOptions) -> tuple[CheckpointReader, RopeScaling]:
    """Every refusal that needs no tensor data, before any work starts."""
    source = check_source(src, out, rope_scaling=output.rope_scaling, overwrite=output.overwrite)
    check_options(bnb)
    return source.reader, source.rope


def check_options(bnb: BnbOptions) -> None:
    """The bnb options that pydantic cannot judge alone."""
    if bnb.double_quant and bnb.method == "bnb-int8":
        raise OptionError("--double-quant: applies to bnb-nf4 and bnb-fp4 only; drop it for bnb-int8")
    for key in bnb.skip_modules:
        fmt.should_quantize("probe", (key,))  # an invalid pattern fails here, naming --skip-modules


def _write_tensors(reader: CheckpointReader, staged: StagedFolder, bnb: BnbOptions, shard_size: int,
                   device: str) -> dict[str, int]:
    writer = ShardedWriter(staged.staging, shard_size)
    names = sorted(reader.tensors, key=lambda n: reader.info(n).shard)  # stable: weight-map order within a shard
    bar = progress.Progress(len(names), f"{bnb.method}: tensor", min_interval=0.5)
    counts = {"quantized": 0, "kept": 0}
    for name in names:
        tensor = reader.get(name)
        _require_finite(reader, name, tensor)
        if _quantizes(name, reader, bnb):
            parts = quantize_weight(tensor.to(STORE_DTYPE), bnb, device)
            for full, t in fmt.linear_tensors(fmt.module_name(name), parts).items():
                writer.add(full, t)
            counts["quantized"] += 1
        else:
            writer.add(name, tensor.to(STORE_DTYPE) if tensor.is_floating_point() else tensor)
            counts["kept"] += 1
        del tensor
        reader.release()  # unmap what was read: resident memory stays near one tensor
        bar.step(name)
    writer.close()
    return counts


def quantize_weight(weight: torch.Tensor, bnb: BnbOptions, device: str = "cpu") -> dict[str, torch.Tensor]:
    """One Linear weight -> the module-relative tensors bitsandbytes serializes for it."""
    return method.quantize_linear(weight, bnb.method, bnb.double_quant, device=device)


def _quantizes(name: str, reader: CheckpointReader, bnb: BnbOptions) -> bool:
    """The Linears transformers replaces: the decoder projections and an untied lm_head, minus skips."""
    linear = is_linear_weight(name) or (name == "lm_head.weight" and len(reader.info(name).shape) == 2)
    return linear and fmt.should_quantize(fmt.module_name(name), bnb.skip_modules)


def _require_finite(reader: CheckpointReader, name: str, tensor: torch.Tensor) -> None:
    reader.require_finite(name, tensor)
