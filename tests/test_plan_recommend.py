"""`plan` recommends: the best-quality variant that fits the GPUs at the context, its device_map
with --device-map-out, the evidence behind the quality order, and whether the figures are for
serving (last-token logits) or evaluation (all logits)."""

from __future__ import annotations

import json

import pytest

from conftest import cli
from solar_quant.architecture import LlamaShape
from solar_quant.formats.sizes import Variant, default_variants
from solar_quant.gpus import parse_gpus
from solar_quant.models.synthetic import SOLAR_70B_CONFIG
from solar_quant.plan import plan
from solar_quant.quality import best, order_key, rank, recommendation

SHAPE = LlamaShape.from_config(SOLAR_70B_CONFIG)
SPECS = ("2x80GB", "1x80GB", "1x48GB", "1x24GB", "4x24GB", "80GB,24GB", "1x8GB")


def test_quality_tiers_follow_the_measurements():
    names = lambda *n: [Variant.parse(x) for x in n]  # noqa: E731
    ordered = sorted(default_variants(), key=order_key)
    position = {v.name: i for i, v in enumerate(ordered)}
    assert ordered[0].name == "fp16"
    # bits first: every 8-bit variant before every 4-bit one, 4-bit grouped GPTQ before 3-bit (AWQ paper's 70B numbers)
    assert max(position[v.name] for v in ordered if v.bits == 8) < min(position[v.name] for v in ordered if v.bits == 4)
    assert position["gptq-4b-g128"] < position["bnb-nf4"] < position["gptq-3b-g32"]  # measured on SmolLM2 / 70B
    assert position["gptq-4b-g32"] < position["gptq-4b-g64"] < position["gptq-4b-g128"]
    assert rank(Variant.parse("gptq-2b-g128")).tier > rank(Variant.parse("gptq-3b-gnone")).tier
    assert [order_key(v) for v in names("gptq-4b-g128-act")] < [order_key(v) for v in names("gptq-4b-g128")]
    for v in default_variants():
        assert rank(v).evidence  # every tier says where its place comes from


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("context,logits", [(10240, "all"), (4096, "last")])
def test_recommended_is_the_best_variant_that_fits(spec, context, logits):
    rows = plan(SHAPE, parse_gpus(spec), context, 1, None, logits)
    chosen = best(rows)
    if chosen is None:
        assert not any(r.fits for r in rows)
        return
    assert chosen.fits
    better = [r for r in rows if order_key(r.variant) < order_key(chosen.variant)]
    assert not any(r.fits for r in better), [r.variant.name for r in better if r.fits]


def test_cli_names_the_recommendation_and_writes_its_device_map(tmp_path):
    target = tmp_path / "map.json"
    proc = cli("plan", "--preset", "solar-0-70b", "--gpus", "1x48GB", "--context", "10240",
               "--device-map-out", target, check=True)
    rows = plan(SHAPE, parse_gpus("1x48GB"), 10240, 1)
    chosen = best(rows)
    assert f"recommended: {chosen.variant.name}" in proc.stdout
    assert json.loads(target.read_text()) == chosen.device_map
    assert "figures for evaluation" in proc.stdout and "all" in proc.stdout
    assert "AWQ paper" in proc.stdout or "bench/" in proc.stdout  # the evidence is cited


def test_json_states_serving_or_evaluation_and_recommends():
    doc = json.loads(cli("plan", "--preset", "solar-0-70b", "--gpus", "1x80GB", "--context", "4096", "--logits", "last",
                         "--json", check=True).stdout)
    rec = doc["recommendation"]
    assert doc["figures_for"].startswith("serving") and rec["figures_for"] == doc["figures_for"]
    fitting = {r["variant"] for r in doc["rows"] if r["fits"]}
    assert rec["variant"] in fitting
    expected = recommendation(plan(SHAPE, parse_gpus("1x80GB"), 4096, 1, None, "last"), "1x80GB", 4096, 1, "last")
    assert rec["variant"] == expected["variant"] and rec["evidence"]
    evaluation = json.loads(cli("plan", "--preset", "solar-0-70b", "--json", check=True).stdout)
    assert evaluation["figures_for"].startswith("evaluation")


def test_a_more_generous_budget_never_recommends_worse():
    """More memory per GPU can only keep or improve the recommendation."""
    previous = None
    for gib in (16, 24, 32, 40, 48, 64, 80, 96, 141):
        chosen = best(plan(SHAPE, parse_gpus(f"1x{gib}GB"), 8192, 1))
        if previous is not None and chosen is not None:
            assert order_key(chosen.variant) <= order_key(previous.variant), (gib, chosen.variant.name)
        previous = chosen or previous
