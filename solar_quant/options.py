"""Typed, frozen options shared by the CLI, the recipes and the library entry points.

Every stage takes one of these models: the CLI builds them from flags, a recipe from TOML.
Unknown keys are errors (`extra="forbid"`), and pydantic's messages name the field.
"""

from __future__ import annotations

import math
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from solar_quant.errors import OptionError


class Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SourceSpec(Frozen):
    """One calibration source: a file, its weight in the mix, and its format."""

    path: str
    weight: float = Field(1.0, gt=0)
    format: Literal["auto", "orca", "alpaca", "chat", "text"] = "auto"


class CalibrationOptions(Frozen):
    sources: list[SourceSpec] = Field(default_factory=list)  # empty: the bundled default set
    template: Literal["solar", "chat_template", "raw"] = "solar"
    nsamples: int = Field(128, gt=0)
    seqlen: int = Field(2048, gt=0)
    short: Literal["pack", "drop"] = "pack"  # what to do with samples shorter than seqlen
    seed: int = 0


class BnbOptions(Frozen):
    method: Literal["bnb-int8", "bnb-nf4", "bnb-fp4"]
    double_quant: bool = False
    compute_dtype: Literal["float16", "bfloat16", "float32"] = "float16"
    skip_modules: tuple[str, ...] = ("lm_head",)


class GptqOptions(Frozen):
    method: Literal["gptq", "rtn"] = "gptq"
    bits: Literal[2, 3, 4, 8] = 4
    group_size: int = 128  # -1: one group per output row (no grouping)
    sym: bool = True
    act_order: bool = False  # desc_act
    static_groups: bool = False
    damp: float = Field(0.01, gt=0, lt=1)
    mse: float = Field(0.0, ge=0)  # > 0: clipping search per group under |error|**mse (GPTQ uses 2.4)
    # the clipping search per group under the group's Hessian block (gptq only; methods/clip_hessian.py)
    clip: Literal["none", "hessian", "hessian-diag", "gptq-loss"] = "none"
    block_size: int = Field(128, gt=0)
    true_sequential: bool = True
    equalize: bool = False  # activation-aware equalization before quantizing each layer (needs calibration)
    # sweeps of coordinate descent on GPTQ's codes under the layer loss (gptq only; methods/refine.py)
    refine: int = Field(0, ge=0, le=100)
    # α of the target from the unquantized model's inputs (gptq only; methods/propagate.py); 0: off
    propagate: float = Field(0.0, ge=0, le=1)

    @field_validator("group_size")
    @classmethod
    def _group(cls, v: int) -> int:
        if v != -1 and v <= 0:
            raise ValueError("group_size must be a positive integer or -1 (no grouping)")
        return v

    @model_validator(mode="after")
    def _one_clipping(self) -> "GptqOptions":
        if self.clip != "none" and self.mse:
            raise ValueError(f"clip {self.clip!r} and mse {self.mse:g} are two measures for one clipping search; "
                             "give one of them")
        if self.propagate and not self.true_sequential:
            raise ValueError(f"propagate {self.propagate:g} follows the unquantized inputs stage by stage, which needs "
                             "true_sequential; set true_sequential, or propagate 0")
        return self


class AwqOptions(GptqOptions):
    """AWQ written as GPTQ v1: activation-aware scales folded into the 16-bit norms and linears
    (`pipeline/equalize.py`), then the GPTQ grid by round-to-nearest (`solver = "rtn"`, the
    calibration set is read for the scales only) or by GPTQ's error feedback (`solver = "gptq"`)."""

    method: Literal["awq"] = "awq"
    solver: Literal["rtn", "gptq"] = "rtn"
    equalize: Literal[True] = True  # what the method is; `--method rtn --equalize` is the same folder

    @model_validator(mode="after")
    def _clip_needs_hessians(self) -> "AwqOptions":
        if self.clip != "none" and self.solver == "rtn":
            raise ValueError(f"clip {self.clip!r} searches under the Hessians that only solver 'gptq' collects; "
                             "use mse with solver 'rtn', or solver 'gptq'")
        if self.refine and self.solver == "rtn":
            raise ValueError(f"refine {self.refine} descends on the layer loss under the Hessians that only solver "
                             "'gptq' collects; use solver 'gptq', or refine 0")
        if self.propagate and self.solver == "rtn":
            raise ValueError(f"propagate {self.propagate:g} solves towards a target under the Hessians that only "
                             "solver 'gptq' collects; use solver 'gptq', or propagate 0")
        return self


