"""Recipes validate, dry runs report the plan's sizes, bad recipes fail with the key named."""

from __future__ import annotations

from pathlib import Path

import pytest

from solar_quant.errors import InputError
from solar_quant.recipe import load_recipe
from tests.conftest import ROOT, assert_clean_failure, cli

RECIPES = sorted((ROOT / "recipes").glob("*.toml"))
SOLAR = [p for p in RECIPES if p.name.startswith("solar-0-70b")]


def test_there_is_a_recipe_per_solar_deliverable():
    names = {p.stem for p in SOLAR}
    assert names == {"solar-0-70b-bnb-int8", "solar-0-70b-bnb-nf4", "solar-0-70b-bnb-nf4-dq",
                     "solar-0-70b-gptq-4bit-g128-actorder", "solar-0-70b-gptq-4bit-g32",
                     "solar-0-70b-gptq-3bit-g64-actorder", "solar-0-70b-gptq-8bit-g128"}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_validates(path):
    recipe = load_recipe(path)
    assert recipe.variants
    if path in SOLAR:
        assert recipe.model.license == "cc-by-nc-4.0"
        assert all(v.rope_scaling == "dynamic:2" for v in recipe.variants)
        assert recipe.eval is not None and recipe.eval.rope_scaling == "dynamic:2"


@pytest.fixture(scope="module")
def sparse_solar(tmp_path_factory):
    from solar_quant.models.synthetic import SOLAR_70B_CONFIG, write_sparse_llama

    return write_sparse_llama(tmp_path_factory.mktemp("solar") / "SOLAR-0-70b-16bit", SOLAR_70B_CONFIG)


@pytest.mark.parametrize("path", SOLAR, ids=lambda p: p.stem)
def test_dry_run_on_a_70b_shaped_checkpoint_reports_plan_sizes(path, sparse_solar):
    from solar_quant.architecture import LlamaShape
    from solar_quant.models.synthetic import SOLAR_70B_CONFIG
    from solar_quant.pipeline.cards import variant_of
    from solar_quant.plan import weight_bytes

    recipe = load_recipe(path)
    expected = weight_bytes(LlamaShape.from_config(SOLAR_70B_CONFIG), variant_of(recipe.variants[0].quantize))
    proc = cli("run", path, "--model", sparse_solar, "--dry-run", check=True)
    assert f"({expected:,} bytes)" in proc.stdout
    assert str(sparse_solar) in proc.stdout
    assert "fits" in proc.stdout
    assert not (Path("out") / recipe.name).exists()


def test_published_sizes_match_the_recipes_comments():
    """The 4-bit g128 act-order and 3-bit g64 recipes quote the published GPTQ sizes; plan agrees to 0.3 %."""
    from solar_quant.architecture import LlamaShape
    from solar_quant.models.synthetic import SOLAR_70B_CONFIG
    from solar_quant.pipeline.cards import variant_of
    from solar_quant.plan import weight_bytes

    shape = LlamaShape.from_config(SOLAR_70B_CONFIG)
    for stem, published in (("solar-0-70b-gptq-4bit-g128-actorder", 36.7e9), ("solar-0-70b-gptq-3bit-g64-actorder", 29.3e9)):
        v = load_recipe(ROOT / "recipes" / f"{stem}.toml").variants[0]
        assert abs(weight_bytes(shape, variant_of(v.quantize)) / published - 1) < 0.003


def _write(tmp_path, text: str) -> Path:
    p = tmp_path / "r.toml"
    p.write_text(text)
    return p


GOOD = """
name = "t"
[model]
demo = true
[[variants]]
name = "v"
[variants.quantize]
method = "gptq"
bits = 4
"""


def test_recipe_with_a_typo_names_the_key(tmp_path):
    p = _write(tmp_path, GOOD.replace("bits = 4", "bitz = 4"))
    with pytest.raises(InputError, match=r"unknown key 'variants\.0\.quantize\.bitz'"):
        load_recipe(p)
    assert_clean_failure(cli("run", p, "--dry-run"), "r.toml", "bitz")


@pytest.mark.parametrize("text,needle", [
    ("name = 't'\n[model\n", "line 2"),
    (GOOD.replace('method = "gptq"', 'method = "quip-sharp"'), "method must be one of"),
    (GOOD.replace("bits = 4", "bits = 5"), "bits"),
    (GOOD.replace('name = "v"', 'name = "v"\nrope_scaling = "dynamic:0.5"'), "dynamic:0.5"),
    (GOOD.replace('name = "v"', 'name = "v"\nrope_scaling = "warp:2"'), "rope_scaling"),
    (GOOD.replace("[[variants]]\nname = \"v\"\n[variants.quantize]\nmethod = \"gptq\"\nbits = 4\n", "variants = []\n"), "variants"),
])
def test_bad_recipes_fail_with_one_line(tmp_path, text, needle):
    assert_clean_failure(cli("run", _write(tmp_path, text), "--dry-run"), needle)


def test_missing_recipe_and_missing_model(tmp_path):
    assert_clean_failure(cli("run", tmp_path / "nope.toml", "--dry-run"), "nope.toml", "not found")
    p = _write(tmp_path, GOOD.replace("demo = true", f'path = "{tmp_path / "no-model"}"'))
    assert_clean_failure(cli("run", p, "--dry-run"), "no-model")
    assert_clean_failure(cli("run", p), "no-model")
