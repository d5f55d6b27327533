"""`generate` and `chat` on the tiny model (fp16, bnb-nf4, GPTQ folders), and SOLAR's template as
one renderer: variants of a source without a chat template carry one that renders exactly it."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, assert_clean_failure, cli

CONVERSATIONS = {
    "system+user": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."}],
    "multi-turn": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
                   {"role": "user", "content": "Count to three."}, {"role": "assistant", "content": "1, 2, 3."}],
    "empty system, open turn": [{"role": "system", "content": "  "}, {"role": "user", "content": "Q?"},
                                {"role": "assistant", "content": "A."}, {"role": "user", "content": "And?"}],
}


@pytest.fixture(scope="module")
def solar_source(tmp_path_factory, demo_model) -> Path:
    """The tiny random Llama with SmolLM2's tokenizer files but no chat template (as SOLAR-0-70b ships)."""
    from solar_quant.models.synthetic import llama_config, write_random_llama

    tok = tmp_path_factory.mktemp("tok-no-template")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(demo_model / name, tok / name)
    assert "chat_template" not in json.loads((tok / "tokenizer_config.json").read_text())
    path = tmp_path_factory.mktemp("solar") / "tiny-solar"
    return write_random_llama(path, llama_config(), seed=0, shard_bytes=1024 * 1024, tokenizer_from=tok)


