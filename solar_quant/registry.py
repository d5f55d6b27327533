"""The registry of quantization methods and on-disk formats: a new method or format is one entry.

A *method* (`MethodEntry`: bnb-int8, gptq, rtn, ...) says how a variant is made: its options
model, whether it needs calibration data, its builder, the format it writes, and the figures
`plan`, `run --dry-run` and the model card show. A *format* (`FormatEntry`: fp16, bitsandbytes,
gptq) says what a folder holds: how its config is recognised, the tensors of each Linear, the
invariants `verify` checks, how `inspect` summarises it and how `eval` loads it.

`Variant` is the one description of a variant's weights that every consumer reads: a method
derives it from its options (`MethodEntry.variant`), a format from a folder's config
(`FormatEntry.variant`), `plan` parses it from a name. Each format lays out the Variants whose
`kind` it lists.

The CLI, recipes, `run`, `plan`, `verify`, `eval`, `inspect` and the cards look entries up here
and never branch on a method's or format's name. The built-in entries live beside the code
they describe (`solar_quant/methods/entries/`, `solar_quant/formats/entries/`); more are loaded
from the modules named in `SOLAR_QUANT_PLUGINS` (comma-separated `module` or `module:function`)
and from the `solar_quant.plugins` entry-point group, the first time the registry is read.
See docs/adding-a-method.md.
"""

from __future__ import annotations

import importlib
import os
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

from solar_quant.errors import OptionError

PLUGINS_ENV = "SOLAR_QUANT_PLUGINS"
ENTRY_POINT_GROUP = "solar_quant.plugins"
BUILTIN_MODULES = (  # imported by name on first use, so nothing heavy runs at import time
    "solar_quant.formats.entries.fp16",
    "solar_quant.formats.entries.bitsandbytes",
    "solar_quant.formats.entries.gptq_v1",
    "solar_quant.methods.entries.bnb",
    "solar_quant.methods.entries.gptq",
    "solar_quant.methods.entries.rtn",
    "solar_quant.methods.entries.awq",
)


@dataclass(frozen=True)
class Variant:
    """What a variant's checkpoint holds, in the terms its format lays out.

    `kind` is one of the kinds its format lists ("fp16", "bnb-int8", "bnb-nf4", "bnb-fp4",
    "gptq"); `label` overrides the printed name (a method's own plan name)."""

    method: str  # the layout kind; spelled `method` since `plan` and its tests have always called it so
    double_quant: bool = False
    bits: int = 16
    group_size: int = -1  # gptq only; -1: one group over all inputs
    act_order: bool = False  # gptq only; same bytes (g_idx is always written)
    sym: bool = True  # gptq only
    skip_modules: tuple[str, ...] = ("lm_head",)  # bitsandbytes only: Linears kept 16-bit
    label: str | None = field(default=None, compare=False)

    @property
    def kind(self) -> str:
        return self.method

    @property
    def name(self) -> str:
        return self.label or format_of_kind(self.kind).variant_name(self)

    @property
    def quantized(self) -> bool:
        return format_of_kind(self.kind).quantized

    def __str__(self) -> str:
        return self.name

    @classmethod
    def parse(cls, text: str, flag: str = "--variants") -> "Variant":
        """A `plan --variants` name: each format and method entry recognises its own names."""
        t = text.strip().lower()
        for parser in _variant_parsers():
            found = parser(t, text, flag)
            if found is not None:
                return found
        raise OptionError(f"{flag} {text!r}: unknown variant; expected one of {variant_forms()}")


