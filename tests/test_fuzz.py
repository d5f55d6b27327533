"""Bounded fuzzing of the parsers we own: whatever the input, they either succeed or raise one
of our `SolarQuantError` subclasses (which the CLI turns into one line) — never anything else.

Each property runs a fixed number of examples (deadline off: this machine is shared), plus
explicit examples for the inputs that once crashed a parser (listed in README "Reliability").
"""

from __future__ import annotations

import json
import string

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from solar_quant.errors import SolarQuantError

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                    max_leaves=12)
DEEP = "[" * 100_000  # deeper than the recursion limit of json and tomllib (short in reports)


def only_ours(fn, *args, **kwargs):
    """Call fn; an exception other than SolarQuantError fails the test."""
    try:
        return fn(*args, **kwargs)
    except SolarQuantError as e:
        assert str(e).strip().splitlines()[0].strip(), repr(e)  # the CLI prints the first line: it must say something
        return None


# -- safetensors headers ------------------------------------------------------------------------
@FUZZ
@given(raw=st.binary(max_size=300), data_bytes=st.integers(min_value=0, max_value=1 << 40))
@example(raw=DEEP.encode(), data_bytes=0)
@example(raw=b'{"t": {"dtype": "F16", "shape": [1e400], "data_offsets": [0, 2]}}', data_bytes=2)
def test_header_bytes(raw, data_bytes):
    from solar_quant.checkpoint.headers import parse_header

    only_ours(parse_header, raw, data_bytes, "fuzz.safetensors")


DTYPES = st.sampled_from(["F16", "F32", "BF16", "I32", "U8", "BOOL", "F8_E4M3", "Q4", "", "f16"])
DIMS = st.lists(st.integers(min_value=-2, max_value=1 << 20) | st.booleans() | st.floats(allow_nan=True), max_size=4)
ENTRY = st.fixed_dictionaries({}, optional={
    "dtype": DTYPES | JSON, "shape": DIMS | JSON,
    "data_offsets": st.lists(st.integers(min_value=-4, max_value=1 << 22), min_size=0, max_size=3) | JSON})


@FUZZ
@given(entries=st.dictionaries(st.text(max_size=12), ENTRY | JSON, max_size=5),
       metadata=st.none() | JSON | st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=3),
       data_bytes=st.integers(min_value=0, max_value=1 << 22))
def test_header_structured_but_wrong(entries, metadata, data_bytes):
    from solar_quant.checkpoint.headers import parse_header

    doc = dict(entries)
    if metadata is not None:
        doc["__metadata__"] = metadata
    parsed = only_ours(parse_header, json.dumps(doc).encode(), data_bytes)
    if parsed is not None:  # accepted: every range lies inside the data and matches dtype x shape
        for e in parsed[0].values():
            assert 0 <= e.begin <= e.end <= data_bytes


@FUZZ
@given(head=st.binary(min_size=0, max_size=16), body=st.binary(max_size=200))
def test_read_header_of_arbitrary_files(tmp_path_factory, head, body):
    from solar_quant.checkpoint.headers import read_header

    path = tmp_path_factory.mktemp("h") / "x.safetensors"
    path.write_bytes(head + body)
    only_ours(read_header, str(path))


# -- recipes ----------------------------------------------------------------------------------------
@FUZZ
@given(text=st.text(alphabet=string.printable + "[]{}=\"'#\u00e9", max_size=300))
@example(text="a = " + DEEP)
@example(text="x = 2021-02-30")
def test_recipe_text(tmp_path_factory, text):
    from solar_quant.recipe import load_recipe

    path = tmp_path_factory.mktemp("r") / "recipe.toml"
    path.write_text(text)
    only_ours(load_recipe, path)


def _toml_value(v) -> str:
    return json.dumps(v) if not isinstance(v, bool) else str(v).lower()


TOML_SCALAR = st.booleans() | st.integers(min_value=-10, max_value=10**6) | st.text(max_size=12) | \
    st.floats(allow_nan=False, allow_infinity=False) | st.sampled_from(
        ["bnb-nf4", "gptq", "rtn", "dynamic:2", "dynamic:0.5", "foo:2", "2GB", "0", "keep", "solar", "cpu"])
KEYS = st.sampled_from(["name", "path", "demo", "method", "bits", "group_size", "sym", "damp", "nsamples", "seqlen",
                        "rope_scaling", "shard_size", "quantize", "weight", "template", "device", "colour", "bitz",
                        "max_ppl_ratio", "contexts", "preset", "double_quant", "format", "sources"])
SECTION = st.dictionaries(KEYS, TOML_SCALAR | st.lists(TOML_SCALAR, max_size=3), max_size=6)


