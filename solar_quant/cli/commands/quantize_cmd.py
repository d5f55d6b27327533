"""`solar-quant quantize SRC OUT --method ...`: write a bitsandbytes, GPTQ or RTN variant."""

from __future__ import annotations

from typing import Annotated, Optional

import typer
from typer.core import TyperCommand

from solar_quant import console
from solar_quant.cli import options as o
from solar_quant.cli.errors import friendly


class QuantizeCommand(TyperCommand):
    """`quantize`'s help lists the registered methods when it is shown (plugins included)."""

    def format_help(self, ctx, formatter) -> None:
        from solar_quant import registry

        for param in self.params:
            if param.name == "method":
                param.help = "One of: " + "; ".join(f"{e.name} ({e.summary})" for e in registry.methods().values()) + "."
        super().format_help(ctx, formatter)


@friendly
def quantize(
    src: Annotated[str, typer.Argument(help="16-bit source checkpoint folder (never modified).")],
    method: Annotated[str, typer.Option("--method", help="A registered method: bnb-int8, bnb-nf4, bnb-fp4, gptq, rtn, ...")],
    out_arg: Annotated[Optional[str], typer.Argument(help="Output folder (or --out); appears only when complete.")] = None,
    out_opt: Annotated[Optional[str], typer.Option(*o.OUT_FLAGS, help="Output folder (same as OUT).")] = None,
    double_quant: Annotated[bool, typer.Option("--double-quant", help="bnb 4-bit: quantize the absmax constants too.")] = False,
    compute_dtype: Annotated[str, typer.Option("--compute-dtype", help="bnb 4-bit compute dtype: float16, bfloat16, float32.")] = "float16",
    skip_modules: Annotated[Optional[list[str]], typer.Option("--skip-modules", help="bnb: module names kept in 16-bit (default: lm_head).")] = None,
    bits: Annotated[int, typer.Option("--bits", help="gptq/rtn: 2, 3, 4 or 8.")] = 4,
    group_size: Annotated[int, typer.Option("--group-size", help="gptq/rtn: 32, 64, 128, ... or -1 for none.")] = 128,
    act_order: Annotated[bool, typer.Option("--act-order/--no-act-order", help="gptq: quantize columns by descending Hessian diagonal (desc_act).")] = False,
    static_groups: Annotated[bool, typer.Option("--static-groups", help="gptq act-order: fix group parameters before reordering.")] = False,
    sym: Annotated[bool, typer.Option("--sym/--asym", help="gptq/rtn: symmetric or asymmetric grid.")] = True,
    damp: Annotated[float, typer.Option("--damp", help="gptq: dampening as a fraction of the mean Hessian diagonal.")] = 0.01,
    mse: Annotated[float, typer.Option("--mse", help="gptq/rtn: search each group's clipped range under |error|**NORM (2.4 as in GPTQ); 0: min/max range.")] = 0.0,
    clip: Annotated[Optional[str], typer.Option("--clip", metavar="SEARCH", help="gptq: per-group clipping search: mse (under |error|**NORM, NORM from --mse, 2.4 by default), hessian (under the group's Hessian block), hessian-diag (its diagonal), gptq-loss (the block GPTQ's loss sees after error feedback), none.")] = None,
    block_size: Annotated[int, typer.Option("--block-size", help="gptq: columns per lazy-update block.")] = 128,
    equalize: Annotated[bool, typer.Option("--equalize", help="gptq/rtn: activation-aware equalization (AWQ scales folded into the 16-bit norms and linears) before quantizing; needs calibration.")] = False,
    refine: Annotated[int, typer.Option("--refine", metavar="SWEEPS", help="gptq: sweeps of coordinate descent on GPTQ's codes, each code moved to the grid point that lowers the layer's output error most (QuantEase); 0: off.")] = 0,
    propagate: Annotated[float, typer.Option("--propagate", metavar="ALPHA", help="gptq: solve each linear towards the unquantized model's output (its inputs carried through an unquantized copy of each layer), the target moved ALPHA of the way, 0..1; 0: off. Doubles the calibration activations.")] = 0.0,
    calibration: o.CalibrationArtifact = None,
    source: o.CalibSource = None,
    fmt: o.CalibFormat = None,
    template: o.Template = "solar",
    nsamples: o.NSamples = 128,
    seqlen: o.SeqLen = 2048,
    seed: o.Seed = 0,
    short: o.Short = "pack",
    device: o.Device = "cpu",
    rope_scaling: o.RopeScalingOpt = "keep",
    shard_size: o.ShardSize = "2GB",
    overwrite: o.Overwrite = False,
    resume: Annotated[bool, typer.Option("--resume", help="gptq: continue an interrupted job in OUT's staging folder.")] = False,
    checkpoint_every: Annotated[float, typer.Option(
        "--checkpoint-every", metavar="SECONDS",
        help="gptq/rtn: save a resume point (job + hidden states) at most this often; 0: after every layer.")] = 120.0,
) -> None:
    """Quantize SRC into OUT, one tensor (bnb) or one decoder layer (gptq/rtn) at a time."""
    from solar_quant.errors import OptionError
    from solar_quant.options import OutputOptions, build, parse_size
    from solar_quant.rope import RopeScaling
    from solar_quant.signals import set_interrupt_hint

    out = _output_folder(out_arg, out_opt)
    set_interrupt_hint(f"interrupted; nothing partial was left under {out} (a variant appears there only when "
                       "complete); rerun the same command to start again")

    RopeScaling.parse(rope_scaling)
    output = build(OutputOptions, shard_size=parse_size(shard_size), rope_scaling=rope_scaling, overwrite=overwrite,
                   checkpoint_every=checkpoint_every)
    from solar_quant import registry

    entry = registry.method(method)
    flags = dict(double_quant=double_quant, compute_dtype=compute_dtype, skip_modules=skip_modules, bits=bits,
                 group_size=group_size, act_order=act_order, static_groups=static_groups, sym=sym, damp=damp, mse=mse,
                 clip=clip, block_size=block_size, equalize=equalize, refine=refine,
                 propagate=propagate)
    options = build(entry.options, **entry.cli_options(flags))
    world = _join_world(entry, method, device, out)
    try:
        path = _quantize(src, out, method, entry, options, output, world, device, resume, calibration, source, fmt,
                         template, nsamples, seqlen, seed, short)
    finally:
        if world is not None:
            world.close()
    if world is None or world.is_main:
        console.result(str(path))


