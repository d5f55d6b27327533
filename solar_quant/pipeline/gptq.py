"""The streaming GPTQ / RTN driver: one decoder layer at a time, from the 16-bit shards to a
GPTQ v1 folder, resumable after a kill.

For each layer: load its tensors into transformers' `LlamaDecoderLayer`; for each group of
linears in true-sequential order (q/k/v, o, gate/up, down) run the calibration activations
through the layer with hooks that fold the group's inputs into its Hessian (stopping each
chunk once those inputs are seen), quantize the group in one pass with `gptq_quantize_shared`
(its linears share the Hessian), pack each linear where it was computed and write the
dequantized weights back, so later groups see the quantized earlier ones; then run the
quantized layer to get the next layer's inputs, write its packed tensors, and free it.
A resume point (job + hidden states) is saved once `--checkpoint-every` seconds have passed since the last.
Memory holds one layer, two copies of the calibration activations and one Hessian at a time.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

import torch

from solar_quant import progress
from solar_quant.architecture import ATTN_LINEARS, SEQUENTIAL_GROUPS, LlamaShape, layer_prefix
from solar_quant.checkpoint.reader import CheckpointReader
from solar_quant.checkpoint.writer import ShardedWriter, StagedFolder
from solar_quant.devices import compute_dtype, resolve_device
from solar_quant.errors import (CalibrationError, InputError, Interrupted, NumericsError, OptionError,
                                OutputError)
from solar_quant.options import GptqOptions, OutputOptions
from solar_quant.pipeline.job import JOB_DIR, JOB_FILE, Job
from solar_quant.rope import RopeScaling
from solar_quant.variant import RECORD_NAME, SIDE_FILES, copy_side_files, tool_record, variant_config

# Runtimes that refuse a group size that does not divide a linear's inputs (NOTES.md).
PARTIAL_GROUP_REFUSERS = ("transformers' default CPU kernel for 4-bit (GPTQModel TorchAtenLinear)",
                          "vLLM Marlin kernels")
CHUNK_TOKENS = 4096  # calibration tokens per forward chunk
STOP_ENV = "SOLAR_QUANT_STOP_AFTER_LAYER"  # test hook: "k" (after layer k is saved) or "k:unsaved"


def build_gptq_variant(src: str | Path, out: str | Path, gptq: GptqOptions, calib, output: OutputOptions, *,
                       device: str = "cpu", resume: bool = False, log=progress.log) -> Path:
    """Quantize the Llama checkpoint `src` into a GPTQ v1 folder `out` and return its path.

    `calib` (a CalibrationSet) is required for GPTQ and ignored for RTN. With `resume`, an
    interrupted job in OUT's staging folder continues where it stopped."""
    dev = resolve_device(device)
    reader = CheckpointReader(src)
    reader.require_llama()
    reader.require_unquantized()
    shape = LlamaShape.from_config(reader.config, str(reader.path / "config.json"))
    rope = RopeScaling.parse(output.rope_scaling)
    _check_source_tensors(reader, shape)
    if gptq.method == "gptq":
        if calib is None:
            raise OptionError("--method gptq needs calibration data: pass --calibration DIR or calibration flags")
        check_calibration(reader, calib, shape)
    else:
        calib = None
    spec = _job_spec(reader, gptq, calib, output, dev)
    warnings = partial_group_warnings(shape, gptq)
    for w in warnings:
        log(f"warning: {w['message']}")

    _check_output(reader, out)
    staged = StagedFolder(out, overwrite=output.overwrite, resume=resume)
    try:
        job = _open_job(staged, spec, resume, log)  # outside the try below: a refused --resume keeps the job
    except KeyboardInterrupt:
        if (staged.staging / JOB_DIR / JOB_FILE).is_file():
            raise Interrupted(f"interrupted; the job is kept in {staged.staging}: rerun the same command with "
                              "--resume to continue") from None
        staged.abandon()
        raise
    # The CLI turns SIGTERM into KeyboardInterrupt (solar_quant.signals), so both land below.
    try:
        _run(reader, shape, staged, job, gptq, calib, output, rope, dev, warnings, log)
        return staged.commit(exclude=(JOB_DIR,))
    except (InputError, NumericsError):
        staged.abandon()
        raise
    except OutputError as e:  # e.g. disk full: keep a saved job to resume once there is room
        if not (job.dir / JOB_FILE).is_file():
            staged.abandon()
            raise
        raise OutputError(f"{e}; then rerun the same command with --resume to continue from layer "
                          f"{job.layers_done}") from None
    except (KeyboardInterrupt, Interrupted):
        raise _interrupted(staged, job, shape) from None


