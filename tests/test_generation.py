"""`eval --generate`: prompt files, rendering with the project's templates, greedy decoding,
path comparison and the baseline's log-likelihood of an answer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import ROOT, assert_clean_failure, cli
from solar_quant.calibration.templates import SolarTemplate
from solar_quant.errors import InputError, OptionError
from solar_quant.evaluate import generation as gen


def test_compare_finds_the_first_divergence_and_the_share_of_identical_positions():
    assert gen.compare([1, 2, 3], [1, 2, 3]) == {"first_divergence": None, "identical_share": 1.0, "identical": True}
    assert gen.compare([1, 2, 3, 4], [1, 2, 9, 4]) == {"first_divergence": 2, "identical_share": 0.75, "identical": False}
    # one answer stops early (EOS): they part where the shorter ends
    r = gen.compare([1, 2, 3, 4], [1, 2])
    assert (r["first_divergence"], r["identical_share"], r["identical"]) == (2, 0.5, False)
    assert gen.compare([], [])["identical"]


def test_the_shipped_prompt_set_reads_and_covers_every_kind():
    path = ROOT / "calibration" / "prompts.jsonl"
    prompts = gen.read_prompts(str(path))
    kinds = {json.loads(line)["kind"] for line in path.read_text().splitlines()}
    assert kinds == {"instruction", "reasoning", "multi-turn", "long input"}
    assert any(len([m for m in conv if m["role"] == "user"]) > 1 for _, conv in prompts)
    assert len({pid for pid, _ in prompts}) == len(prompts)


@pytest.mark.parametrize("line, needle", [
    ("{not json", "not valid JSON"),
    ('{"id": "a"}', "\"messages\""),
    ('{"messages": [{"role": "robot", "content": "x"}]}', "role"),
    ('{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}', "last message"),
    ('["a list"]', "expected an object"),
])
def test_a_malformed_prompt_line_is_named_by_file_and_line(tmp_path, line, needle):
    f = tmp_path / "p.jsonl"
    f.write_text('{"id": "ok", "prompt": "Hello"}\n# a comment\n' + line + "\n")
    with pytest.raises(InputError, match=rf"p\.jsonl:3: .*{needle}"):
        gen.read_prompts(str(f))


def test_duplicate_ids_and_empty_files_are_refused(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"id": "a", "prompt": "x"}\n{"id": "a", "prompt": "y"}\n')
    with pytest.raises(InputError, match="p.jsonl:2: id 'a'"):
        gen.read_prompts(str(f))
    f.write_text("\n# nothing\n")
    with pytest.raises(InputError, match="no prompts"):
        gen.read_prompts(str(f))


def test_prompts_render_with_the_project_templates(tiny_llama):
    from solar_quant.evaluate.loading import load_tokenizer

    tok = load_tokenizer(tiny_llama)
    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"}]
    (p,) = gen.render([("x", conv)], "solar", tok, "f", 64, 4)
    assert p.text == SolarTemplate().render(conv)
    assert p.text.endswith("### User:\nBye\n\n### Assistant:\n")
    (c,) = gen.render([("x", conv)], "chat_template", tok, "f", 64, 4)
    assert c.text == tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    assert c.ids == tok(c.text, add_special_tokens=False)["input_ids"]
    with pytest.raises(OptionError, match="prompt 'x' has .* exceeds the model's context of 20"):
        gen.render([("x", conv)], "solar", tok, "f", 20, 16)


def test_greedy_answers_follow_the_argmax_and_loglik_matches_a_full_forward(tiny_llama):
    from solar_quant.evaluate.loading import load_model, load_tokenizer

    model = load_model(tiny_llama, torch.device("cpu"), torch.float32).model
    tok = load_tokenizer(tiny_llama)
    (p,) = gen.render([("x", [{"role": "user", "content": "Name three colours."}])], "solar", tok, "f", 64, 8)
    answer = gen.greedy(model, tok, p, 8, torch.device("cpu"))
    assert 0 < len(answer) <= 8
    with torch.inference_mode():
        logits = model(torch.tensor([p.ids + answer])).logits[0].double()
    steps = logits[len(p.ids) - 1:len(p.ids) - 1 + len(answer)]
    assert steps.argmax(-1).tolist() == answer
    want = torch.log_softmax(steps, -1).gather(1, torch.tensor(answer)[:, None]).mean().item()
    assert gen.mean_loglik(model, p, answer, torch.device("cpu")) == pytest.approx(want, abs=1e-4)
    # the greedy first token is the most likely one: any other first token scores lower
    other = [(answer[0] + 1) % model.config.vocab_size]
    cpu = torch.device("cpu")
    assert gen.mean_loglik(model, p, other, cpu) < gen.mean_loglik(model, p, answer[:1], cpu)


def test_cli_names_a_malformed_prompt_line_and_writes_nothing(tiny_llama, tmp_path):
    f = tmp_path / "prompts.jsonl"
    f.write_text('{"id": "a", "prompt": "Hello"}\n{"id": "b", "messages": "oops"}\n')
    out = tmp_path / "r"
    proc = cli("eval", tiny_llama, tiny_llama, "--out", out, "--generate", f, "--passkey-trials", "0",
               "--seqlen", "16", "--max-tokens", "64")
    assert_clean_failure(proc, "prompts.jsonl:2")
    assert "loading" not in proc.stderr
    assert not out.exists()
