"""The streaming GPTQ / RTN driver: one decoder layer at a time, from the 16-bit shards to a
GPTQ v1 folder, resumable after a kill.

For each layer: load its tensors into a Llama decoder layer (`pipeline.layers`: the native
`models.llama_layer` layer, or transformers' for rope types it does not compute), quantize it with
`layer_quant.quantize_layer` (one staged pass: per true-sequential group, its inputs computed
once, their Hessian, one solve, the dequantized weights written back; the last stage gives the
next layer's inputs), write its packed tensors, and free it. A resume point
(job + hidden states, `job.py`) is saved once `--checkpoint-every` seconds have passed since the last.
Layer i + 1's tensors are read in a background thread (`_LayerPrefetch`) while layer i is
quantized, and layer i's packed tensors are written in another (`_LayerWrites`, one layer
queued) while layer i + 1 is quantized; layer i's resume point follows once its bytes are
written. Memory holds two layers (that one and the next), one layer's packed tensors, two
copies of the calibration activations and one Hessian at a time.

The pieces: `preflight` (checks before work, shared with bnb), `layer_quant` (one layer; torch
and `pipeline.layers` only), `placement` (where the activations live), `job` (resume), `records`
(what solar_quant.json says). Options are translated here, once, into a `LayerQuantConfig`
and one recorded dict.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from solar_quant import progress
from solar_quant.architecture import layer_prefix
from solar_quant.checkpoint.reader import CheckpointReader
from solar_quant.checkpoint.writer import ShardedWriter, StagedFolder
from solar_quant.devices import compute_dtype, resolve_device
from solar_quant.errors import (DistributedError, InputError, Interrupted, NumericsError, OptionError, OutputError,
                                SolarQuantError)
from solar_quant.methods.gptq_fused import column_loop_choice
from solar_quant.options import GptqOptions, OutputOptions
from solar_quant.pipeline import malloc, records
from solar_quant.pipeline.distributed import World
from solar_quant.pipeline.job import (JOB_DIR, Job, has_saved_job, interrupted, job_spec, open_job, save_progress,
                                      source_files)
from solar_quant.pipeline.layer_quant import LayerQuantConfig, collect_hessians, linear_modules, linear_record
from solar_quant.pipeline.layer_quant import quantize_layer as _quantize_layer
from solar_quant.pipeline.equalize import StageEqualizer, check_norms, equalization_card, equalize_layer, save_scales
from solar_quant.pipeline.placement import layer_working_bytes, place_activations
from solar_quant.pipeline.preflight import Source, check_calibration, check_source
from solar_quant.pipeline.records import PARTIAL_GROUP_REFUSERS
from solar_quant.variant import RECORD_NAME, copy_side_files, variant_config

__all__ = ["build_gptq_variant", "layer_config", "quantize_layer", "collect_hessians", "linear_modules",
           "linear_record", "layer_working_bytes", "check_calibration", "partial_group_warnings",
           "stop_hook_from_env", "PARTIAL_GROUP_REFUSERS", "STOP_ENV"]

CHUNK_TOKENS = 4096  # calibration tokens per Hessian product (and per forward chunk outside the staged pass)
CHUNK_PIECES = 2  # the staged pass runs each chunk as this many pieces: half the activations in flight
OVERLAP_ENV = "SOLAR_QUANT_OVERLAP_WRITES"  # "0": write each layer in line instead of in the background
STOP_ENV = "SOLAR_QUANT_STOP_AFTER_LAYER"  # test hook: "k" (after layer k is saved), "k:unsaved" or "k:term"
STOP_RANK_ENV = "SOLAR_QUANT_STOP_RANK"  # with STOP_ENV under torchrun: only this rank stops (default: every rank)

# on_layer(i, stage): called after layer i's tensors are written (stage "written") and after its
# resume point, if one was due, is saved (stage "saved").
LayerHook = Callable[[int, str], None]


def build_gptq_variant(src: str | Path, out: str | Path, gptq: GptqOptions, calib, output: OutputOptions, *,
                       device: str = "cpu", resume: bool = False, log=progress.log,
                       on_layer: LayerHook | None = None, world: World | None = None) -> Path:
    """Quantize the Llama checkpoint `src` into a GPTQ v1 folder `out` and return its path.

    `calib` (a CalibrationSet) is required for GPTQ and ignored for RTN. With `resume`, an
    interrupted job in OUT's staging folder continues where it stopped. `on_layer` (default: the
    `SOLAR_QUANT_STOP_AFTER_LAYER` test hook, read here once) is called as each layer is done.
    `world` (`pipeline.distributed`): the ranks of a torchrun job, each carrying its share of the
    calibration samples; rank 0 alone writes OUT, the job and its resume points."""
    world = world or World()
    if not world.distributed:
        return _build(src, out, gptq, calib, output, device, resume, log, on_layer, world)
    try:
        return _build(src, out, gptq, calib, output, device, resume, log, on_layer, world)
    except DistributedError:
        raise  # a collective failed: this rank reported itself while naming the lost ones
    except Interrupted as e:  # torchrun stops every rank with SIGTERM once one has died: name that one
        silent = world.report("interrupted")
        if silent and world.under_agent:
            raise Interrupted(f"rank {', '.join(map(str, silent))} of {world.size} died or stopped responding and the "
                              f"launcher stopped the others; {e}") from None
        raise
    except SolarQuantError as e:
        world.report(f"{str(e).splitlines()[0] if str(e) else type(e).__name__}")
        raise
    except BaseException as e:  # Ctrl-C / SIGTERM on a rank other than 0, out of memory, a bug
        silent = world.report("interrupted" if isinstance(e, KeyboardInterrupt) else f"{type(e).__name__}: {e}")
        if silent and world.under_agent and isinstance(e, KeyboardInterrupt):
            raise Interrupted(f"rank {', '.join(map(str, silent))} of {world.size} died or stopped responding and "
                              f"the launcher stopped the others (rank {world.rank} interrupted; rank 0 keeps the "
                              "job's last resume point)") from None
        raise


def _build(src, out, gptq: GptqOptions, calib, output: OutputOptions, device: str, resume: bool, log,
           on_layer: LayerHook | None, world: World) -> Path:
    if world.distributed:
        _check_distributed(gptq)
    dev = resolve_device(world.device(device))
    source = check_source(src, out, rope_scaling=output.rope_scaling, overwrite=output.overwrite)
    reader, shape = source.reader, source.shape
    _check_layer_config(reader)
    if gptq.method == "gptq" or gptq.equalize:
        if calib is None:
            need = f"--method {gptq.method}" if gptq.method in ("gptq", "awq") else "--equalize"
            raise OptionError(f"{need} needs calibration data: pass --calibration DIR or calibration flags")
        check_calibration(reader, calib, shape)
        world.check_samples(int(calib.input_ids.shape[0]))
        if gptq.equalize:
            check_norms(reader, shape)
    else:
        calib = None
    cfg = layer_config(gptq)
    options = records.recorded_options(gptq, output, dev)
    spec = job_spec(options, reader.identity()["sha256"], _calibration_sha256(calib), source_files(reader))
    warnings = records.partial_group_warnings(shape, cfg.group_size)
    for w in warnings:
        log(f"warning: {w['message']}")
    hook = on_layer if on_layer is not None else stop_hook_from_env(world.rank)
    if world.distributed:
        _check_same_inputs(world, spec)
    if not world.is_main:
        return _follow(source, out, spec, cfg, calib, output, dev, options, warnings, log, hook, gptq, world)

    staged = StagedFolder(out, overwrite=output.overwrite, resume=resume)
    try:
        job = open_job(staged, spec, resume, log, world.size, records.ADDED_OPTIONS)  # outside the try below: a refused --resume keeps the job
    except KeyboardInterrupt:
        if has_saved_job(staged):
            raise Interrupted(f"interrupted; the job is kept in {staged.staging}: rerun the same command with "
                              "--resume to continue") from None
        staged.abandon()
        raise
    except SolarQuantError as e:
        world.share({"error": (type(e).__name__, str(e))})  # every rank ends with the same refusal
        raise
    world.share({"layers_done": job.layers_done, "fresh": job.writer_state is None})
    run = _Run(source, staged, job, cfg, calib, output, dev, options, warnings, log, hook, gptq.equalize, world,
               overlap_writes=_overlap_writes())
    # The CLI turns SIGTERM into KeyboardInterrupt (solar_quant.signals), so both land below.
    try:
        _run(run)
        path = staged.commit(exclude=(JOB_DIR,))
        world.share("done")  # the other ranks end with rank 0's outcome
        return path
    except (InputError, NumericsError):
        staged.abandon()
        raise
    except OutputError as e:  # e.g. disk full: keep a saved job to resume once there is room
        if not has_saved_job(staged):
            staged.abandon()
            raise
        raise OutputError(f"{e}; then rerun the same command with --resume to continue from layer "
                          f"{job.layers_done}") from None
    except DistributedError as e:  # a rank died or hung: the last resume point is kept
        if not has_saved_job(staged):
            staged.abandon()
            raise DistributedError(f"{e}; nothing was saved yet; rerun the same command to start again") from None
        raise DistributedError(f"{e}; {job.layers_done}/{shape.layers} layers are saved in {staged.staging}: rerun "
                               f"the same command (with {world.size} processes) and --resume to continue") from None
    except (KeyboardInterrupt, Interrupted):
        raise interrupted(staged, job, shape.layers) from None


def _check_distributed(gptq: GptqOptions) -> None:
    """What a torchrun job refuses: methods without calibration have no samples to share out."""
    if gptq.method != "gptq":
        raise OptionError(f"--method {gptq.method}: rounds each weight alone, without calibration samples to share "
                          "between processes; run it in one process (without torchrun)")
    if gptq.equalize and not gptq.true_sequential:
        raise OptionError("--equalize without true-sequential groups gathers its statistics in a forward of its "
                          "own, not shared between processes; run it in one process (without torchrun)")


def _check_same_inputs(world: World, spec: dict) -> None:
    """Every rank reads the same checkpoint and calibration token ids as rank 0 (on several nodes,
    each reads its own copy)."""
    mine = {k: spec["inputs"][k] for k in ("source", "calibration")}
    theirs = world.share(mine)
    for key, label in (("source", "source checkpoint"), ("calibration", "calibration token ids")):
        if mine[key] != theirs[key]:
            raise InputError(f"rank {world.rank} of {world.size}: its {label} differ from rank 0's; give every "
                             "rank the same files and calibration options")


def _follow(source: Source, out, spec: dict, cfg, calib, output, dev, options, warnings, log, hook, gptq,
            world: World) -> Path:
    """A rank other than 0: carry this rank's samples through every layer alongside rank 0,
    writing nothing; the job's progress comes from rank 0."""
    start = world.share(None)
    if "error" in start:
        import solar_quant.errors as errors

        name, message = start["error"]
        raise getattr(errors, name, SolarQuantError)(message)
    job = Job(Path(out).parent / f".{Path(out).name}.partial", spec, layers_done=start["layers_done"],
              writer_state=None if start["fresh"] else {}, world_size=world.size)
    run = _Run(source, None, job, cfg, calib, output, dev, options, warnings, log, hook, gptq.equalize, world)
    _run(run)
    world.share(None)  # rank 0 committed OUT
    return Path(out)


