"""Templates render the exact text each model saw; BOS/EOS framing follows the tokenizer."""

from __future__ import annotations

import json
import shutil

import pytest

from solar_quant.calibration.sampling import DocumentEncoder, special_tokens
from solar_quant.calibration.templates import get_template
from solar_quant.errors import CalibrationError

# The prompt in SOLAR-0-70b's model card (no system block; ends with the open assistant header).
CARD_PROMPT = ("### User:\nThomas is healthy, but he has to go to the hospital. What could be the reasons?"
               "\n\n### Assistant:\n")


def conv(*pairs):
    return [{"role": r, "content": c} for r, c in pairs]


@pytest.fixture(scope="module")
def smol_tokenizer(demo_model):
    from solar_quant.calibration.artifact import load_tokenizer

    return load_tokenizer(demo_model)


def test_solar_without_system_matches_the_model_card():
    text = get_template("solar").render(conv(("user", "Thomas is healthy, but he has to go to the hospital. What could be the reasons?")))
    assert text == CARD_PROMPT


def test_solar_with_system_and_answer():
    text = get_template("solar").render(conv(("system", "Be brief."), ("user", "2+2?"), ("assistant", "4")))
    assert text == "### System:\nBe brief.\n\n### User:\n2+2?\n\n### Assistant:\n4"


def test_solar_empty_system_is_omitted_and_turns_follow_each_other():
    text = get_template("solar").render(conv(("system", "  "), ("user", "Hi"), ("assistant", "Hello."),
                                             ("user", "Name a color."), ("assistant", "Blue.")))
    assert text == "### User:\nHi\n\n### Assistant:\nHello.\n\n### User:\nName a color.\n\n### Assistant:\nBlue."


def test_raw_joins_contents():
    assert get_template("raw").render(conv(("system", "S"), ("user", "U"), ("assistant", "A"))) == "S\n\nU\n\nA"


def test_chat_template_is_the_tokenizers_own(smol_tokenizer):
    text = get_template("chat_template", smol_tokenizer).render(conv(("user", "hi"), ("assistant", "yo")))
    assert text == ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
                    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n")


def test_unknown_template_and_missing_chat_template(smol_tokenizer):
    with pytest.raises(CalibrationError, match="unknown template"):
        get_template("alpaca")
    with pytest.raises(CalibrationError, match="needs the model's tokenizer"):
        get_template("chat_template")


def test_smollm2_bos_is_a_turn_marker_so_not_added_but_eos_is(smol_tokenizer):
    enc = DocumentEncoder(smol_tokenizer, get_template("solar"))
    assert enc.specials.bos_token == "<|im_start|>" and not enc.specials.add_bos
    ids = enc.encode([CARD_PROMPT + "Maybe a check-up."])[0]
    assert ids[0] != smol_tokenizer.bos_token_id and ids[-1] == smol_tokenizer.eos_token_id
    assert ids[:-1] == smol_tokenizer(CARD_PROMPT + "Maybe a check-up.", add_special_tokens=False)["input_ids"]


def _edited_tokenizer(src, dst, post_processor=None, **config):
    """A copy of SmolLM2's tokenizer with a Llama-like BOS setup."""
    from transformers import AutoTokenizer

    dst.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / name, dst / name)
    tj = json.loads((dst / "tokenizer.json").read_text())
    tj["post_processor"] = post_processor
    (dst / "tokenizer.json").write_text(json.dumps(tj))
    tc = {**json.loads((dst / "tokenizer_config.json").read_text()), **config}
    (dst / "tokenizer_config.json").write_text(json.dumps(tc))
    return AutoTokenizer.from_pretrained(str(dst))


def test_a_tokenizer_that_adds_bos_gets_exactly_one(demo_model, tmp_path):
    adds_bos = {"type": "TemplateProcessing", "single": [{"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}},
                                                         {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {"<|endoftext|>": {"id": "<|endoftext|>", "ids": [0], "tokens": ["<|endoftext|>"]}}}
    tok = _edited_tokenizer(demo_model, tmp_path / "llama-like", adds_bos, bos_token="<|endoftext|>")
    s = special_tokens(tok)
    assert s.add_bos and s.bos_id == 0 and "adds BOS" in s.bos_reason
    ids = DocumentEncoder(tok, get_template("solar")).encode(["<|endoftext|>already framed", "plain"])
    assert [i[:2].count(0) for i in ids] == [1, 1]
    assert ids[1][0] == 0


def test_bos_added_when_the_tokenizer_has_one_but_does_not_add_it(demo_model, tmp_path):
    tok = _edited_tokenizer(demo_model, tmp_path / "bos-no-add", None, bos_token="<|endoftext|>")
    s = special_tokens(tok)
    assert s.add_bos and "does not add it itself" in s.bos_reason
    assert DocumentEncoder(tok, get_template("raw")).encode(["x"])[0][0] == 0
