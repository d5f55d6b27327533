"""Try a variant: build the prompt in the model's template, load the folder, stream the reply.

Used by `solar-quant generate` (one shot) and `solar-quant chat` (multi-turn). The prompt comes
from the same renderer calibration uses (`calibration.templates`), framed with BOS the way
calibration frames a document, so a reply is conditioned on the text the model was tuned on.
Loading reuses `evaluate.loading.load_model` (fp16, bitsandbytes and GPTQ folders, the CPU
GPTQ kernel choice, rope overrides).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Literal, Optional, TextIO

from pydantic import Field, field_validator

from solar_quant import progress
from solar_quant.errors import OptionError
from solar_quant.options import Frozen
from solar_quant.rope import RopeScaling

TEMPLATES = ("auto", "solar", "chat_template", "raw")


class GenerateOptions(Frozen):
    template: Literal["auto", "solar", "chat_template", "raw"] = "auto"
    system: Optional[str] = None
    max_new_tokens: int = Field(256, gt=0)
    temperature: float = Field(0.0, ge=0)  # 0: greedy
    top_p: float = Field(1.0, gt=0, le=1)
    seed: int = 0
    device: str = "cpu"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    rope_scaling: str = "keep"
    load_in: Optional[Literal["int8", "nf4"]] = None  # quantize a 16-bit folder while loading
    ignore_eos: bool = False

    @field_validator("rope_scaling")
    @classmethod
    def _rope(cls, v: str) -> str:
        RopeScaling.parse(v)
        return v


@dataclass
class Reply:
    text: str
    new_tokens: int
    interrupted: bool  # Ctrl-C ended it early


def resolve_template(name: str, tokenizer) -> str:
    """`auto`: the tokenizer's own chat template when it has one (every variant of a source
    without one carries SOLAR's, see `variant.copy_side_files`), else SOLAR's: a folder without a
    chat template is taken to be SOLAR-family, as calibration's default template assumes."""
    has_own = bool(getattr(tokenizer, "chat_template", None))
    if name == "auto":
        return "chat_template" if has_own else "solar"
    if name == "chat_template" and not has_own:
        raise OptionError("--template chat_template: the model's tokenizer has no chat_template; use --template solar or raw")
    if name not in TEMPLATES:
        raise OptionError(f"--template {name!r}: expected one of {', '.join(TEMPLATES)}")
    return name


def conversation(system: str | None, turns: list[tuple[str, str]], user: str) -> list[dict[str, str]]:
    """System message (if any), earlier (user, assistant) turns, then the new user message."""
    msgs = [{"role": "system", "content": system}] if system else []
    for u, a in turns:
        msgs += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
    return msgs + [{"role": "user", "content": user}]


def prompt_ids(tokenizer, template: str, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of the prompt that asks for the next assistant turn."""
    if template == "chat_template":
        from jinja2 import TemplateError

        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except TemplateError as e:
            raise OptionError(f"--template chat_template: the tokenizer's chat template rejected the conversation "
                              f"({e}); use --template solar or raw") from None
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    from solar_quant.calibration.sampling import special_tokens
    from solar_quant.calibration.templates import get_template

    if template == "raw":
        text = "\n\n".join(m["content"] for m in messages if m["content"].strip())
    else:
        text = get_template(template).render(messages)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    specials = special_tokens(tokenizer)  # BOS exactly as calibration frames a document
    return [specials.bos_id] + ids if specials.add_bos and ids[:1] != [specials.bos_id] else ids


def _streamer_class():
    from transformers import TextStreamer

    class CollectingStreamer(TextStreamer):
        """TextStreamer that also keeps the new token ids, so an interrupted reply keeps its text."""

        def __init__(self, tokenizer, out: TextIO | None):
            super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
            self.out, self.ids = out, []

        def put(self, value):
            """TextStreamer's put, printing all decoded text as it comes rather than up to the last
            space (a reply without spaces — code, some scripts, a looping small model — showed
            nothing), holding back only an incomplete UTF-8 character. One decode per token."""
            value = value.reshape(-1)
            if self.skip_prompt and self.next_tokens_are_prompt:
                self.next_tokens_are_prompt = False
                return
            ids = [int(t) for t in value.tolist()]
            self.ids.extend(ids)
            self.token_cache.extend(ids)
            text = self.tokenizer.decode(self.token_cache, **self.decode_kwargs)
            pending = text[self.print_len:]
            if text.endswith("\n"):
                self.token_cache, self.print_len = [], 0
            elif pending.endswith("\ufffd"):
                return
            else:
                self.print_len = len(text)
            if pending:
                self.on_finalized_text(pending)

        def on_finalized_text(self, text: str, stream_end: bool = False):
            if self.out is not None:
                self.out.write(text + ("\n" if stream_end else ""))
                self.out.flush()

    return CollectingStreamer


class Generator:
    """A loaded model with its tokenizer and prompt template, replying turn by turn."""

    def __init__(self, path: str, opts: GenerateOptions, log=progress.log):
        from solar_quant.devices import compute_dtype, resolve_device
        from solar_quant.evaluate.loading import load_model, load_tokenizer

        self.opts = opts
        rope = RopeScaling.parse(opts.rope_scaling)
        self.device = resolve_device(opts.device)
        self.tokenizer = load_tokenizer(path)
        self.template = resolve_template(opts.template, self.tokenizer)  # before the (slow) model load
        loaded = load_model(path, self.device, compute_dtype(self.device, opts.dtype),
                            rope_override=None if rope.kind == "keep" else rope, quantize_on_load=opts.load_in)
        self.model, self.rope = loaded.model, loaded.rope
        quant = loaded.quant_method or "16-bit"
        rope_text = self.rope.get("rope_type", "default") + (f" x{self.rope['factor']:g}" if "factor" in self.rope else "")
        log(f"loaded {path} ({quant}, rope {rope_text}) in {loaded.load_s:.1f} s; template {self.template}; "
            + ("greedy" if opts.temperature == 0 else f"sampling at temperature {opts.temperature:g}, top-p {opts.top_p:g}"))

    def reply(self, messages: list[dict[str, str]], out: TextIO | None = sys.stdout) -> Reply:
        """Generate the next assistant turn, streaming its text to `out`; Ctrl-C ends it early."""
        import torch

        from solar_quant.evaluate.scoring import input_device, quiet_bnb

        ids = torch.tensor([prompt_ids(self.tokenizer, self.template, messages)], device=input_device(self.model))
        streamer = _streamer_class()(self.tokenizer, out)
        kwargs = self._sampling()
        if self.opts.ignore_eos:
            kwargs["min_new_tokens"] = self.opts.max_new_tokens
        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        interrupted = False
        try:
            with torch.inference_mode(), quiet_bnb():
                self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=self.opts.max_new_tokens,
                                    streamer=streamer, pad_token_id=pad, **kwargs)
        except KeyboardInterrupt:
            interrupted = True
            streamer.end()  # print what was decoded so far, end the line
        text = tok.decode(streamer.ids, skip_special_tokens=True)
        return Reply(text.strip(), len(streamer.ids), interrupted)

    def _sampling(self) -> dict:
        if self.opts.temperature == 0:
            return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        import torch

        torch.manual_seed(self.opts.seed)
        return {"do_sample": True, "temperature": self.opts.temperature, "top_p": self.opts.top_p, "top_k": 0}