@pytest.fixture(scope="module")
def solar_nf4(solar_source, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("nf4") / "tiny-solar-nf4"
    cli("quantize", solar_source, out, "--method", "bnb-nf4", check=True)
    return out


@pytest.fixture(scope="module")
def solar_gptq(solar_source, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("rtn") / "tiny-solar-rtn"
    cli("quantize", solar_source, out, "--method", "rtn", "--group-size", "32", check=True)
    return out


def _load_tokenizer(path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


# -- one renderer -------------------------------------------------------------------------------
def test_variant_of_a_source_without_template_renders_exactly_the_calibration_text(solar_source, solar_nf4):
    from solar_quant.calibration.sampling import DocumentEncoder, special_tokens
    from solar_quant.calibration.templates import SolarTemplate

    src_tok, var_tok = _load_tokenizer(solar_source), _load_tokenizer(solar_nf4)
    assert not src_tok.chat_template and var_tok.chat_template
    assert "chat_template" in json.loads((solar_nf4 / "tokenizer_config.json").read_text())
    assert json.loads((solar_nf4 / "solar_quant.json").read_text())["chat_template"].startswith("solar")
    specials = special_tokens(src_tok)
    bos = specials.bos_token if specials.add_bos else ""
    encoder = DocumentEncoder(src_tok, SolarTemplate())
    for name, conv in CONVERSATIONS.items():
        open_turn = conv[-1]["role"] == "user"
        rendered = var_tok.apply_chat_template(conv, tokenize=False, add_generation_prompt=open_turn)
        assert rendered == bos + SolarTemplate().render(conv), name
        if not open_turn:  # a calibration document: same ids as calibration's, which end with EOS
            ids = var_tok(rendered, add_special_tokens=False)["input_ids"]
            assert ids + [specials.eos_id] == encoder.encode([encoder.text(conv)])[0], name


def test_prompt_ids_agree_between_the_solar_renderer_and_the_variant_template(solar_source, solar_nf4):
    from solar_quant.generate import conversation, prompt_ids

    src_tok, var_tok = _load_tokenizer(solar_source), _load_tokenizer(solar_nf4)
    conv = conversation("Be brief.", [("Hi", "Hello.")], "What is 2 + 2?")
    assert prompt_ids(src_tok, "solar", conv) == prompt_ids(var_tok, "chat_template", conv)


def test_passkey_prompt_uses_the_solar_renderer():
    from solar_quant.calibration.templates import SolarTemplate
    from solar_quant.evaluate import passkey as pk

    text, special = pk.wrap("find it", "solar", None)
    assert special and text == SolarTemplate().render([{"role": "user", "content": "find it"}]) + pk.ANSWER_PREFIX
    assert text.startswith("### User:\nfind it\n\n### Assistant:\n")


def test_a_source_with_its_own_template_keeps_it_byte_for_byte(tiny_llama, tmp_path):
    out = tmp_path / "nf4"
    cli("quantize", tiny_llama, out, "--method", "bnb-nf4", check=True)
    for name in ("chat_template.jinja", "tokenizer_config.json", "tokenizer.json"):
        assert (out / name).read_bytes() == (tiny_llama / name).read_bytes(), name
    assert "chat_template" not in json.loads((out / "solar_quant.json").read_text())


# -- generate -----------------------------------------------------------------------------------
def _reference_greedy(path: Path, prompt: str, n: int) -> str:
    """What plain transformers generates greedily from SOLAR's prompt, BOS framed as calibration does."""
    import torch
    from transformers import AutoModelForCausalLM

    from solar_quant.calibration.sampling import special_tokens

    tok = _load_tokenizer(path)
    ids = tok(f"### User:\n{prompt}\n\n### Assistant:\n", add_special_tokens=False)["input_ids"]
    if special_tokens(tok).add_bos:
        ids = [tok.bos_token_id] + ids
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    x = torch.tensor([ids])
    out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, do_sample=False,
                         pad_token_id=tok.eos_token_id, temperature=None, top_p=None, top_k=None)
    return tok.decode(out[0, x.shape[1]:], skip_special_tokens=True)


def test_generate_is_greedy_deterministic_and_stdout_is_only_the_reply(solar_source):
    args = ("generate", solar_source, "Why is the sky blue?", "--max-new-tokens", "12")
    first, second = cli(*args, check=True), cli(*args, check=True)
    assert first.stdout == second.stdout
    assert first.stdout.rstrip("\n").strip() == _reference_greedy(solar_source, "Why is the sky blue?", 12).strip()
    assert "template solar" in first.stderr and "greedy" in first.stderr
    assert "loaded" not in first.stdout


def test_generate_on_a_bnb_folder_uses_its_solar_chat_template(solar_nf4):
    auto = cli("generate", solar_nf4, "Hello", "--max-new-tokens", "8", check=True)
    solar = cli("generate", solar_nf4, "Hello", "--max-new-tokens", "8", "--template", "solar", check=True)
    assert "template chat_template" in auto.stderr and "(bitsandbytes" in auto.stderr
    assert auto.stdout == solar.stdout and auto.stdout.strip()


def test_generate_on_a_gptq_folder_keeps_stdout_for_the_reply(solar_gptq):
    from solar_quant.generate import GenerateOptions, Generator, conversation

    proc = cli("generate", solar_gptq, "Hello", "--max-new-tokens", "6", "--system", "Be brief.", check=True)
    assert "(gptq" in proc.stderr
    gen = Generator(str(solar_gptq), GenerateOptions(max_new_tokens=6), log=lambda _m: None)
    streamed = io.StringIO()
    gen.reply(conversation("Be brief.", [], "Hello"), streamed)
    assert proc.stdout == streamed.getvalue() and proc.stdout.strip()  # no loader banner or INFO lines
    raw = cli("generate", solar_gptq, "Hello", "--max-new-tokens", "6", "--template", "raw", check=True)
    assert "template raw" in raw.stderr


def test_seed_card_example_is_one_command(solar_source):
    """8-bit on load, dynamic rope x2, streamed greedy reply: the seed card's snippet on transformers 5."""
    proc = cli("generate", solar_source, "Thomas is healthy, but he has to go to the hospital. What could be the reasons?",
               "--load-in-8bit", "--rope-scaling", "dynamic:2", "--max-new-tokens", "8", check=True)
    assert "(bitsandbytes, rope dynamic x2)" in proc.stderr
    assert proc.stdout.strip()


@pytest.mark.parametrize("flags, needles", [
    (("--device", "banana"), ("--device", "banana")),
    (("--template", "chat_template"), ("--template chat_template", "no chat_template")),
    (("--template", "jinja"), ("--template", "jinja")),
    (("--rope-scaling", "dynamic:0.5"), ("--rope-scaling",)),
    (("--load-in-8bit", "--load-in-4bit"), ("--load-in-8bit", "--load-in-4bit")),
    (("--temperature", "-1"), ("--temperature",)),
])
def test_generate_refuses_bad_flags_in_one_line(solar_source, flags, needles):
    assert_clean_failure(cli("generate", solar_source, "hi", *flags), *needles)


def test_load_in_8bit_refuses_a_quantized_folder(solar_nf4):
    assert_clean_failure(cli("generate", solar_nf4, "hi", "--load-in-8bit"), str(solar_nf4), "already quantized")


# -- chat ---------------------------------------------------------------------------------------
def test_chat_two_turns_through_stdin_carry_the_conversation(solar_source):
    from solar_quant.generate import GenerateOptions, Generator, conversation

    proc = subprocess.run([sys.executable, "-m", "solar_quant", "chat", str(solar_source), "--max-new-tokens", "6"],
                          input="first question\nsecond question\n", capture_output=True, text=True, timeout=600,
                          env=_env(), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    gen = Generator(str(solar_source), GenerateOptions(max_new_tokens=6), log=lambda _m: None)
    one, two = io.StringIO(), io.StringIO()
    r1 = gen.reply(conversation(None, [], "first question"), one)
    gen.reply(conversation(None, [("first question", r1.text)], "second question"), two)
    assert proc.stdout == one.getvalue() + two.getvalue()
    alone = io.StringIO()
    gen.reply(conversation(None, [], "second question"), alone)
    assert two.getvalue() != alone.getvalue()  # the second reply saw the first turn


def _env() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "GPTQMODEL_CPU_WORKERS": "2"}


class _Reader(threading.Thread):
    """Collects a pipe's bytes as they arrive."""

    def __init__(self, pipe):
        super().__init__(daemon=True)
        self.pipe, self.data, self.lock = pipe, b"", threading.Lock()

    def run(self):
        while chunk := os.read(self.pipe.fileno(), 4096):
            with self.lock:
                self.data += chunk

    def wait_for(self, predicate, timeout=300.0, what="output"):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            with self.lock:
                if predicate(self.data):
                    return len(self.data)
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what}; got {self.data[-2000:]!r}")


def _start(*args: str, stdin=subprocess.DEVNULL):
    # SIGINT back to its default in the child: a suite started in the background (nohup, `&`) passes
    # SIGINT down as ignored, and Python then never raises KeyboardInterrupt
    proc = subprocess.Popen([sys.executable, "-m", "solar_quant", *map(str, args)], stdin=stdin,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(), cwd=ROOT,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    out, err = _Reader(proc.stdout), _Reader(proc.stderr)
    out.start()
    err.start()
    return proc, out, err


LONG_REPLY = ("--ignore-eos", "--max-new-tokens", "100000")


def test_ctrl_c_during_generate_ends_the_reply_without_a_traceback(solar_source):
    proc, out, err = _start("generate", solar_source, "Tell me a long story.", *LONG_REPLY)
    try:
        out.wait_for(lambda d: len(d) > 0, what="the first streamed text")
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=120)
    finally:
        proc.kill()
    out.join(10)
    err.join(10)
    stderr = err.data.decode()
    assert rc == 130, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("solar-quant: error:")]
    assert len(errors) == 1 and "reply was cut short" in errors[0], stderr
    assert out.data.endswith(b"\n")


def test_ctrl_c_in_chat_ends_the_reply_and_keeps_the_session(solar_source):
    proc, out, err = _start("chat", solar_source, *LONG_REPLY, stdin=subprocess.PIPE)
    try:
        proc.stdin.write(b"first\nsecond\n")
        proc.stdin.close()  # EOF after the second message ends the session
        for turn in (1, 2):
            seen = out.wait_for(lambda d: len(d) > 0, what=f"reply {turn}") if turn == 1 else \
                out.wait_for(lambda d, n=len(out.data): len(d) > n, what=f"reply {turn}")
            assert seen
            proc.send_signal(signal.SIGINT)
            err.wait_for(lambda d, t=turn: d.count(b"(reply interrupted") >= t, what=f"reply {turn} interrupted")
            time.sleep(0.5)  # let reply 1's last flushed text arrive before watching for reply 2's
        rc = proc.wait(timeout=120)
    finally:
        proc.kill()
    stderr = err.data.decode()
    assert rc == 0, stderr
    assert "Traceback" not in stderr and "solar-quant: error" not in stderr, stderr
    assert stderr.count("(reply interrupted") == 2