@dataclass(frozen=True)
class FormatEntry:
    """One on-disk format."""

    name: str  # config.json quantization_config.quant_method ("fp16": no quantization_config)
    kinds: tuple[str, ...]  # the Variant kinds it lays out
    quantized: bool
    linear_specs: Callable[..., dict]  # (variant, out, in, dtype) -> {suffix: (dtype, shape)}
    variant_name: Callable[[Variant], str]  # the name `plan` prints
    # config.json's quantization_config (None for fp16) -> Variant; appends findings and returns None when bad
    variant: Callable[..., Variant | None]  # (folder, qcfg, findings) -> Variant | None
    quantizes: Callable[[Variant, str, bool], bool]  # (variant, module, tied) -> stored quantized?
    variable_length: tuple[str, ...] = ()  # name parts of U8 tensors whose length depends on the data
    inspect: Callable[[dict], dict] | None = None  # qcfg -> the `inspect` summary
    check_linear: Callable[..., list[str]] | None = None  # (reader, module, out, in, variant) -> findings
    compare_linear: Callable[..., list[str]] | None = None  # (reader, src, module, variant, record, layer, local, W)
    parse_variant: Callable[[str, str, str], Variant | None] | None = None  # plan names of its own
    variant_forms: str = ""
    plan_defaults: tuple[str, ...] = ()
    load_kwargs: Callable[..., dict] | None = None  # eval: (qcfg, device, config) -> from_pretrained kwargs
    after_load: Callable[..., list[str]] | None = None  # eval: (model, device, dtype) -> notes
    require_runtime: Callable[[], None] | None = None  # eval: raise DependencyError when missing
    install_hint: str = ""  # eval: appended to an ImportError while loading
    card_install: str = ""  # the card's pip line
    card_serving: Callable[[dict], str] | None = None  # the card's "Serve it" text from the card's variant dict
    # the card's loading code, from the card's variant dict: {"imports", "before", "kwargs", "after"}
    # strings added around `from_pretrained` where the folder needs a kernel chosen (absent keys: nothing)
    card_loading: Callable[[dict], dict] | None = None


@dataclass(frozen=True)
class MethodEntry:
    """One quantization method (`quantize --method NAME`, a recipe's `quantize.method`)."""

    name: str
    options: type  # a frozen pydantic model whose `method` field accepts `name`
    format: str  # the FormatEntry it writes
    summary: str  # one line for `quantize --help`
    build: Callable[..., Any]  # (src, out, options, calib, output, *, device, resume, log) -> Path
    variant: Callable[[Any], Variant]  # options -> what plan, --dry-run and the card count
    describe: Callable[[dict], str]  # the card's first words, from options.model_dump()
    cli_options: Callable[[dict], dict]  # quantize's flag values -> the options model's fields
    host_memory: Callable[..., int]  # (shape, nsamples, seqlen, options=None) -> peak host bytes while quantizing
    time_range: Callable[..., tuple[float, float]]  # (shape, nsamples, seqlen, device, source_bytes, options=None) -> s
    needs_calibration: bool = False
    uses_device: bool = True  # the builder runs on --device (checked before any work)
    check_options: Callable[[Any], None] | None = None  # option checks pydantic cannot make alone, before any work
    streams: str = "decoder layer"  # what the builder holds at a time (the card says so)
    card_tags: Callable[[dict], tuple[str, ...]] | None = None  # the card's tags for method and bits (options dict)
    parse_variant: Callable[[str, str, str], Variant | None] | None = None  # plan names of its own
    variant_forms: str = ""
    plan_defaults: tuple[str, ...] = ()
    # torchrun: whether `build` takes `world=` and shares the work out (pipeline/distributed.py),
    # and if not, the reason given when it is started with several processes
    distributed: bool = False
    serial_reason: str = "quantizes each weight alone, without calibration samples to share between processes"


def call_estimate(estimate: Callable[..., Any], *args, options=None):
    """A method entry's `host_memory` or `time_range` on `args`, given `options` where it takes
    them (an entry, a plugin's above all, may model its cost from the shapes alone)."""
    import inspect

    if options is not None and "options" in inspect.signature(estimate).parameters:
        return estimate(*args, options=options)
    return estimate(*args)


_FORMATS: dict[str, FormatEntry] = {}
_METHODS: dict[str, MethodEntry] = {}
_ORIGIN: dict[tuple[str, str], str] = {}  # (table, name) -> the module that registered it
_loaded = False


def register_format(entry: FormatEntry, *, replace: bool = False) -> FormatEntry:
    return _register(_FORMATS, "format", entry, replace)