def layer_config(gptq: GptqOptions) -> LayerQuantConfig:
    """The options as the per-layer quantizer takes them (the one translation)."""
    return LayerQuantConfig(method=getattr(gptq, "solver", gptq.method), bits=gptq.bits, group_size=gptq.group_size, sym=gptq.sym,
                            mse=gptq.mse, clip="" if gptq.clip == "none" else gptq.clip, act_order=gptq.act_order, static_groups=gptq.static_groups,
                            damp=gptq.damp, block_size=gptq.block_size, true_sequential=gptq.true_sequential,
                            refine=getattr(gptq, "refine", 0), propagate=float(getattr(gptq, "propagate", 0.0)),
                            column_loop=column_loop_from_env())


def _overlap_writes() -> bool:
    return os.environ.get(OVERLAP_ENV, "1").strip() != "0"


def column_loop_from_env() -> str:
    """$SOLAR_QUANT_COLUMN_LOOP: "auto" (compiled on CUDA, eager elsewhere), "eager" or "compiled".
    Both loops give the same codes; the variable only picks the speed (methods/gptq_fused.py)."""
    try:
        return column_loop_choice()
    except ValueError as e:
        raise OptionError(str(e)) from None


def quantize_layer(i: int, layer, runner, hidden, gptq: GptqOptions | LayerQuantConfig, bar, log,
                   out: torch.Tensor | None = None) -> tuple[dict, dict]:
    """`layer_quant.quantize_layer`, also taking the method's options."""
    cfg = gptq if isinstance(gptq, LayerQuantConfig) else layer_config(gptq)
    return _quantize_layer(i, layer, runner, hidden, cfg, bar, log, out=out)