def _interrupted(staged: StagedFolder, job: Job, shape: LlamaShape) -> Interrupted:
    """The one line an interrupted run ends with; a staging folder without a saved job is removed."""
    if not staged.staging.exists() and staged.final.is_dir():  # the signal came as the commit finished
        return Interrupted(f"interrupted after {staged.final} was complete; it is kept (check it with "
                           f"`solar-quant verify {staged.final}`)")
    if not (job.dir / JOB_FILE).is_file():
        staged.abandon()
        return Interrupted(f"interrupted before the first layer was saved; nothing was left under {staged.final}; "
                           "rerun the same command to start again")
    return Interrupted(f"interrupted; {job.layers_done}/{shape.layers} layers are saved and the job is kept in "
                       f"{staged.staging}: rerun the same command with --resume to continue")


# -- checks before any work ---------------------------------------------------------------
def _check_source_tensors(reader: CheckpointReader, shape: LlamaShape) -> None:
    reader.require_weights(shape.tensor_shapes())


def _check_output(reader: CheckpointReader, out) -> None:
    src_path, out_path = reader.path.resolve(), Path(out).resolve()
    if out_path == src_path or src_path in out_path.parents:
        raise OutputError(f"{out}: lies inside the source checkpoint {reader.path}; choose an output folder outside it")


def check_calibration(reader: CheckpointReader, calib, shape: LlamaShape) -> None:
    """Token ids in range, and made with this model's tokenizer (when the card says which)."""
    ids = calib.input_ids
    if ids.dim() != 2 or ids.dtype != torch.int64 or ids.numel() == 0:
        raise CalibrationError(f"calibration input_ids must be a non-empty int64 [nsamples, seqlen] tensor, "
                               f"found {ids.dtype} {list(ids.shape)}")
    if int(ids.min()) < 0 or int(ids.max()) >= shape.vocab:
        raise CalibrationError(f"calibration token ids span {int(ids.min())}..{int(ids.max())} but {reader.path} has a "
                               f"vocabulary of {shape.vocab}; rebuild the artifact with this model's tokenizer")
    from solar_quant.calibration.artifact import TOKENIZER_FILES, check_tokenizer

    has_tokenizer = any((reader.path / name).is_file() for name in TOKENIZER_FILES)
    if (calib.card or {}).get("tokenizer") and has_tokenizer:
        check_tokenizer(calib, reader.path)


def partial_group_warnings(shape: LlamaShape, gptq: GptqOptions) -> list[dict]:
    """One warning naming the linears whose inputs the group size does not divide (all layers alike)."""
    G = gptq.group_size
    if G == -1:
        return []
    bad = {name: k for name, (_, k) in shape.linear_shapes().items() if k % G}
    if not bad:
        return []
    names = ", ".join(f"{n} (K={k})" for n, k in bad.items())
    message = (f"group size {G} does not divide the inputs of {names} in all {shape.layers} layers: the last group of "
               f"each row is partial. The GPTQ format allows it, but {' and '.join(PARTIAL_GROUP_REFUSERS)} will not "
               f"load these layers; load with GPTQConfig(backend='gptq_torch') "
               f"(solar_quant.formats.gptq_runtime.from_pretrained_kwargs does)")
    return [{"kind": "partial_groups", "group_size": G, "linears": bad, "layers": "all",
             "refused_by": list(PARTIAL_GROUP_REFUSERS), "message": message}]


def _job_spec(reader, gptq, calib, output, dev) -> dict:
    from solar_quant.calibration.artifact import ids_sha256
    from solar_quant.checkpoint.identity import source_identity

    options = {**gptq.model_dump(), "shard_size": output.shard_size, "rope_scaling": output.rope_scaling,
               "device": str(dev)}
    inputs = {"source": reader.identity()["sha256"],
              "calibration": ids_sha256(calib.input_ids) if calib is not None else None,
              "source_files": source_identity(reader.path, reader.shards, SIDE_FILES)}
    return {"options": options, "inputs": inputs}


def _open_job(staged: StagedFolder, spec: dict, resume: bool, log) -> Job:
    job = Job.load(staged.staging) if resume else None
    if job is None:
        if resume:
            log(f"--resume: no interrupted job in {staged.staging}; starting from the first layer")
            staged.reset()  # whatever a job-less staging folder holds is not ours to continue from
        return Job(staged.staging, spec)
    job.check_matches(spec)
    log(f"resuming: {job.layers_done} layers already done in {staged.staging}")
    return job


