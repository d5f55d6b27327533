"""One Llama-2-70B decoder layer through the shipped GPTQ layer quantizer on one GPU: seconds per
phase, peak GPU memory, and the projection for the whole 80-layer model.

    PYTHONPATH=. python bench/gpu_layer_70b.py --device cuda --out gpu_layer_70b.json

Needs only torch, transformers and safetensors (no pydantic, typer or bitsandbytes) and nothing
from a hub. It runs the pipeline's own per-layer code, `solar_quant.pipeline.layer_quant`
(`quantize_layer`, `collect_hessians`; torch and transformers only, configured with a plain
`LayerQuantConfig`), over `solar_quant.pipeline.layers.LayerRunner`: the same Hessian
collection, stacked solves, zero-Hessian check, packing and records as `solar-quant quantize`.

What it does, per layer run:
1. builds transformers' `LlamaDecoderLayer` with the 70B's shapes (hidden 8192, 64 heads / 8 KV
   heads, intermediate 28672), fp16 random weights (std 0.02) on the device;
2. calibration activations: random normal hidden states [nsamples, seqlen, hidden]; in `gpu` mode
   they stay on the GPU in fp16 (2 x 4 GiB for 128 x 2048: input and output); in `cpu` mode they
   live on the host in fp32 and each chunk is copied in and out, as the pipeline does when they
   do not fit;
3. `quantize_layer` with a clock around each phase: per true-sequential group (q/k/v, o,
   gate/up, down) Hessian collection over all chunks (`--chunk-tokens` per forward, default the
   pipeline's 4096), one `gptq_quantize_shared` solve (4-bit g128, act-order, damp 0.01, block
   `--block-size`), the record (relative errors), the dequantized weights written back, packing
   to GPTQ v1 on the device and the copy to the host;
4. forward of the quantized layer over all samples (the next layer's inputs).

Hessians (`H = 2/n sum x x^T`, fp32) come from the pipeline's own `accumulate_hessian`, which
multiplies the fp16 activations on tensor cores with fp32 accumulation and output
(`torch.mm(..., out_dtype=torch.float32)`) where torch has that kernel; `--hessian fp32` casts
the inputs to fp32 first. On CUDA both are timed on the first group and their relative
difference is reported.

Several layers run (`--activations gpu,gpu,cpu`: one entry per layer; the first warms up
cuBLAS/cuSOLVER; the projection for each mode uses that mode's last layer). Projection: 80 x the per-layer seconds + reading the 16-bit source
(`--disk-read-gbps`, an assumption, default 2.0 GB/s, sequential safetensors reads) + writing
the output and the resume points (hidden states, fp32, every `--checkpoint-every` s) at the
measured write speed of `--scratch`. bnb nf4 conversion of the layer's seven weights is timed with
`solar_quant.methods.bnb.quantize_4bit` when bitsandbytes is importable, else recorded as absent
(`--bnb-only --device cpu` measures the CPU path on a machine that has it).

On a machine without a GPU, `--device cpu` with scaled-down shapes (e.g. `--hidden 1024
--intermediate 3584 --heads 8 --kv-heads 1 --nsamples 16 --seqlen 256`) runs the same code.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from solar_quant.architecture import SEQUENTIAL_GROUPS  # noqa: E402
from solar_quant.methods.gptq import accumulate_hessian  # noqa: E402
from solar_quant.methods.gptq_fused import column_loop_for, compiled_columns  # noqa: E402
from solar_quant.pipeline.layer_quant import LayerQuantConfig, collect_hessians, full_name, quantize_layer  # noqa: E402
from solar_quant.pipeline.layers import LayerRunner  # noqa: E402

# the layer quantizer's phase names -> the keys of this benchmark's JSON
PHASES = {"hessian": "hessian", "solve": "gptq_solve", "record": "record", "write_back": "write_back",
          "pack": "pack_on_device", "to_host": "to_host", "forward": "forward"}

# -- timing helpers --------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Clock:
    """Accumulates synchronized wall seconds per phase."""

    def __init__(self, device: torch.device):
        self.device, self.seconds = device, {}

    def __call__(self, phase: str):
        clock = self

        class _Span:
            def __enter__(self):
                sync(clock.device)
                self.start = time.perf_counter()

            def __exit__(self, *exc):
                sync(clock.device)
                clock.seconds[phase] = clock.seconds.get(phase, 0.0) + time.perf_counter() - self.start

        return _Span()


# -- Hessians --------------------------------------------------------------------------------
def fp32_accumulator(H, count: int, X: torch.Tensor):
    """The Hessian from float32 inputs and a float32 matmul (for the comparison only)."""
    return accumulate_hessian(H, count, X.to(torch.float32))


class NoBar:
    def step(self, text: str = "") -> None:
        pass


# -- one layer -------------------------------------------------------------------------------
def build_layer(config, device, dtype, seed: int):
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    with torch.device("meta"):
        layer = LlamaDecoderLayer(config, 0)
    layer = layer.to_empty(device=device).to(dtype)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if name.endswith("layernorm.weight"):
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen, device=device, dtype=torch.float32).to(dtype) * 0.02)
    return layer.eval().requires_grad_(False)


def quantize_one_layer(layer, runner, hidden, spare, cfg: LayerQuantConfig, accumulate, device) -> dict:
    """The pipeline's `quantize_layer` with each phase timed, then the quantized layer's forward."""
    clock = Clock(device)
    packed, record = quantize_layer(0, layer, runner, hidden, cfg, NoBar(), lambda m: print(m, file=sys.stderr),
                                    clock=lambda phase: clock(PHASES[phase]), accumulate=accumulate, out=spare)
    errors = {name: lin["rel_output_error"] for name, lin in record["linears"].items()}
    packed_bytes = sum(t.numel() * t.element_size() for p in packed.values() for t in p.values())
    return {"seconds": {k: round(v, 3) for k, v in clock.seconds.items()},
            "total_s": round(sum(clock.seconds.values()), 3),
            "rel_output_error": {k: round(v, 5) for k, v in errors.items()},
            "packed_bytes": packed_bytes, "packed": packed}


def hessian_comparison(layer, runner, hidden, device) -> dict:
    """Time both accumulators on the q/k/v inputs and compare the Hessians they give."""
    name = full_name(SEQUENTIAL_GROUPS[0][0])
    out = {}
    results = {}
    for label, fn in (("fp32", fp32_accumulator), ("library", accumulate_hessian)):
        clock = Clock(device)
        with clock("h"):
            results[label] = collect_hessians(layer, runner, hidden, [name], accumulate=fn)[name]
        out[f"{label}_s"] = round(clock.seconds["h"], 3)
    a, b = results["fp32"], results["library"]
    out["rel_frobenius_difference"] = float((a - b).norm() / a.norm())
    return out


def bnb_nf4(layer, device) -> dict:
    try:
        import bitsandbytes  # noqa: F401

        from solar_quant.methods.bnb import quantize_4bit
    except ImportError as e:
        return {"available": False, "why": f"bitsandbytes is not importable here ({e})"}
    seconds = {}
    for group in SEQUENTIAL_GROUPS:
        for g in group:
            name = full_name(g)
            w = layer.get_submodule(name).weight.detach().to(torch.float16)
            sync(device)
            start = time.perf_counter()
            quantize_4bit(w, "nf4", device=device)
            sync(device)
            seconds[name] = round(time.perf_counter() - start, 3)
    return {"available": True, "device": str(device), "seconds": seconds, "total_s": round(sum(seconds.values()), 3),
            "function": "solar_quant.methods.bnb.quantize_4bit(weight fp16, 'nf4', device=...)"}


def disk_write_gbps(folder: str, nbytes: int = 1 << 30) -> float:
    """Sequential write speed of `folder` (one file, fsync), in GB/s."""
    buf = os.urandom(1 << 24)
    with tempfile.NamedTemporaryFile(dir=folder) as f:
        start = time.perf_counter()
        for _ in range(nbytes // len(buf)):
            f.write(buf)
        f.flush()
        os.fsync(f.fileno())
        return nbytes / (time.perf_counter() - start) / 1e9


def gptq_v1_bytes(N: int, K: int, bits: int, group: int) -> int:
    groups = math.ceil(K / group)
    return 4 * math.ceil(K * bits / 32) * N + 4 * groups * math.ceil(N * bits / 32) + 2 * groups * N + 4 * K


def projection(args, layer_s: float, write_gbps: float, layer_fp16_bytes: int, layer_out_bytes: int,
               hidden_state_bytes: int) -> dict:
    embed = args.vocab * args.hidden * 2
    source = args.layers * layer_fp16_bytes + 2 * embed
    output = args.layers * layer_out_bytes + 2 * embed
    read_s = source / (args.disk_read_gbps * 1e9)
    write_s = output / (write_gbps * 1e9)
    compute_s = args.layers * layer_s
    # a resume point (the fp32 states entering the next layer) after every layer, or with
    # --checkpoint-every T at most once per T seconds (the pipeline's default, 120 s)
    saves = args.layers if args.checkpoint_every <= 0 else min(args.layers, math.ceil(compute_s / args.checkpoint_every))
    resume_s = saves * hidden_state_bytes / (write_gbps * 1e9)
    return {"layers": args.layers, "compute_s": round(compute_s, 1), "source_bytes": source,
            "read_s": round(read_s, 1), "output_bytes": output, "write_s": round(write_s, 1),
            "resume_hidden_bytes": hidden_state_bytes, "resume_points": saves, "resume_write_s": round(resume_s, 1),
            "total_s": round(compute_s + read_s + write_s + resume_s, 1),
            "total_without_resume_files_s": round(compute_s + read_s + write_s, 1),
            # the pipeline reads layer i + 1 and writes layer i - 1 in background threads while layer i
            # is quantized: the slowest of the three streams, plus the first read and the last write
            "total_with_overlap_s": round(max(compute_s, read_s, write_s) + (read_s + write_s) / args.layers
                                          + resume_s, 1),
            "checkpoint_every_s": args.checkpoint_every,
            "assumptions": {"disk_read_gbps": args.disk_read_gbps, "disk_write_gbps_measured": round(write_gbps, 3),
                            "total_s: no overlap of I/O and compute; total_with_overlap_s: reads and writes "
                            "overlap compute as the pipeline's background threads do (not measured here)": True,
                            "embeddings and lm_head copied as fp16 (read + write)": True}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=2048)
    ap.add_argument("--hidden", type=int, default=8192)
    ap.add_argument("--intermediate", type=int, default=28672)
    ap.add_argument("--heads", type=int, default=64)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--layers", type=int, default=80, help="layers in the model (for the projection)")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--damp", type=float, default=0.01)
    ap.add_argument("--mse", type=float, default=0.0, help="clipping search norm per group (0: min/max range)")
    ap.add_argument("--block-size", type=int, default=128, help="columns per lazy-update block (pipeline: 128)")
    ap.add_argument("--static-groups", action="store_true", help="act-order: fix group parameters before reordering")
    ap.add_argument("--chunk-tokens", type=int, default=4096, help="calibration tokens per forward (pipeline: 4096)")
    ap.add_argument("--activations", default="gpu,gpu,cpu",
                    help="one entry per layer run: gpu (fp16 on the device) or cpu (fp32 on the host, chunks copied in "
                         "and out as the pipeline does); the first layer warms up")
    ap.add_argument("--hessian", choices=("library", "fp32"), default="library")
    ap.add_argument("--checkpoint-every", type=float, default=120.0,
                    help="the pipeline's --checkpoint-every (s): how often the projection writes the resume states")
    ap.add_argument("--disk-read-gbps", type=float, default=2.0)
    ap.add_argument("--scratch", default=tempfile.gettempdir(), help="folder whose write speed is measured")
    ap.add_argument("--bnb-only", action="store_true", help="only time the bnb nf4 conversion of one layer")
    ap.add_argument("--label", default="", help="free text stored in the JSON (e.g. 'CPU scaled-down proof')")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--column-loop", choices=("auto", "eager", "compiled"), default="auto",
                    help="GPTQ's column loop (methods/gptq_fused.py; auto: compiled on CUDA); the first layer compiles")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_layer_70b.py: error: --device cuda but CUDA is not available; use --device cpu with "
                         "scaled-down shapes")
    dtype = torch.float16 if device.type == "cuda" else torch.float32  # the pipeline's compute_dtype
    from transformers import LlamaConfig
    import transformers

    config = LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate,
                         num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                         head_dim=args.hidden // args.heads, num_hidden_layers=1, vocab_size=args.vocab,
                         max_position_embeddings=max(4096, args.seqlen), rms_norm_eps=1e-5,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
    config._attn_implementation = "sdpa"
    doc = {"label": args.label, "args": vars(args), "command": " ".join(["python", *sys.argv]),
           "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                        "python": platform.python_version()},
           "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(),
                       "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None},
           "compute_dtype": str(dtype).removeprefix("torch.")}
    out_path = Path(args.out)

    def save():
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(doc, indent=2) + "\n")

    wall = time.perf_counter()
    layer = build_layer(config, device, dtype, args.seed)
    doc["bnb_nf4"] = bnb_nf4(layer, device)
    save()
    if args.bnb_only:
        print(json.dumps(doc["bnb_nf4"]))
        return

    modes = args.activations.split(",")
    if any(m not in ("gpu", "cpu") for m in modes):
        raise SystemExit(f"gpu_layer_70b.py: error: --activations {args.activations!r}: a comma list of gpu / cpu")
    runner = LayerRunner(config, device, dtype, chunk=max(1, args.chunk_tokens // args.seqlen))
    doc["runner"] = "solar_quant.pipeline.layers.LayerRunner"
    doc["quantizer"] = "solar_quant.pipeline.layer_quant.quantize_layer"
    accumulate = accumulate_hessian if args.hessian == "library" else fp32_accumulator
    doc["hessian_kernel"] = ("solar_quant.methods.gptq.accumulate_hessian (the pipeline's: fp16 inputs on tensor "
                             "cores, fp32 accumulation, where torch has mm(out_dtype=float32))"
                             if args.hessian == "library" else "fp32 inputs, fp32 matmul")
    cfg = LayerQuantConfig(method="gptq", bits=args.bits, group_size=args.group_size, sym=True, mse=args.mse,
                           act_order=args.act_order, static_groups=args.static_groups, damp=args.damp,
                           block_size=args.block_size, column_loop=args.column_loop)
    doc["column_loop"] = column_loop_for(device, args.column_loop)
    doc["layers_run"] = []
    hidden = spare = None
    for i, mode in enumerate(modes):
        if i == 0 or mode != modes[i - 1]:
            hidden = spare = None
            act_device = device if mode == "gpu" else torch.device("cpu")
            act_dtype = dtype if mode == "gpu" else torch.float32  # the pipeline keeps fp32 states on the host
            gen = torch.Generator(device=act_device).manual_seed(args.seed + 1)
            hidden = torch.randn(args.nsamples, args.seqlen, args.hidden, generator=gen, device=act_device,
                                 dtype=act_dtype)
            spare = torch.empty_like(hidden)
        if i == 0 and device.type == "cuda":
            doc["hessian_comparison_qkv"] = hessian_comparison(layer, runner, hidden, device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        if i > 0:
            layer = build_layer(config, device, dtype, args.seed + 10 * i)
        result = quantize_one_layer(layer, runner, hidden, spare, cfg, accumulate, device)
        packed = result.pop("packed")
        if i == 0:
            doc["pack_check"] = check_pack(layer, packed, cfg.bits)
        hidden, spare = spare, hidden
        result["activations"] = {"where": str(hidden.device), "dtype": str(hidden.dtype).removeprefix("torch."),
                                 "bytes_per_copy": hidden.numel() * hidden.element_size(), "copies": 2,
                                 "chunk_samples": runner.chunk}
        if device.type == "cuda":
            result["peak_gpu_allocated_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
            result["peak_gpu_reserved_gib"] = round(torch.cuda.max_memory_reserved(device) / 2**30, 2)
        if doc["column_loop"] == "compiled":
            result["compiled_column_loop"] = {"runs": compiled_columns().calls, "failure": compiled_columns().failure}
        doc["layers_run"].append(result)
        print(f"layer {i} ({mode} activations): {json.dumps(result['seconds'])} total {result['total_s']} s", flush=True)
        del packed
        save()
    del hidden, spare
    layer_fp16 = sum(p.numel() * 2 for p in layer.parameters())
    K, I = args.hidden, args.intermediate
    kv = args.kv_heads * (args.hidden // args.heads)
    shapes = [(K, K), (kv, K), (kv, K), (K, K), (I, K), (I, K), (K, I)]
    out_bytes = sum(gptq_v1_bytes(n, k, args.bits, args.group_size) for n, k in shapes) + 2 * 2 * K
    write_gbps = disk_write_gbps(args.scratch)
    hidden_fp32 = args.nsamples * args.seqlen * args.hidden * 4
    doc["per_layer"], doc["projection"] = {}, {}
    for mode in dict.fromkeys(modes):  # the last layer run in each mode (the first layer warms up)
        idx = max(j for j, m in enumerate(modes) if m == mode)
        last = doc["layers_run"][idx]
        doc["per_layer"][mode] = {"seconds": last["seconds"], "total_s": last["total_s"],
                                  "peak_gpu_allocated_gib": last.get("peak_gpu_allocated_gib"),
                                  "fp16_bytes": layer_fp16, "gptq_bytes": out_bytes,
                                  "layer_index": idx, "after_warm_up": idx > 0}
        proj = projection(args, last["total_s"], write_gbps, layer_fp16, out_bytes, hidden_fp32)
        proj["goal_s"] = 20 * 60
        proj["meets_goal"] = proj["total_s"] <= 20 * 60
        doc["projection"][mode] = proj
    doc["wall_s"] = round(time.perf_counter() - wall, 1)
    save()
    print(json.dumps({"per_layer": doc["per_layer"], "projection": doc["projection"], "bnb_nf4": doc["bnb_nf4"]},
                     indent=2))


def check_pack(layer, packed: dict, bits: int) -> dict:
    """The packed q_proj, unpacked by `formats.gptq_v1.dequantize`, equals the layer's weight."""
    from solar_quant.formats.gptq_v1 import dequantize

    name = full_name("q_proj")
    W = dequantize(packed[name], bits)
    ref = layer.get_submodule(name).weight.detach().float().cpu()
    return {"q_proj_unpacked_equals_layer_weight": bool(torch.allclose(W, ref, rtol=0,
                                                                        atol=float(ref.abs().max()) * 1e-3))}


if __name__ == "__main__":
    main()
