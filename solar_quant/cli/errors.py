"""Turn known exceptions into one line on stderr and an exit code; never a traceback."""

from __future__ import annotations

import functools

import typer

from solar_quant.errors import Interrupted, SolarQuantError


def report(message: str) -> None:
    from solar_quant import console

    typer.echo(f"solar-quant: error: {message}", file=console.stderr())


def friendly(fn):
    """Decorator for command functions: SolarQuantError -> one line + its exit code; third-party
    output held back while the command runs (`solar_quant.console.captured`)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        from solar_quant.console import captured

        with captured():
            return _run(*args, **kwargs)

    def _run(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SolarQuantError as e:
            report(str(e).splitlines()[0] if str(e) else type(e).__name__)
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:  # Ctrl-C, or SIGTERM once signals.install() ran
            from solar_quant.signals import interrupt_message

            report(interrupt_message())
            raise typer.Exit(Interrupted.exit_code) from None
        except MemoryError:
            report("out of host memory; use a smaller --seqlen/--nsamples or a machine with more RAM")
            raise typer.Exit(2) from None

    return wrapper