# -- the run ------------------------------------------------------------------------------
def _run(reader, shape, staged, job, gptq, calib, output, rope, dev, warnings, log) -> None:
    from solar_quant.formats.gptq_v1 import quantization_config
    from solar_quant.pipeline.layers import LayerRunner, embed_tokens, llama_config

    config = llama_config(reader.config)
    dtype = compute_dtype(dev)
    hidden = None
    if job.writer_state is None:  # a fresh job: embeddings first
        writer = job.restore_writer(output.shard_size)
        writer.add("model.embed_tokens.weight", _finite(reader, "model.embed_tokens.weight").to(torch.float16))
        if calib is not None:
            hidden = embed_tokens(reader, calib.input_ids)
        _save_progress(job, writer, hidden, 0)
    else:
        writer = job.restore_writer(output.shard_size)
        if calib is not None and job.layers_done < shape.layers:
            hidden = job.load_hidden()

    if hidden is not None:
        hidden = _place_activations(hidden, shape, dev, dtype, log)
    runner = None
    if calib is not None:
        seqlen = calib.input_ids.shape[1]
        runner = LayerRunner(config, dev, dtype, chunk=max(1, CHUNK_TOKENS // seqlen))
    layer_bar = progress.Progress(shape.layers, "layer", done=job.layers_done)
    linear_bar = progress.Progress(shape.layers * 7, "linear", done=job.layers_done * 7)
    spare = torch.empty_like(hidden) if hidden is not None else None
    saved_at = time.monotonic()  # a resume point is saved when --checkpoint-every seconds have passed
    for i in range(job.layers_done, shape.layers):
        layer = _load_layer(reader, config, i, dev, dtype)
        quantized, record = quantize_layer(i, layer, runner, hidden, gptq, linear_bar, log)
        if runner is not None:
            runner.forward(layer, hidden, out=spare)
            hidden, spare = spare, hidden
        _write_layer(writer, reader, i, quantized)
        del layer, quantized
        reader_release(reader)
        job.records.append(record)
        _test_stop(i, before_save=True)
        last = i + 1 == shape.layers
        if last or time.monotonic() - saved_at >= output.checkpoint_every:
            _save_progress(job, writer, None if last else hidden, i + 1)
            saved_at = time.monotonic()
        _test_stop(i, before_save=False)
        layer_bar.step(f"done: model.layers.{i}")
    del hidden, spare

    writer.add("model.norm.weight", _finite(reader, "model.norm.weight").to(torch.float16))
    if not shape.tie_word_embeddings:
        writer.add("lm_head.weight", _finite(reader, "lm_head.weight").to(torch.float16))
    writer.close()
    damp_used = max((lin["damp"] for rec in job.records for lin in rec["linears"].values()), default=None)
    qcfg = quantization_config(gptq, damp_used=damp_used if gptq.method == "gptq" else None)
    staged.write_json("config.json", variant_config(reader.config, qcfg, rope))
    staged.write_json("quantize_config.json", qcfg)
    copy_side_files(reader, staged)
    staged.write_json(RECORD_NAME, _record(reader, gptq, calib, output, dev, job.records, warnings))


def _place_activations(hidden: torch.Tensor, shape: LlamaShape, dev: torch.device, dtype: torch.dtype, log):
    """On CUDA, keep the calibration activations on the GPU in the compute dtype when both copies
    fit beside one layer's working set: copying fp32 chunks in and out on every pass doubles a
    70B layer's time (bench/README.md). The values are the same either way (the layers compute
    in `dtype`). Otherwise, and on the CPU, they stay on the host in fp32."""
    from solar_quant.devices import activations_fit

    if dev.type != "cuda":
        return hidden
    need = 2 * hidden.numel() * dtype.itemsize
    working = layer_working_bytes(shape, dtype)
    free, _ = torch.cuda.mem_get_info(dev)
    gib = 2**30
    if activations_fit(need, working, free):
        log(f"calibration activations on {dev} in {str(dtype).removeprefix('torch.')} "
            f"(2 x {need / 2 / gib:.1f} GiB; layer working set ~{working / gib:.1f} GiB; {free / gib:.1f} GiB free)")
        return hidden.to(device=dev, dtype=dtype)
    log(f"calibration activations on the host in float32: 2 x {need / 2 / gib:.1f} GiB on {dev} would not fit beside "
        f"the layer's ~{working / gib:.1f} GiB in {free / gib:.1f} GiB free")
    return hidden


def layer_working_bytes(shape: LlamaShape, dtype: torch.dtype) -> int:
    """A bound on one layer's GPU memory while it is quantized: its weights in `dtype`, the
    largest stacked solve (weight, its updated copy and dequantized values, fp32, plus
    transients) and the largest Hessian with its damped copy and inverse factor (fp32)."""
    linears = shape.linear_shapes()
    weights = sum(n * k for n, k in linears.values()) * dtype.itemsize
    stacked = max(sum(linears[_full(n)][0] for n in g) * linears[_full(g[0])][1] for g in SEQUENTIAL_GROUPS)
    largest_k = max(k for _, k in linears.values())
    return weights + 4 * 4 * stacked + 3 * 4 * largest_k**2


def _finite(reader: CheckpointReader, name: str) -> torch.Tensor:
    tensor = reader.get(name)
    reader.require_finite(name, tensor)
    return tensor


def _load_layer(reader, config, i, dev, dtype):
    from solar_quant.pipeline.layers import load_decoder_layer

    layer = load_decoder_layer(reader, config, i, dev, dtype)
    for name, param in layer.named_parameters():
        reader.require_finite(f"{layer_prefix(i)}{name}", param)
    return layer


def reader_release(reader: CheckpointReader) -> None:
    """Close the reader's memory maps so pages of finished layers stop counting as ours."""
    reader.release()


def _save_progress(job: Job, writer: ShardedWriter, hidden, layers_done: int) -> None:
    # states kept on a GPU are saved in their compute dtype (fp16: half the bytes, the same values)
    name = job.save_hidden(layers_done, hidden.cpu()) if hidden is not None else None
    job.layers_done, job.writer_state, job.hidden_file = layers_done, writer.state(), name
    job.save()
    job.drop_hidden_except(name)


def _test_stop(layer: int, before_save: bool) -> None:
    """Test hook: SIGKILL ourselves after layer k (`k`) or after writing but before saving it (`k:unsaved`)."""
    value = os.environ.get(STOP_ENV)
    if not value:
        return
    k, _, when = value.partition(":")
    if int(k) == layer and (when == "unsaved") == before_save:
        os.kill(os.getpid(), signal.SIGTERM if when == "term" else signal.SIGKILL)


# -- one layer ----------------------------------------------------------------------------
def linear_modules(layer) -> dict[str, torch.nn.Module]:
    """'self_attn.q_proj' -> module, for the seven projections."""
    return {f"{'self_attn' if n in ATTN_LINEARS else 'mlp'}.{n}": layer.get_submodule(
        f"{'self_attn' if n in ATTN_LINEARS else 'mlp'}.{n}") for group in SEQUENTIAL_GROUPS for n in group}


def _full(name: str) -> str:
    return f"{'self_attn' if name in ATTN_LINEARS else 'mlp'}.{name}"


def quantize_layer(i: int, layer, runner, hidden, gptq: GptqOptions, bar, log) -> tuple[dict, dict]:
    """Quantize the seven linears of `layer` in place (weights become their dequantized values).

    Linears that read the same inputs (q/k/v; gate/up) share one Hessian and are solved in one
    pass (`gptq_quantize_shared`). Returns ({linear: its packed GPTQ v1 tensors on the CPU},
    the layer's record for solar_quant.json)."""
    from solar_quant.formats.gptq_v1 import pack
    from solar_quant.methods.grid import QuantSpec

    spec = QuantSpec(gptq.bits, gptq.group_size, gptq.sym, gptq.mse)
    modules = linear_modules(layer)
    passes = [[g] for g in SEQUENTIAL_GROUPS] if gptq.true_sequential else [list(SEQUENTIAL_GROUPS)]
    quantized, record = {}, {"layer": i, "linears": {}}
    for groups in passes:
        hessians = collect_hessians(layer, runner, hidden, [_full(g[0]) for g in groups]) if runner else {}
        for group in groups:
            H = hessians.get(_full(group[0]))
            names = [_full(n) for n in group]
            weights = [modules[name].weight for name in names]
            label = ", ".join(layer_prefix(i) + n for n in names)
            for name, weight, q in zip(names, weights, _quantize_group(label, weights, H, spec, gptq, log)):
                record["linears"][name] = linear_record(weight, q, H)
                with torch.no_grad():
                    weight.copy_(q.dequant)
                # packed where it was computed: on a GPU, 1/8 of the int32 codes crosses to the host
                quantized[name] = {k: t.cpu() for k, t in pack(q, gptq.bits).items()}
                bar.step(f"{layer_prefix(i)}{name} rel. output error {record['linears'][name]['rel_output_error']}")
            del H
    return quantized, record


def collect_hessians(layer, runner, hidden, names: list[str]) -> dict[str, torch.Tensor]:
    """Hessians 2/n Σ x xᵀ of the inputs of linears `names` (execution order) over all chunks;
    each chunk stops once the last of them has seen its input."""
    from solar_quant.methods.gptq import accumulate_hessian
    from solar_quant.pipeline.layers import capture_inputs

    modules = {n: layer.get_submodule(n) for n in names}
    state: dict[str, tuple] = {n: (None, 0) for n in names}

    def on_input(name, X):
        state[name] = accumulate_hessian(*state[name], X)

    handles = capture_inputs(modules, on_input)
    try:
        runner.feed(layer, hidden, until=modules[names[-1]])
    finally:
        for h in handles:
            h.remove()
    return {n: H for n, (H, _) in state.items()}


def _quantize_group(label: str, weights: list[torch.Tensor], H, spec, gptq: GptqOptions, log) -> list:
    Ws = [w.detach().to(torch.float32) for w in weights]
    try:
        with _one_cpu_thread(Ws[0].device):
            return _quantize_weights(Ws, H, spec, gptq, label, log)
    except NumericsError as e:
        raise NumericsError(f"{label}: {e}") from None


@contextlib.contextmanager
def _one_cpu_thread(device: torch.device):
    """GPTQ's column loop is thousands of small ops: on CPU, thread hand-offs cost more than they
    give, and on busy shared cores they stall it (measured on 2 loaded cores, SmolLM2's
    1536x576 up_proj: 0.75 s with 1 thread, 18.8 s with 2). The layer forwards keep all threads."""
    if device.type != "cpu":
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _quantize_weights(Ws, H, spec, gptq: GptqOptions, label: str, log) -> list:
    from solar_quant.methods.gptq import gptq_quantize_shared
    from solar_quant.methods.rtn import rtn_quantize

    if H is None:
        return [rtn_quantize(W, spec) for W in Ws]
    if not H.any():
        raise NumericsError("its Hessian is all zeros: every calibration input to it was 0 (dead inputs); "
                            "check the source weights (e.g. a zeroed layer norm) or the calibration data")
    return gptq_quantize_shared(Ws, H, spec, blocksize=gptq.block_size, percdamp=gptq.damp, actorder=gptq.act_order,
                                static_groups=gptq.static_groups, log=lambda m: log(f"{label}: {m}"))


def linear_record(weight: torch.Tensor, q, H) -> dict:
    """Relative weight error ‖W−Q‖/‖W‖ and, given the Hessian, relative output error
    sqrt(tr(ΔW H ΔWᵀ) / tr(W H Wᵀ)) = ‖(W−Q)X‖/‖WX‖ over the calibration inputs."""
    W = weight.detach().to(torch.float32)
    dW = W - q.dequant.to(W.device)
    out = {"rel_weight_error": _sig(dW.norm() / W.norm().clamp_min(1e-30)), "rel_output_error": None}
    if H is not None:
        out["rel_output_error"] = _sig(torch.sqrt(((dW @ H) * dW).sum() / ((W @ H) * W).sum().clamp_min(1e-30)))
    out["damp"] = float(q.damp_used)
    for key in ("loss", "dead_columns", "cholesky_retries"):
        if key in q.stats:
            out[key] = _sig(q.stats[key]) if isinstance(q.stats[key], float) else q.stats[key]
    return out


def _sig(x) -> float:
    return float(f"{float(x):.6g}")


def _write_layer(writer: ShardedWriter, reader: CheckpointReader, i: int, quantized: dict) -> None:
    prefix = layer_prefix(i)
    writer.add(prefix + "input_layernorm.weight", reader.get(prefix + "input_layernorm.weight").to(torch.float16))
    for name in quantized:
        for key, tensor in sorted(quantized[name].items()):
            writer.add(f"{prefix}{name}.{key}", tensor)
    writer.add(prefix + "post_attention_layernorm.weight",
               reader.get(prefix + "post_attention_layernorm.weight").to(torch.float16))


def _record(reader, gptq, calib, output, dev, records, warnings) -> dict:
    options = {**gptq.model_dump(), "rope_scaling": output.rope_scaling, "shard_size": output.shard_size,
               "device": dev.type}
    card = None
    if calib is not None:
        from solar_quant.calibration.artifact import ids_sha256

        card = {**calib.card, "input_ids_sha256": ids_sha256(calib.input_ids),
                "nsamples": int(calib.input_ids.shape[0]), "seqlen": int(calib.input_ids.shape[1])}
    extra = {"calibration": card, "layers": records, "warnings": warnings}
    return tool_record(reader, gptq.method, options, **extra)