class OutputOptions(Frozen):
    shard_size: int = Field(2 * 1024**3, gt=0)  # bytes
    rope_scaling: str = "keep"  # keep | none | dynamic:F | linear:F
    overwrite: bool = False
    # gptq/rtn: seconds between saved resume points (job.json + the hidden states entering the next
    # layer); 0 saves after every layer. A 70B's states are 8.6 GB (128 x 2048 x 8192 fp32): saving
    # them after each ~15 s layer would cost more disk time than the quantization itself.
    checkpoint_every: float = Field(120.0, ge=0)


class EvalOptions(Frozen):
    text: str | None = None  # None: the bundled held-out text
    seqlen: int = Field(512, gt=0)
    stride: int | None = None  # None: equal to seqlen (non-overlapping windows)
    max_tokens: int | None = Field(None, gt=0)
    contexts: tuple[int, ...] = ()  # long-context lengths; empty: no long-context section
    bucket: int | None = None  # position-bucket width for long-context tables
    trained_length: int | None = Field(None, gt=0)
    rope_scaling: str | None = None  # None: what each model's config says
    passkey_depths: tuple[float, ...] = (0.1, 0.5, 0.9)
    passkey_trials: int = Field(3, ge=0)
    device: str = "cpu"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"  # auto: fp32 on CPU, fp16 on CUDA
    device_map: str | None = None
    max_ppl_ratio: float | None = None
    max_kld: float | None = None
    min_top1: float | None = None
    # added with `eval`: KL storage, long-context windows, passkey prompt, cache and per-bucket gates
    kl_topk: int = Field(256, gt=0)  # baseline log-probs kept per token (>= vocab: exact KL)
    long_windows: int = Field(2, gt=0)  # windows per --context length
    passkey_template: Literal["auto", "solar", "chat_template", "raw"] = "auto"
    passkey_seed: int = 0
    cache_dir: str | None = None  # None: OUT/baseline-cache
    max_ppl_ratio_bucket: float | None = None
    max_kld_bucket: float | None = None
    # added with --tasks / --generate: lm-eval task scores with flips, and generation fidelity
    tasks: tuple[str, ...] = ()  # lm-eval task/group names (NAME[:SHOTS]) or the preset h4
    limit: int | None = Field(None, gt=0)  # items per task (per subtask for groups)
    task_dir: str | None = None  # extra folder of lm-eval task YAMLs (dataset_path: json + data_files)
    task_batch_size: int = Field(8, gt=0)
    task_reference: dict[str, float] = Field(default_factory=dict)  # published fp16 scores (percent) by task
    task_reference_source: str | None = None
    generate: str | None = None  # JSON-lines prompt file
    max_new_tokens: int = Field(128, gt=0)
    generate_template: Literal["auto", "solar", "chat_template", "raw"] = "auto"
    max_task_drop: float | None = None  # gate: a task's score drop vs the baseline (metric units, 0.01 = 1 point)
    max_flips: float | None = None  # gate: share of a task's items whose outcome flips
    also_rope_scaling: tuple[str, ...] = ()  # `run`: evaluate again under each (e.g. ntk-static:2, as vLLM serves)

    @field_validator("also_rope_scaling")
    @classmethod
    def _ropes(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        from solar_quant.rope import RopeScaling

        for text in v:
            try:
                RopeScaling.parse(text, flag="also_rope_scaling", allow_static=True)
            except OptionError as e:
                raise ValueError(str(e)) from None
        return v


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B?|B)?\s*$", re.IGNORECASE)


def parse_size(text: str, flag: str = "--shard-size") -> int:
    """'2GB', '500MB', '1.5GiB', '123' (bytes) -> bytes."""
    m = _SIZE.match(str(text))
    if not m:
        raise OptionError(f"{flag} {text!r}: expected a size such as 2GB, 500MB or 1073741824")
    unit = (m.group(2) or "B").upper().rstrip("B").rstrip("I")
    factor = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}[unit]
    number = float(m.group(1)) * factor
    if not math.isfinite(number) or number > 2**63:
        raise OptionError(f"{flag} {text!r}: too large; use a size such as 2GB")
    value = int(number)
    if value <= 0:
        raise OptionError(f"{flag} {text!r}: must be larger than 0")
    return value


def build(model: type[Frozen], flag_prefix: str = "--", **values):
    """Construct an options model from CLI values; a validation error names the flag."""
    from pydantic import ValidationError

    try:
        return model(**values)
    except ValidationError as e:
        err = e.errors()[0]
        if not err["loc"]:  # a check across fields: its message names them
            raise OptionError(str(err["msg"]).removeprefix("Value error, ")) from None
        field = str(err["loc"][0])
        raise OptionError(f"{flag_prefix}{field.replace('_', '-')}: {err['msg']}") from None