def _join_world(entry, method: str, device: str, out: str):
    """Under torchrun (WORLD_SIZE > 1), this process's rank in the job; None in one process."""
    from solar_quant.errors import OptionError
    from solar_quant.pipeline.distributed import World, launched
    from solar_quant.signals import set_interrupt_hint

    if not launched():
        return None
    if not entry.distributed:
        raise OptionError(f"--method {method}: {entry.serial_reason}; run it in one process (without torchrun)")
    world = World.from_env(device)
    if not world.is_main:
        console.configure(quiet=True)  # progress comes from rank 0; errors are printed on every rank
        set_interrupt_hint(f"interrupted (rank {world.rank} of {world.size}); rank 0 keeps the job's last resume point")
    return world


def _quantize(src, out, method, entry, options, output, world, device, resume, calibration, source, fmt, template,
              nsamples, seqlen, seed, short):
    from solar_quant import progress
    from solar_quant.errors import OptionError

    if entry.uses_device:
        from solar_quant.pipeline.gptq import column_loop_from_env

        column_loop_from_env()  # a bad $SOLAR_QUANT_COLUMN_LOOP is refused before any work
        _preflight(src, out, output, device)  # before any calibration set is built
    elif device != "cpu":
        raise OptionError(f"--device {device}: method {method} does not run on a device; drop --device")
    calib = None
    if entry.needs_calibration or getattr(options, "equalize", False):
        from solar_quant.calibration.build import calibration_from_cli

        calib = calibration_from_cli(src, calibration, source, fmt, template=template, nsamples=nsamples, seqlen=seqlen,
                                     seed=seed, short=short)
        if method == "gptq" and (world is None or world.is_main):
            from solar_quant.pipeline.dry_run import log_gptq_estimate

            log_gptq_estimate(src, calib, device, options)
    extra = {"world": world} if world is not None else {}
    return entry.build(src, out, options, calib, output, device=device, resume=resume, log=progress.log, **extra)


def _output_folder(positional: str | None, option: str | None) -> str:
    from solar_quant.errors import OptionError

    if positional and option and positional != option:
        raise OptionError(f"OUT {positional} and --out {option}: give the output folder once")
    if not (positional or option):
        raise OptionError("OUT: missing; give the output folder as `quantize SRC OUT` or `--out OUT`")
    return positional or option


def _preflight(src: str, out: str, output, device: str) -> None:
    from solar_quant.devices import resolve_device
    from solar_quant.pipeline.preflight import check_source

    resolve_device(device)
    check_source(src, out, rope_scaling=output.rope_scaling, overwrite=output.overwrite)


def register(app: typer.Typer) -> None:
    app.command("quantize", cls=QuantizeCommand)(quantize)
