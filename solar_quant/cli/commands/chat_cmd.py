"""`solar-quant generate VARIANT PROMPT` (one shot) and `solar-quant chat VARIANT` (multi-turn):
try a folder in its own prompt template, with streamed tokens."""

from __future__ import annotations

import sys
from typing import Annotated, Optional

import typer

from solar_quant.cli import options as o
from solar_quant import console
from solar_quant.cli.errors import friendly

VariantArg = Annotated[str, typer.Argument(help="Model folder: 16-bit, bitsandbytes or GPTQ (e.g. one `quantize` wrote).")]
TemplateOpt = Annotated[str, typer.Option(
    "--template", help="auto (the tokenizer's chat template if it has one, else SOLAR's), solar, chat_template or raw.")]
SystemOpt = Annotated[Optional[str], typer.Option("--system", help="System message (SOLAR's `### System:` block).")]
MaxNewTokens = Annotated[int, typer.Option("--max-new-tokens", help="Most tokens per reply.")]
Temperature = Annotated[float, typer.Option("--temperature", help="0: greedy (default, deterministic); > 0: sample.")]
TopP = Annotated[float, typer.Option("--top-p", help="Nucleus sampling mass (with --temperature > 0).")]
SeedOpt = Annotated[int, typer.Option("--seed", help="Sampling seed (with --temperature > 0).")]
Dtype = Annotated[str, typer.Option("--dtype", help="Compute dtype: auto (fp32 on CPU, fp16 on CUDA), float32, float16, bfloat16.")]
RopeOpt = Annotated[str, typer.Option("--rope-scaling", help="keep (the folder's own), none, dynamic:F or linear:F, e.g. dynamic:2.")]
LoadIn8 = Annotated[bool, typer.Option("--load-in-8bit", help="Quantize a 16-bit folder to bitsandbytes int8 while loading.")]
LoadIn4 = Annotated[bool, typer.Option("--load-in-4bit", help="Quantize a 16-bit folder to bitsandbytes nf4 while loading.")]
IgnoreEos = Annotated[bool, typer.Option("--ignore-eos", help="Keep going past the end-of-sequence token up to --max-new-tokens.")]


def _options(template, system, max_new_tokens, temperature, top_p, seed, device, dtype, rope_scaling, load_8bit,
             load_4bit, ignore_eos):
    from solar_quant.errors import OptionError
    from solar_quant.generate import TEMPLATES, GenerateOptions
    from solar_quant.options import build

    if template not in TEMPLATES:
        raise OptionError(f"--template {template!r}: expected one of {', '.join(TEMPLATES)}")
    if load_8bit and load_4bit:
        raise OptionError("--load-in-8bit and --load-in-4bit: pick one")
    load_in = "int8" if load_8bit else "nf4" if load_4bit else None
    return build(GenerateOptions, template=template, system=system, max_new_tokens=max_new_tokens,
                 temperature=temperature, top_p=top_p, seed=seed, device=device, dtype=dtype,
                 rope_scaling=rope_scaling, load_in=load_in, ignore_eos=ignore_eos)


@friendly
def generate(
    variant: VariantArg,
    prompt: Annotated[str, typer.Argument(help="The user message; `-` reads it from stdin.")],
    template: TemplateOpt = "auto",
    system: SystemOpt = None,
    max_new_tokens: MaxNewTokens = 256,
    temperature: Temperature = 0.0,
    top_p: TopP = 1.0,
    seed: SeedOpt = 0,
    device: o.Device = "cpu",
    dtype: Dtype = "auto",
    rope_scaling: RopeOpt = "keep",
    load_in_8bit: LoadIn8 = False,
    load_in_4bit: LoadIn4 = False,
    ignore_eos: IgnoreEos = False,
) -> None:
    """Reply to PROMPT once, streaming the tokens to stdout (nothing else goes there); Ctrl-C ends the reply."""
    from solar_quant.errors import Interrupted
    from solar_quant.cli.streams import result_stdout
    from solar_quant.generate import Generator, conversation
    from solar_quant.signals import set_interrupt_hint

    set_interrupt_hint("interrupted before the reply started; nothing was written")
    opts = _options(template, system, max_new_tokens, temperature, top_p, seed, device, dtype, rope_scaling,
                    load_in_8bit, load_in_4bit, ignore_eos)
    text = sys.stdin.read() if prompt == "-" else prompt
    with result_stdout() as out:
        gen = Generator(variant, opts)
        reply = gen.reply(conversation(opts.system, [], text), out)
    if reply.interrupted:
        raise Interrupted(f"interrupted; the reply was cut short after {reply.new_tokens} token(s)")


@friendly
def chat(
    variant: VariantArg,
    template: TemplateOpt = "auto",
    system: SystemOpt = None,
    max_new_tokens: MaxNewTokens = 512,
    temperature: Temperature = 0.0,
    top_p: TopP = 1.0,
    seed: SeedOpt = 0,
    device: o.Device = "cpu",
    dtype: Dtype = "auto",
    rope_scaling: RopeOpt = "keep",
    load_in_8bit: LoadIn8 = False,
    load_in_4bit: LoadIn4 = False,
    ignore_eos: IgnoreEos = False,
) -> None:
    """Talk to VARIANT turn by turn (one line a message). Replies stream to stdout; Ctrl-C ends a
    reply and keeps the conversation; Ctrl-C at the prompt or EOF (Ctrl-D) ends the session.
    `/reset` forgets the conversation, `/exit` leaves."""
    from solar_quant.cli.streams import result_stdout
    from solar_quant.signals import set_interrupt_hint

    set_interrupt_hint("interrupted before the chat started; nothing was written")
    opts = _options(template, system, max_new_tokens, temperature, top_p, seed, device, dtype, rope_scaling,
                    load_in_8bit, load_in_4bit, ignore_eos)
    with result_stdout() as out:
        _chat_loop(variant, opts, out)


def _chat_loop(variant: str, opts, out) -> None:
    from solar_quant.generate import Generator, conversation
    from solar_quant.progress import log
    from solar_quant.signals import EXIT_CODE

    gen = Generator(variant, opts)
    interactive = sys.stdin.isatty()
    if interactive:
        log("type a message and Enter; /reset forgets the conversation; Ctrl-D or /exit leaves")
    turns: list[tuple[str, str]] = []
    while True:
        try:
            line = _read_message(interactive)
        except KeyboardInterrupt:
            typer.echo("", file=console.stderr())
            raise typer.Exit(EXIT_CODE) from None
        if line is None or line.strip() in ("/exit", "/quit"):
            return
        if not line.strip():
            continue
        if line.strip() == "/reset":
            turns = []
            log("(conversation cleared)")
            continue
        reply = gen.reply(conversation(opts.system, turns, line.rstrip("\n")), out)
        if reply.interrupted:
            log("(reply interrupted; Ctrl-C at the prompt or Ctrl-D ends the session)")
        turns.append((line.rstrip("\n"), reply.text))


def _read_message(interactive: bool) -> str | None:
    """One line from stdin; None at EOF. On a terminal, with a `>` prompt on stderr."""
    if interactive:
        sys.stderr.write("> ")
        sys.stderr.flush()
    line = sys.stdin.readline()
    return line if line else None


def register(app: typer.Typer) -> None:
    app.command("generate")(generate)
    app.command("chat")(chat)