@FUZZ
@given(top=SECTION, model=SECTION, variants=st.lists(SECTION, max_size=2), quantize=SECTION, eval_=SECTION)
def test_recipe_structure(tmp_path_factory, top, model, variants, quantize, eval_):
    """Valid TOML with known and unknown keys and values of every type, in the recipe's sections."""
    from solar_quant.recipe import load_recipe

    lines = [f"{k} = {_toml_value(v)}" for k, v in top.items()]
    lines += ["[model]"] + [f"{k} = {_toml_value(v)}" for k, v in model.items()]
    for v in variants:
        lines += ["[[variants]]"] + [f"{k} = {_toml_value(x)}" for k, x in v.items() if k != "quantize"]
        lines += ["[variants.quantize]"] + [f"{k} = {_toml_value(x)}" for k, x in quantize.items()]
    lines += ["[eval]"] + [f"{k} = {_toml_value(v)}" for k, v in eval_.items()]
    path = tmp_path_factory.mktemp("r") / "recipe.toml"
    path.write_text("\n".join(lines) + "\n")
    only_ours(load_recipe, path)


# -- calibration readers ------------------------------------------------------------------------------
RECORD = st.fixed_dictionaries({}, optional={
    "question": JSON, "response": JSON, "system_prompt": JSON, "instruction": JSON, "input": JSON, "output": JSON,
    "messages": st.lists(st.fixed_dictionaries({}, optional={"role": st.sampled_from(["user", "assistant", "system",
                                                                                     "bot"]) | JSON,
                                                             "content": st.text(max_size=10) | JSON}) | JSON,
                         max_size=3) | JSON})
LINE = st.one_of(RECORD.map(json.dumps), JSON.map(json.dumps), st.text(max_size=30), st.just(""), st.just(DEEP))


@FUZZ
@given(lines=st.lists(LINE, max_size=6), fmt=st.sampled_from(["auto", "orca", "alpaca", "chat", "text"]),
       suffix=st.sampled_from([".jsonl", ".json", ".txt"]))
def test_calibration_reader(tmp_path_factory, lines, fmt, suffix):
    from solar_quant.calibration.sources import open_source
    from solar_quant.options import SourceSpec

    path = tmp_path_factory.mktemp("c") / f"data{suffix}"
    path.write_text("\n".join(lines))

    def read_all():
        reader = open_source(SourceSpec(path=str(path), format=fmt), log=lambda m: None)
        return [reader.document(i) for i in range(reader.count)]

    only_ours(read_all)


@FUZZ
@given(doc=st.lists(RECORD | JSON, max_size=4) | JSON)
def test_calibration_json_array(tmp_path_factory, doc):
    from solar_quant.calibration.sources import open_source
    from solar_quant.options import SourceSpec

    path = tmp_path_factory.mktemp("c") / "data.json"
    path.write_text(json.dumps(doc))
    only_ours(lambda: open_source(SourceSpec(path=str(path)), log=lambda m: None))


@FUZZ
@given(sources=st.lists(st.text(max_size=20), max_size=3), formats=st.lists(st.text(max_size=8), max_size=3))
def test_calibration_source_flags(sources, formats):
    from solar_quant.calibration.sources import parse_source_flags

    only_ours(parse_source_flags, sources, formats)


# -- option strings -------------------------------------------------------------------------------------
SPEC_TEXT = st.text(alphabet="0123456789.xX×*,GgMmTtiIBb HhAa-+e ", max_size=40) | st.text(max_size=20)


@FUZZ
@given(text=SPEC_TEXT)
@example(text="1" + "0" * 400 + "GB")
@example(text="9" * 5000 + "x80GB")
@example(text="H100-" + "9" * 400 + "GB")
def test_gpu_specs(text):
    from solar_quant.gpus import parse_gpus

    gpus = only_ours(parse_gpus, text)
    if gpus is not None:
        assert gpus and all(g.capacity > 0 for g in gpus)


@FUZZ
@given(text=SPEC_TEXT)
@example(text="1" + "0" * 400 + "GB")
@example(text="0.0000001")
def test_size_strings(text):
    from solar_quant.options import parse_size

    size = only_ours(parse_size, text)
    assert size is None or size > 0


@FUZZ
@given(text=st.text(alphabet="dynamiclnearkpofu:0123456789.-+eE_ INFinf", max_size=24) | st.text(max_size=16))
@example(text="dynamic:1e999")
@example(text="linear:nan")
def test_rope_strings(text):
    from solar_quant.rope import RopeScaling

    rope = only_ours(RopeScaling.parse, text)
    if rope is not None and rope.factor is not None:
        assert rope.factor > 1 and rope.factor != float("inf")


@FUZZ
@given(text=st.text(max_size=30))
def test_variant_names(text):
    from solar_quant.formats.sizes import Variant

    only_ours(Variant.parse, text)