def register_method(entry: MethodEntry, *, replace: bool = False) -> MethodEntry:
    return _register(_METHODS, "method", entry, replace)


def _register(table: dict, kind: str, entry, replace: bool):
    if entry.name in table and not replace:
        raise ValueError(f"{kind} {entry.name!r} is already registered")
    table[entry.name] = entry
    _ORIGIN[kind, entry.name] = sys._getframe(2).f_globals.get("__name__", "")  # the module calling register_*
    return entry


def unregister_method(name: str) -> None:
    _METHODS.pop(name, None)


def unregister_format(name: str) -> None:
    _FORMATS.pop(name, None)


def _ensure_loaded() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module in BUILTIN_MODULES:
        importlib.import_module(module)
    _builtins_first(_FORMATS, "format")
    _builtins_first(_METHODS, "method")
    for spec in filter(None, (s.strip() for s in os.environ.get(PLUGINS_ENV, "").split(","))):
        _load_plugin(spec)
    from importlib.metadata import entry_points

    for ep in entry_points(group=ENTRY_POINT_GROUP):
        hook = ep.load()
        if callable(hook):
            hook()


def _builtins_first(table: dict, kind: str) -> None:
    """Built-in entries in BUILTIN_MODULES order (whoever imported one first), then the rest as registered."""
    rank = {m: i for i, m in enumerate(BUILTIN_MODULES)}
    names = sorted(table, key=lambda n: rank.get(_ORIGIN.get((kind, n), ""), len(rank)))
    entries = {n: table[n] for n in names}
    table.clear()
    table.update(entries)


def _load_plugin(spec: str) -> None:
    module_name, _, function = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise OptionError(f"{PLUGINS_ENV}={spec!r}: cannot import {module_name!r} ({e}); "
                          "name an importable module, optionally as module:function") from None
    if function:
        hook = getattr(module, function, None)
        if not callable(hook):
            raise OptionError(f"{PLUGINS_ENV}={spec!r}: {module_name} has no function {function!r}")
        hook()


# -- look-ups ------------------------------------------------------------------------------
def methods() -> dict[str, MethodEntry]:
    """Every registered method, in registration order."""
    _ensure_loaded()
    return dict(_METHODS)


def formats() -> dict[str, FormatEntry]:
    _ensure_loaded()
    return dict(_FORMATS)


def method_names() -> tuple[str, ...]:
    return tuple(methods())


def method(name: str, flag: str = "--method") -> MethodEntry:
    found = methods().get(name)
    if found is None:
        raise OptionError(f"{flag} {name!r}: expected one of {', '.join(method_names())}")
    return found


def format_entry(name: str) -> FormatEntry:
    return formats()[name]


def format_of_method(name: str) -> FormatEntry:
    return format_entry(method(name).format)


def format_of_kind(kind: str) -> FormatEntry:
    for entry in formats().values():
        if kind in entry.kinds:
            return entry
    raise OptionError(f"variant {kind!r}: unknown method; expected one of {variant_forms()}")


def format_of_config(qcfg) -> FormatEntry | None:
    """The format a folder's `quantization_config` (None: a 16-bit folder) names, or None."""
    if qcfg is None:
        return next((f for f in formats().values() if not f.quantized), None)
    if not isinstance(qcfg, dict):
        return None
    return next((f for f in formats().values() if f.quantized and f.name == qcfg.get("quant_method")), None)


def quantized_format_names() -> tuple[str, ...]:
    return tuple(f.name for f in formats().values() if f.quantized)


def _variant_parsers() -> list[Callable]:
    entries = [*formats().values(), *methods().values()]
    return [e.parse_variant for e in entries if e.parse_variant is not None]


def variant_forms() -> str:
    entries = [*formats().values(), *methods().values()]
    return ", ".join(e.variant_forms for e in entries if e.variant_forms)


def default_plan_variants() -> list[str]:
    entries = [*formats().values(), *methods().values()]
    return [name for e in entries for name in e.plan_defaults]
