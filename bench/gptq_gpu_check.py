"""GPTQ on CUDA: agreement with the CPU result, and time/memory at Llama-2-70B linear shapes.

    PYTHONPATH=. python bench/gptq_gpu_check.py [--out gpu.json]

Agreement: a 512 x 1024 weight, correlated synthetic activations, 4-bit g128, 3-bit act-order,
and both again with the clipping search (mse 2.4, act-order swapped); RTN must match the CPU bit
for bit (without clipping), GPTQ to float rounding. Timing: random weights and a Hessian from
4096 random correlated tokens at the 70B shapes (q_proj 8192x8192, gate_proj 28672x8192,
down_proj 8192x28672), one warm-up run first. Compiled column loop (`--fused`, methods/gptq_fused.py):
eager against compiled on CUDA at q_proj's shape (8192 x 8192, 4-bit g128, with and without
act-order and clipping): seconds per solve (compiling timed apart) and how many codes differ (must be 0).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from solar_quant.methods.gptq import accumulate_hessian, gptq_quantize
from solar_quant.methods.grid import QuantSpec
from solar_quant.methods.rtn import rtn_quantize


def correlated(rows: int, K: int, device, seed: int = 0) -> torch.Tensor:
    g = torch.Generator(device=device).manual_seed(seed)
    mix = torch.randn(K, K, generator=g, device=device) / K**0.5 + torch.eye(K, device=device)
    return torch.randn(rows, K, generator=g, device=device) @ mix


def agreement() -> list[dict]:
    rows = []
    X = correlated(4096, 1024, "cpu")
    W = torch.randn(512, 1024, generator=torch.Generator().manual_seed(1)) * 0.02
    H = accumulate_hessian(None, 0, X)[0]
    Hc = accumulate_hessian(None, 0, X.cuda())[0]
    for spec, actorder in ((QuantSpec(4, 128, True), False), (QuantSpec(3, 128, False), True),
                           (QuantSpec(4, 128, True, mse=2.4), True), (QuantSpec(3, 128, False, mse=2.4), False)):
        cpu = gptq_quantize(W, H, spec, actorder=actorder)
        gpu = gptq_quantize(W.cuda(), Hc, spec, actorder=actorder)
        err = lambda Q: float(torch.linalg.norm((W - Q.cpu()) @ X.t()))  # noqa: E731
        rows.append({"spec": str(spec), "actorder": actorder,
                     "hessian_max_rel_diff": float(((Hc.cpu() - H).abs().max() / H.abs().max())),
                     "codes_agree": float((cpu.intweight == gpu.intweight.cpu()).float().mean()),
                     "g_idx_equal": bool(torch.equal(cpu.g_idx, gpu.g_idx.cpu())),
                     "output_err_gpu_over_cpu": err(gpu.dequant) / err(cpu.dequant),
                     "device": str(gpu.intweight.device)})
        r_cpu, r_gpu = rtn_quantize(W, spec), rtn_quantize(W.cuda(), spec)
        rows[-1]["rtn_bit_exact"] = bool(torch.equal(r_cpu.intweight, r_gpu.intweight.cpu())
                                         and torch.equal(r_cpu.scales, r_gpu.scales.cpu()))
        ident = gptq_quantize(W.cuda(), torch.eye(1024, device="cuda"), spec)
        rows[-1]["identity_equals_rtn_on_gpu"] = bool(torch.equal(ident.dequant, r_gpu.dequant))
    try:
        from solar_quant.formats import gptq_v1

        q = gptq_quantize(W.cuda(), Hc, QuantSpec(3, 128, True), actorder=True)
        packed = gptq_v1.pack(q, 3)
        rows.append({"pack_on_gpu_round_trip": bool(torch.equal(gptq_v1.dequantize(packed, 3), q.dequant))})
    except ImportError as e:  # the device image may lack pydantic (options.py)
        rows.append({"pack_on_gpu_round_trip": f"skipped: {e}"})
    return rows


def timing() -> list[dict]:
    rows = []
    spec = QuantSpec(4, 128, True)
    X = correlated(4096, 8192, "cuda")
    H8 = accumulate_hessian(None, 0, X)[0]
    del X
    gptq_quantize(torch.randn(1024, 8192, device="cuda"), H8, spec)  # warm-up
    for name, N, K in (("q_proj", 8192, 8192), ("gate_proj", 28672, 8192), ("down_proj", 8192, 28672)):
        for actorder in (False, True):
            if K == 8192:
                H = H8
            else:
                X = correlated(4096, K, "cuda", seed=2)
                torch.cuda.synchronize()
                t = time.perf_counter()
                H = accumulate_hessian(None, 0, X)[0]
                torch.cuda.synchronize()
                hess_s = time.perf_counter() - t
                del X
            W = torch.randn(N, K, device="cuda") * 0.02
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            t = time.perf_counter()
            q = gptq_quantize(W, H, spec, actorder=actorder)
            torch.cuda.synchronize()
            row = {"linear": name, "N": N, "K": K, "actorder": actorder,
                   "gptq_seconds": round(time.perf_counter() - t, 2),
                   "peak_extra_GiB": round((torch.cuda.max_memory_allocated() - base) / 2**30, 2),
                   "retries": q.stats["cholesky_retries"]}
            if K != 8192:
                row["hessian_4096_tokens_seconds"] = round(hess_s, 3)
            print(json.dumps(row), flush=True)
            rows.append(row)
            del q, W
    return rows


def fused_check() -> list[dict]:
    from solar_quant.methods.gptq_fused import compiled_columns

    rows = []
    fused = compiled_columns()
    X = correlated(4096, 8192, "cuda")
    H = accumulate_hessian(None, 0, X)[0]
    del X
    W = torch.randn(8192, 8192, device="cuda", generator=torch.Generator(device="cuda").manual_seed(3)) * 0.02
    for actorder, mse in ((False, 0.0), (True, 0.0), (True, 2.4)):
        spec = QuantSpec(4, 128, True, mse)
        times = {}
        for name, kw in (("eager", {}), ("compiled_first", {"fused": fused}), ("compiled", {"fused": fused})):
            torch.cuda.synchronize()
            t = time.perf_counter()
            q = gptq_quantize(W, H, spec, actorder=actorder, **kw)
            torch.cuda.synchronize()
            times[name] = round(time.perf_counter() - t, 2)
            if name == "eager":
                ref = q.intweight
            else:
                times[f"{name}_codes_differing"] = int((q.intweight != ref).sum())
        row = {"N": 8192, "K": 8192, "bits": 4, "group_size": 128, "actorder": actorder, "mse": mse,
               "seconds": times, "compiled_runs": fused.calls, "compile_failure": fused.failure}
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out")
    parser.add_argument("--agreement-only", action="store_true", help="skip the timing at 70B shapes")
    parser.add_argument("--fused", action="store_true", help="only the compiled column loop against the eager one")
    args = parser.parse_args()
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__}
    if args.fused:
        result["fused"] = fused_check()
        if args.out:
            with open(args.out, "w") as f:
                json.dump(result, f, indent=2)
        return
    result["agreement"] = agreement()
    print(json.dumps(result), flush=True)
    result["timing"] = [] if args.agreement_only else timing()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
