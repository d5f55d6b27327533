"""Recipes: one TOML file per deliverable, validated by pydantic (unknown keys are errors).

A recipe names the model, the calibration set, one or more variants (method + options +
output settings) and the evaluation protocol with its gates. `solar-quant run RECIPE`
carries it out; `--dry-run` validates it and prints the plan.
"""

from __future__ import annotations

import difflib
import re
import tomllib
import typing
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, Field, SerializeAsAny, ValidationError, field_validator
from pydantic_core import PydanticCustomError

from solar_quant import registry
from solar_quant.errors import InputError
from solar_quant.options import CalibrationOptions, EvalOptions, Frozen, parse_size
from solar_quant.rope import RopeScaling


def _method_options(value):
    """A `quantize` table -> the options model of the method it names (registry look-up);
    pydantic reports the nested errors at their place in the recipe."""
    if not isinstance(value, dict):
        return value
    name = value.get("method")
    entries = registry.methods()
    if name is None:
        raise PydanticCustomError("union_tag_not_found", "missing key 'method'")
    if not isinstance(name, str) or name not in entries:
        raise PydanticCustomError("union_tag_invalid", "unknown method {name!r}", {"name": name})
    return entries[name].options.model_validate(value)


QuantizeOptions = Annotated[SerializeAsAny[Frozen], BeforeValidator(_method_options)]


class ModelSection(Frozen):
    """`path` is a local 16-bit checkpoint folder; `demo = true` uses the embedded SmolLM2."""

    path: str | None = None
    demo: bool = False
    preset: Literal["solar-0-70b"] | None = None  # shapes for --dry-run when the checkpoint is not at hand
    name: str = "model"
    license: str | None = None  # the cards' `license` (default: what the source declares)
    base_model: str | None = None  # the cards' `base_model`, a Hub id (default: told from the source)
    template: Literal["solar", "chat_template", "raw"] = "solar"


class VariantSection(Frozen):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9._-]+$")
    quantize: QuantizeOptions
    rope_scaling: str = "keep"
    shard_size: str = "2GB"

    @field_validator("rope_scaling")
    @classmethod
    def _rope(cls, v: str) -> str:
        RopeScaling.parse(v, flag="rope_scaling")
        return v

    @field_validator("shard_size")
    @classmethod
    def _size(cls, v: str) -> str:
        parse_size(v, flag="shard_size")
        return v


class Recipe(Frozen):
    name: str = Field(min_length=1)
    description: str = ""
    model: ModelSection
    calibration: CalibrationOptions = CalibrationOptions()
    variants: list[VariantSection] = Field(min_length=1)
    eval: EvalOptions | None = None  # None: no evaluation step
    device: str = "cpu"  # cpu, cuda or cuda:N; whether it is present is checked when a step runs there

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not re.fullmatch(r"cpu|cuda(:[0-9]+)?", v):
            raise ValueError(f"{v!r}: expected cpu, cuda or cuda:N")
        return v

    @field_validator("variants")
    @classmethod
    def _unique(cls, v: list[VariantSection]) -> list[VariantSection]:
        names = [x.name for x in v]
        if len(set(names)) != len(names):
            raise ValueError(f"variant names must be unique, found {names}")
        return v

    def needs_calibration(self) -> bool:
        return any(registry.method(v.quantize.method).needs_calibration or getattr(v.quantize, "equalize", False)
                   for v in self.variants)  # rtn with equalize = true measures activations too


def load_recipe(path: str | Path) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: recipe file not found; pass a .toml file (see recipes/)")
    try:
        doc = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise InputError(f"{path}: invalid TOML: {e}") from None
    except UnicodeDecodeError:
        raise InputError(f"{path}: not UTF-8 text") from None
    except RecursionError:
        raise InputError(f"{path}: invalid TOML: arrays or tables nested too deeply") from None
    try:
        return Recipe.model_validate(doc)
    except ValidationError as e:
        raise InputError(f"{path}: {_first_error(e, doc)}") from None
    except InputError as e:  # raised by a field validator (e.g. a bad rope_scaling string)
        raise InputError(f"{path}: {e}") from None


def _first_error(e: ValidationError, doc: dict) -> str:
    errors = e.errors()
    # a misspelt key shows up as the right key missing and an unknown one: name the unknown one
    err = next((x for x in errors if x["type"] == "extra_forbidden"), errors[0])
    parts = list(err["loc"])
    loc = ".".join(str(p) for p in parts)
    if err["type"] == "extra_forbidden":
        guess = difflib.get_close_matches(str(parts[-1]), _known_keys(parts[:-1], doc), n=1, cutoff=0.6)
        hint = f"; did you mean '{'.'.join(map(str, parts[:-1] + guess))}'?" if guess else ""
        return f"unknown key '{loc}'{hint} (check the spelling against recipes/README.md)"
    if err["type"] == "missing":
        return f"missing key '{loc}'"
    if err["type"] == "union_tag_invalid":
        return f"'{loc}': method must be one of {', '.join(registry.method_names())}"
    return f"'{loc}': {err['msg']}"


def _known_keys(loc: list, doc) -> list[str]:
    """The keys the recipe schema allows in the table at `loc` (a pydantic error location); a
    `quantize` table's keys are those of the method it names."""
    model: type[BaseModel] | None = Recipe
    for part in loc:
        doc = doc[part] if isinstance(doc, (dict, list)) and _has(doc, part) else None
        if model is None:
            return []
        if isinstance(part, int):
            continue
        if part == "quantize" and model is VariantSection:
            name = doc.get("method") if isinstance(doc, dict) else None
            model = registry.methods()[name].options if isinstance(name, str) and name in registry.methods() else None
            continue
        field = model.model_fields.get(str(part))
        model = _model_in(field.annotation) if field is not None else None
    return list(model.model_fields) if model is not None else []


def _has(doc, part) -> bool:
    return part in doc if isinstance(doc, dict) else isinstance(part, int) and 0 <= part < len(doc)


def _model_in(annotation) -> type[BaseModel] | None:
    """The one pydantic model inside an annotation such as `X | None` or `list[X]` (None if 0 or 2+)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    found = {m for arg in typing.get_args(annotation) if (m := _model_in(arg)) is not None}
    return found.pop() if len(found) == 1 else None


def resolve_model(recipe: Recipe, override: str | None) -> Path | None:
    """The 16-bit checkpoint a recipe runs on: `--model`, else `model.path`, else the embedded demo model."""
    if override:
        return Path(override)
    if recipe.model.path:
        return Path(recipe.model.path).expanduser()
    if recipe.model.demo:
        from solar_quant.models.demo import demo_model_path

        return demo_model_path()
    return None