def partial_group_warnings(shape, gptq: GptqOptions) -> list[dict]:
    return records.partial_group_warnings(shape, gptq.group_size)


def stop_hook_from_env(rank: int = 0) -> LayerHook | None:
    """The test hook behind `SOLAR_QUANT_STOP_AFTER_LAYER` (read once, at the entry point): SIGKILL
    ourselves after layer k's resume point (`k`), after writing it but before its resume point
    (`k:unsaved`), or SIGTERM after its resume point (`k:term`). Under torchrun
    `SOLAR_QUANT_STOP_RANK` picks the one rank that stops."""
    value = os.environ.get(STOP_ENV)
    if not value:
        return None
    only = os.environ.get(STOP_RANK_ENV)
    if only not in (None, "") and int(only) != rank:
        return None
    k, _, when = value.partition(":")
    layer, stage = int(k), "written" if when == "unsaved" else "saved"

    def stop(i: int, at: str) -> None:
        if i == layer and at == stage:
            os.kill(os.getpid(), signal.SIGTERM if when == "term" else signal.SIGKILL)

    return stop


def _calibration_sha256(calib) -> str | None:
    if calib is None:
        return None
    from solar_quant.calibration.artifact import ids_sha256

    return ids_sha256(calib.input_ids)


# -- the run ------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Run:
    """Everything one run needs, fixed before the first layer."""

    source: Source
    staged: StagedFolder | None  # None on ranks other than 0
    job: Job
    cfg: LayerQuantConfig
    calib: object | None  # a CalibrationSet for GPTQ, None for RTN
    output: OutputOptions
    dev: torch.device
    options: dict  # as recorded
    warnings: list
    log: Callable[[str], None]
    on_layer: LayerHook | None
    equalize: bool = False  # fold activation-aware scales into each layer first (pipeline/equalize.py)
    world: World = field(default_factory=World)
    overlap_writes: bool = True  # write layer i while layer i + 1 is quantized (_LayerWrites)


