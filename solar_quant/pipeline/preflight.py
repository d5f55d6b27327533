"""Checks before any work, shared by every method: everything that can be refused from the
command line, config.json and the shard headers is refused here, before a calibration set is
built or a tensor is read, with one line naming the file, field or flag.

`check_source` is what every quantizer runs first (and what `quantize` and `run` run before
they build calibration data); the method-specific option checks and `check_calibration`
follow it in the method's builder.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from solar_quant.architecture import LlamaShape
from solar_quant.checkpoint.reader import CheckpointReader
from solar_quant.errors import CalibrationError, OutputError
from solar_quant.rope import RopeScaling


@dataclass(frozen=True)
class Source:
    """A source checkpoint that passed the preflight."""

    reader: CheckpointReader
    shape: LlamaShape
    rope: RopeScaling


def check_source(src: str | Path, out: str | Path | None = None, *, rope_scaling: str = "keep",
                 overwrite: bool = False) -> Source:
    """Refuse a source that is not an unquantized Llama checkpoint whose shard headers hold every
    tensor config.json implies (shape and dtype), a bad `--rope-scaling`, and an output folder
    inside the source or already present (without `overwrite`)."""
    rope = RopeScaling.parse(rope_scaling)
    reader = CheckpointReader(src)
    reader.require_llama()
    reader.require_unquantized()
    shape = LlamaShape.from_config(reader.config, str(reader.path / "config.json"))
    if out is not None:
        check_output(reader, out, overwrite)
    reader.tensors  # noqa: B018 - validates every shard header now, not halfway through
    reader.require_weights(shape.tensor_shapes())  # shapes and dtypes agree with config.json
    return Source(reader, shape, rope)


def check_output(reader: CheckpointReader, out: str | Path, overwrite: bool) -> None:
    src_path, out_path = reader.path.resolve(), Path(out).resolve()
    if out_path == src_path or src_path in out_path.parents:
        raise OutputError(f"{out}: lies inside the source checkpoint {reader.path}; choose an output folder outside it")
    if out_path.exists() and not overwrite:
        raise OutputError(f"{out}: already exists; pass --overwrite to replace it or choose another output path")


def check_calibration(reader: CheckpointReader, calib, shape: LlamaShape) -> None:
    """Token ids in range, and made with this model's tokenizer (when the card says which)."""
    ids = calib.input_ids
    if ids.dim() != 2 or ids.dtype != torch.int64 or ids.numel() == 0:
        raise CalibrationError(f"calibration input_ids must be a non-empty int64 [nsamples, seqlen] tensor, "
                               f"found {ids.dtype} {list(ids.shape)}")
    if int(ids.min()) < 0 or int(ids.max()) >= shape.vocab:
        raise CalibrationError(f"calibration token ids span {int(ids.min())}..{int(ids.max())} but {reader.path} has a "
                               f"vocabulary of {shape.vocab}; rebuild the artifact with this model's tokenizer")
    from solar_quant.calibration.artifact import TOKENIZER_FILES, check_tokenizer

    has_tokenizer = any((reader.path / name).is_file() for name in TOKENIZER_FILES)
    if (calib.card or {}).get("tokenizer") and has_tokenizer:
        check_tokenizer(calib, reader.path)
