"""Where the GPTQ driver keeps the calibration activations (the memory model's placement rule)."""

from __future__ import annotations

import torch

from solar_quant import memory
from solar_quant.architecture import LlamaShape

GIB = 2**30


def layer_working_bytes(shape: LlamaShape, dtype: torch.dtype) -> int:
    """`memory.layer_working_bytes` with the layer's weights in `dtype`."""
    return memory.layer_working_bytes(shape, dtype.itemsize)


def place_activations(hidden: torch.Tensor, shape: LlamaShape, dev: torch.device, dtype: torch.dtype, log):
    """On CUDA, keep the calibration activations on the GPU in the compute dtype when both copies
    fit beside one layer's working set: copying fp32 chunks in and out on every pass doubles a
    70B layer's time (bench/README.md). The values are the same either way (the layers compute
    in `dtype`). Otherwise, and on the CPU, they stay on the host in fp32."""
    if dev.type != "cuda":
        return hidden
    n, seqlen, hidden_size = hidden.shape
    need = memory.calibration_activation_bytes(n, seqlen, hidden_size, dtype.itemsize)
    working = layer_working_bytes(shape, dtype)
    free, _ = torch.cuda.mem_get_info(dev)
    if memory.activations_fit(need, working, free):
        log(f"calibration activations on {dev} in {str(dtype).removeprefix('torch.')} "
            f"(2 x {need / 2 / GIB:.1f} GiB; layer working set ~{working / GIB:.1f} GiB; {free / GIB:.1f} GiB free)")
        return hidden.to(device=dev, dtype=dtype)
    log(f"calibration activations on the host in float32: 2 x {need / 2 / GIB:.1f} GiB on {dev} would not fit beside "
        f"the layer's ~{working / GIB:.1f} GiB in {free / GIB:.1f} GiB free")
    return hidden