def _check_layer_config(reader: CheckpointReader) -> None:
    """Refuse, before any work, a config.json whose layers no decoder layer here runs (hidden_act)."""
    from solar_quant.pipeline.layers import llama_config

    llama_config(reader.config, where=str(Path(reader.path) / "config.json"))


def _run(run: _Run) -> None:
    """The job from its first missing layer to the written folder (staged; rank 0 writes), with
    glibc keeping the per-chunk temporaries for reuse (`malloc.freed_blocks_reused`)."""
    with malloc.freed_blocks_reused():
        _run_layers(run)


def _run_layers(run: _Run) -> None:
    from solar_quant.formats.gptq_v1 import quantization_config
    from solar_quant.pipeline.layers import LayerRunner, embed_tokens, llama_config

    reader, shape, job, calib, output, world = run.source.reader, run.source.shape, run.job, run.calib, run.output, run.world
    config = llama_config(reader.config)
    dtype = compute_dtype(run.dev)
    hidden = None
    writer = job.restore_writer(output.shard_size) if world.is_main else None  # rank 0 alone writes
    if job.writer_state is None:  # a fresh job: embeddings first
        if writer is not None:
            writer.add("model.embed_tokens.weight", _finite(reader, "model.embed_tokens.weight").to(torch.float16))
        if calib is not None:  # each rank embeds its own samples
            hidden = embed_tokens(reader, calib.input_ids[world.samples(calib.input_ids.shape[0])])
            if run.cfg.propagate:  # the unquantized model's stream beside it (`_streams`)
                hidden = torch.cat([hidden, hidden], dim=-1)
        _save_point(run, writer, hidden, 0)
        reader.release()  # the embedding table's pages (56 MB on SmolLM2) stop counting as ours before layer 0
    elif calib is not None and job.layers_done < shape.layers:
        full = job.load_hidden() if world.is_main else None
        width = shape.hidden * (2 if run.cfg.propagate else 1)
        if full is not None and full.shape[-1] != width:
            raise OutputError(f"{job.dir}: the saved hidden states are {full.shape[-1]} wide, not {width}: "
                              "the interrupted job was started with other options; start again without --resume")
        hidden = world.scatter_samples(full, (calib.input_ids.shape[0], calib.input_ids.shape[1], width),
                                       world.share(full.dtype if full is not None else None))
        del full

    if hidden is not None:
        hidden = place_activations(hidden, shape, run.dev, dtype, run.log)
    runner = None
    if calib is not None:
        seqlen = calib.input_ids.shape[1]
        runner = LayerRunner(config, run.dev, dtype, chunk=max(1, CHUNK_TOKENS // seqlen), pieces=CHUNK_PIECES)
    world.where = "before the first layer"
    layer_bar = progress.Progress(shape.layers, "layer", done=job.layers_done)
    linear_bar = progress.Progress(shape.layers * 7, "linear", done=job.layers_done * 7)
    spare = torch.empty_like(hidden) if hidden is not None else None
    prefetch = _LayerPrefetch(reader.path, config, run.dev, dtype)
    try:
        _layers(run, reader, writer, job, runner, hidden, spare, prefetch, layer_bar, linear_bar)
    finally:
        prefetch.close()
    hidden = spare = None
    if writer is None:
        return

    writer.add("model.norm.weight", _finite(reader, "model.norm.weight").to(torch.float16))
    if not shape.tie_word_embeddings:
        writer.add("lm_head.weight", _finite(reader, "lm_head.weight").to(torch.float16))
    writer.close()
    damp_used = max((lin["damp"] for rec in job.records for lin in rec["linears"].values()), default=None)
    qcfg = quantization_config(run.cfg, damp_used=damp_used if run.cfg.method == "gptq" else None)
    staged = run.staged
    staged.write_json("config.json", variant_config(reader.config, qcfg, run.source.rope))
    staged.write_json("quantize_config.json", qcfg)
    copy_side_files(reader, staged)
    record = records.run_record(reader, run.options.get("method", run.cfg.method), run.options, calib, job.records, run.warnings)
    if run.equalize:
        record["equalization"] = equalization_card(staged=run.cfg.needs_calibration and run.cfg.true_sequential)
    if run.world.distributed:  # each rank's samples and the Hessian sums depend on it
        record["world_size"] = run.world.size
    staged.write_json(RECORD_NAME, record)


def _layers(run: _Run, reader, writer, job: Job, runner, hidden, spare, prefetch, layer_bar, linear_bar) -> None:
    """The decoder layers from the job's next one: quantize, write, resume point. Layer i + 1's
    tensors are read in the background while layer i is quantized, and layer i's tensors are
    written in the background (`_LayerWrites`) while layer i + 1 is quantized; layer i's resume
    point is saved once its bytes are written (after layer i + 1's quantization, or at once for
    the last layer or when the run stops)."""
    shape = run.source.shape
    writes = _LayerWrites(writer, overlap=run.overlap_writes)
    pending = None  # (layer index, its record) written in the background, not yet committed
    clock = {"saved_at": time.monotonic()}  # a resume point is saved when --checkpoint-every seconds have passed
    prefetch.start(job.layers_done)
    world = run.world
    try:
        for i in range(job.layers_done, shape.layers):
            world.where = f"on layer {i}"
            layer = prefetch.take(i)
            if i + 1 < shape.layers:
                prefetch.start(i + 1)
            (h, out), reference = _streams(run, layer, hidden, spare)  # before any fold changes the layer
            equalized = equalizer = None
            if run.equalize:  # pipeline/equalize.py: the layer's function is unchanged by the folds
                if run.cfg.needs_calibration and run.cfg.true_sequential:  # searched inside the staged pass
                    equalizer = StageEqualizer(layer, run.cfg, i, world=world if world.distributed else None)
                else:  # RTN: one forward for the statistics, folded before quantizing
                    equalized, scales = equalize_layer(layer, runner, hidden, run.cfg, run.log, i)
            hessian_runner = runner if run.cfg.needs_calibration else None  # RTN after equalizing: no Hessians
            quantized, record = _quantize_layer(i, layer, hessian_runner, h, run.cfg, linear_bar, run.log,
                                                out=out, world=world if world.distributed else None,
                                                equalizer=equalizer, reference=reference)
            del h, out, reference
            if equalizer is not None:
                equalized, scales = equalizer.finish()
            if equalized is not None:
                if run.staged is not None:  # the rank that writes (rank 0)
                    save_scales(run.staged.staging, i, scales)
                record["equalization"] = equalized
            if runner is not None and hessian_runner is None:
                runner.forward(layer, hidden, out=spare)
            if pending is not None:  # layer i - 1: its bytes, then its resume point (`hidden` enters layer i)
                done, pending = pending, None
                _commit_layer(run, writes, job, writer, hidden, *done, clock, layer_bar)
            if runner is not None:  # the layer's outputs, in `spare`, are the next layer's inputs
                hidden, spare = spare, hidden
            tensors = [] if writer is None else _layer_tensors(reader, i, quantized, layer if run.equalize else None)
            del layer, quantized
            reader.release()  # close the memory maps so pages of finished layers stop counting as ours
            writes.submit(i, tensors)
            del tensors
            pending = (i, record)
        if pending is not None:
            done, pending = pending, None
            _commit_layer(run, writes, job, writer, hidden, *done, clock, layer_bar)
    except (KeyboardInterrupt, Interrupted):
        if pending is not None and not world.distributed:  # the resume point the layer would have had in line
            done, pending = pending, None
            _commit_layer(run, writes, job, writer, hidden, *done, clock, layer_bar)
        raise
    finally:
        writes.close()


def _streams(run: _Run, layer, hidden, spare):
    """((the quantized model's states entering the layer, the buffer for its outputs), the
    reference for `layer_quant.quantize_layer`). With --propagate the activations are [n, L, 2d]:
    the quantized model's stream in the first d features, the unquantized model's in the last d,
    so that resume points, placement and the ranks' scatter and gather carry both unchanged; the
    reference is (an unquantized copy of the layer, its stream, its half of the output buffer)."""
    if not run.cfg.propagate or hidden is None:
        return (hidden, spare), None
    import copy

    d = hidden.shape[-1] // 2
    return (hidden[..., :d], spare[..., :d]), (copy.deepcopy(layer), hidden[..., d:], spare[..., d:])


def _commit_layer(run: _Run, writes: "_LayerWrites", job: Job, writer, hidden, i: int, record: dict, clock: dict,
                  layer_bar) -> None:
    """Layer i is done once its tensors are written: its record, then its resume point if one is
    due (`hidden`: the states entering layer i + 1, None after the last layer)."""
    writes.wait(i)
    job.records.append(record)
    hook = run.on_layer or (lambda i, stage: None)
    hook(i, "written")
    last = i + 1 == run.source.shape.layers
    if run.world.share(last or time.monotonic() - clock["saved_at"] >= run.output.checkpoint_every):  # rank 0's clock
        _save_point(run, writer, None if last else hidden, i + 1)
        clock["saved_at"] = time.monotonic()
    hook(i, "saved")
    layer_bar.step(f"done: model.layers.{i}")


class _LayerWrites:
    """Writes one layer's tensors at a time through the `ShardedWriter` in one background thread,
    so the next layer's quantization overlaps them. At most one layer is queued: `submit` refuses
    a second before `wait` has returned for the first. Every write goes through this one thread
    in layer order, so the shards are byte for byte those of writing in line; a write error is
    raised by `wait`. `overlap` False: each layer is written in `submit` itself."""

    def __init__(self, writer: ShardedWriter | None, overlap: bool = True):
        from concurrent.futures import ThreadPoolExecutor

        self._writer = writer
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="layer-write") if overlap else None
        self._pending: tuple[int, object] | None = None

    def submit(self, i: int, tensors: list[tuple[str, torch.Tensor]]) -> None:
        if self._pending is not None:
            raise RuntimeError(f"layer {i} submitted before layer {self._pending[0]} was written")
        if self._pool is None:
            self._write(tensors)
            self._pending = (i, None)
        else:
            self._pending = (i, self._pool.submit(self._write, tensors))

    def _write(self, tensors: list[tuple[str, torch.Tensor]]) -> None:
        for name, tensor in tensors:  # none on ranks other than 0 (they write nothing)
            self._writer.add(name, tensor)

    def wait(self, i: int) -> None:
        """Return once layer i's tensors are written (raising the write's error)."""
        pending, self._pending = self._pending, None
        if pending is None or pending[0] != i:
            raise RuntimeError(f"layer {i} was not being written")
        if pending[1] is not None:
            pending[1].result()

    def close(self) -> None:
        """Let a write in flight finish (its error, if any, was or will not be asked for), then stop."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        self._pending = None


def _save_point(run: _Run, writer, hidden, layers_done: int) -> None:
    """A resume point; under torchrun every rank's samples are gathered and rank 0 saves them."""
    world = run.world
    if hidden is not None and world.distributed:
        hidden = world.gather_samples(hidden, run.calib.input_ids.shape[0])
    if world.is_main:
        save_progress(run.job, writer, hidden, layers_done)


def _finite(reader: CheckpointReader, name: str) -> torch.Tensor:
    tensor = reader.get(name)
    reader.require_finite(name, tensor)
    return tensor


class _LayerPrefetch:
    """Reads the next decoder layer's tensors in one background thread while the current layer
    is quantized. It has its own `CheckpointReader` (its own shard handles, released after each
    layer), so the driver's reader and its `release()` are untouched; a read error (a corrupt
    shard, NaN weights) is raised where the layer is taken, as a plain read would raise it.
    Memory: two layers' weights at a time instead of one."""

    def __init__(self, path, config, dev: torch.device, dtype: torch.dtype):
        from concurrent.futures import ThreadPoolExecutor

        self._reader = CheckpointReader(path)
        self._args = (config, dev, dtype)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="layer-read")
        self._pending: dict[int, object] = {}

    def start(self, i: int) -> None:
        self._pending[i] = self._pool.submit(self._read, i)

    def take(self, i: int):
        if i not in self._pending:
            self.start(i)
        return self._pending.pop(i).result()

    def _read(self, i: int):
        try:
            config, dev, dtype = self._args
            return _load_layer(self._reader, config, i, dev, dtype)
        finally:
            self._reader.release()

    def close(self) -> None:
        for future in self._pending.values():
            future.cancel()
        self._pool.shutdown(wait=True)
        self._pending.clear()


def _load_layer(reader, config, i, dev, dtype):
    from solar_quant.pipeline.layers import load_decoder_layer

    layer = load_decoder_layer(reader, config, i, dev, dtype)
    for name, param in layer.named_parameters():
        reader.require_finite(f"{layer_prefix(i)}{name}", param)
    return layer


def _layer_tensors(reader: CheckpointReader, i: int, quantized: dict, equalized=None) -> list[tuple[str, torch.Tensor]]:
    """The layer's tensors in the order they are written; the norms are the source's, or the
    equalized layer's folded ones, copied out of the memory maps (released before they are written)."""
    prefix = layer_prefix(i)

    def norm(name):
        if equalized is not None:
            return equalized.get_submodule(name).weight.detach().to("cpu", torch.float16).clone()
        return reader.get(prefix + name + ".weight").to(torch.float16).clone()

    tensors = [(prefix + "input_layernorm.weight", norm("input_layernorm"))]
    for name in quantized:
        tensors += [(f"{prefix}{name}.{key}", tensor) for key, tensor in sorted(quantized[name].items())]
    tensors.append((prefix + "post_attention_layernorm.weight", norm("post_attention_layernorm")))
    return tensors
