"""The Typer application: registers each verb from `solar_quant.cli.commands`."""

from __future__ import annotations

import os
import signal
import sys
from typing import Annotated

import typer

from solar_quant.cli.commands import (calibrate_cmd, card_cmd, chat_cmd, eval_cmd, inspect_cmd, models_cmd,
                                      plan_cmd, quantize_cmd, run_cmd, verify_cmd)

VERBS = (models_cmd, inspect_cmd, plan_cmd, calibrate_cmd, quantize_cmd, verify_cmd, eval_cmd, run_cmd, chat_cmd,
         card_cmd)

app = typer.Typer(
    name="solar-quant",
    help="Quantize Llama-2-family checkpoints (SOLAR-0-70b and kin) to bitsandbytes and GPTQ, streaming, and prove each variant against fp16.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
for module in VERBS:
    module.register(app)

GLOBAL_FLAGS = ("--verbose", "--quiet")


def _print_version(value: bool) -> None:
    if value:
        from solar_quant import TOOL_NAME, __version__

        typer.echo(f"{TOOL_NAME} {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                          help="Print the version and exit.")] = False,
    verbose: Annotated[bool, typer.Option("--verbose", help="Also show what libraries print (banners, INFO lines, warnings), on stderr.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", help="No progress lines or bars; results and errors only.")] = False,
) -> None:
    """Quantize Llama-2-family checkpoints (SOLAR-0-70b and kin) to bitsandbytes and GPTQ, streaming, and prove each variant against fp16."""
    from solar_quant import console

    if verbose and quiet:
        from solar_quant.cli.errors import report
        from solar_quant.errors import OptionError

        report(str(OptionError("--verbose and --quiet: pick one")))
        raise typer.Exit(2)
    console.configure(verbose=verbose or None, quiet=quiet or None)


def hoist_global_flags(argv: list[str]) -> list[str]:
    """`solar-quant eval A B --verbose` means `solar-quant --verbose eval A B`: the two global flags
    may be written anywhere before a `--`."""
    end = argv.index("--") if "--" in argv else len(argv)
    flags = [a for a in argv[:end] if a in GLOBAL_FLAGS]
    rest = [a for a in argv[:end] if a not in GLOBAL_FLAGS] + argv[end:]
    return flags + rest


def main() -> None:
    from solar_quant.signals import install

    install()  # SIGTERM stops a command the way Ctrl-C does: cleanup runs, resumable jobs are kept
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:  # torchrun: no C++ warnings when a peer rank is gone
        os.environ.setdefault("TORCH_CPP_LOG_LEVEL", "ERROR")
    from solar_quant.errors import SolarQuantError
    from solar_quant.signals import EXIT_CODE, STOP_SIGNALS, interrupt_message

    code = 0
    try:
        app(args=hoist_global_flags(sys.argv[1:]), standalone_mode=True)
    except KeyboardInterrupt:  # a signal that lands outside a command body (parsing, or while exiting)
        from solar_quant.cli.errors import report

        report(interrupt_message())
        code = EXIT_CODE
    except SolarQuantError as e:  # raised outside a command body, e.g. a plugin that fails to load while help is shown
        from solar_quant.cli.errors import report

        report(str(e).splitlines()[0] if str(e) else type(e).__name__)
        code = e.exit_code
    except SystemExit as e:
        code = e.code
    finally:
        # The command is over and its exit code decided: a signal during interpreter shutdown
        # must not turn that into death by signal.
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
    if code == EXIT_CODE:
        _exit_now(code)
    raise SystemExit(code)


def _exit_now(code: int) -> None:
    """Exit with `code` without returning through the interpreter's main. CPython 3.11 marks a
    KeyboardInterrupt as unhandled whenever one escapes code run through `PyRun_String` (C
    extensions evaluating Python, e.g. during an import), even when our handlers catch it later,
    and then ends the process by SIGINT instead of with our exit code (`_Py_UnhandledKeyboardInterrupt`,
    read after the main module returns; seen in about one of six interrupts during start-up).
    Everything of ours is closed by now; only the standard streams need a flush."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)
