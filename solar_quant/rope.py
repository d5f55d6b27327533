"""Rope settings: parse `--rope-scaling` and write them into a config the transformers-5 way.

transformers 5 keeps rope in `config.rope_parameters = {rope_type, rope_theta, factor?}`;
older configs carry a top-level `rope_theta` and a `rope_scaling` dict. We read both and
always write the new form, keeping the model's own rope_theta.

`ntk-static:F` exists only for `eval`: it emulates the one static NTK base that vLLM's
`DynamicNTKScalingRotaryEmbedding` computes for decoders (see `static_ntk_base`), so a variant
can be scored as vLLM serves it. No runtime reads it from a config, so variants never carry it.
"""

from __future__ import annotations

from dataclasses import dataclass

from solar_quant.errors import OptionError

SCALED_TYPES = ("dynamic", "linear")
STATIC_NTK = "ntk-static"


def static_ntk_base(base: float, factor: float, rotary_dim: int) -> float:
    """vLLM's decoder base: `base * ((factor * L_max / L) - (factor - 1)) ** (d / (d - 2))` at
    L_max = factor * L, i.e. `base * (factor**2 - factor + 1) ** (d / (d - 2))`, for every length.

    (vllm/model_executor/layers/rotary_embedding/dynamic_ntk_scaling_rope.py before PR 41277;
    transformers' dynamic NTK reaches this base only at a sequence of factor x the trained length.)
    """
    return float(base) * (factor * factor - factor + 1.0) ** (rotary_dim / (rotary_dim - 2))


def dynamic_ntk_base(base: float, factor: float, rotary_dim: int, seq_len: int, trained: int) -> float:
    """transformers' dynamic NTK base for a sequence of `seq_len` tokens (unchanged up to `trained`)."""
    seq = max(seq_len, trained)
    return float(base) * ((factor * seq / trained) - (factor - 1.0)) ** (rotary_dim / (rotary_dim - 2))


@dataclass(frozen=True)
class RopeScaling:
    """`kind` is 'keep' (leave the config alone), 'none', 'dynamic', 'linear' or (eval only) 'ntk-static'."""

    kind: str = "keep"
    factor: float | None = None

    @classmethod
    def parse(cls, text: str, flag: str = "--rope-scaling", allow_static: bool = False) -> "RopeScaling":
        text = (text or "keep").strip().lower()
        if text in ("keep", "none"):
            return cls(text)
        kind, _, factor = text.partition(":")
        if kind == STATIC_NTK and not allow_static:
            raise OptionError(f"{flag} {text!r}: ntk-static:F is an `eval` emulation of vLLM's rope, not a config "
                              "setting; write dynamic:F or linear:F into a variant")
        if kind not in (*SCALED_TYPES, STATIC_NTK):
            extra = ", ntk-static:F" if allow_static else ""
            raise OptionError(f"{flag} {text!r}: expected keep, none, dynamic:F, linear:F{extra} (e.g. dynamic:2)")
        try:
            value = float(factor)
        except ValueError:
            raise OptionError(f"{flag} {text!r}: the factor after ':' must be a number > 1, e.g. {kind}:2") from None
        if not value > 1.0 or value != value or value == float("inf"):
            raise OptionError(f"{flag} {text!r}: the factor must be a finite number > 1")
        return cls(kind, value)

    def __str__(self) -> str:
        return self.kind if self.factor is None else f"{self.kind}:{self.factor:g}"


def rope_theta(cfg: dict) -> float:
    params = cfg.get("rope_parameters") or {}
    legacy = cfg.get("rope_scaling") or {}
    return float(params.get("rope_theta") or cfg.get("rope_theta") or legacy.get("rope_theta") or 10000.0)


def read_rope(cfg: dict) -> dict:
    """The config's rope settings as {rope_type, rope_theta, factor?}."""
    params = dict(cfg.get("rope_parameters") or {})
    legacy = cfg.get("rope_scaling") or {}
    rope_type = params.get("rope_type") or legacy.get("rope_type") or legacy.get("type") or "default"
    out = {"rope_type": rope_type, "rope_theta": rope_theta(cfg)}
    factor = params.get("factor", legacy.get("factor"))
    if factor is not None:
        out["factor"] = float(factor)
    return out


def apply_rope(cfg: dict, scaling: RopeScaling) -> dict:
    """Return a copy of config dict `cfg` with rope settings written as transformers 5 reads them."""
    out = dict(cfg)
    if scaling.kind == "keep":
        params = read_rope(cfg)
        if "rope_parameters" in cfg or "rope_scaling" in cfg or "rope_theta" in cfg:
            params = {**(cfg.get("rope_parameters") or {}), **params}
    elif scaling.kind == "none":
        params = {"rope_type": "default", "rope_theta": rope_theta(cfg)}
    else:
        params = {"rope_type": scaling.kind, "factor": scaling.factor, "rope_theta": rope_theta(cfg)}
    out.pop("rope_scaling", None)
    out.pop("rope_theta", None)
    out["rope_parameters"] = params
    return out
