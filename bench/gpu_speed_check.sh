#!/usr/bin/env bash
# The GPU checks of the speed work, in one command on a machine with one CUDA GPU:
#   bash bench/gpu_speed_check.sh OUTDIR
# 1. the compiled GPTQ column loop against the eager one at q_proj's 70B shape: identical codes
#    (must be 0 differing) and seconds per solve (bench/gptq_gpu_check.py --fused);
# 2. one 70B-shaped layer through the shipped quantize_layer, compiled column loop, then eager
#    (bench/gpu_layer_70b.py; two layers each, the first warms up and compiles): solve, layer and the
#    80-layer projection (read, write, resume points; also with the pipeline's I/O overlap).
# Bars: solve <= 1.5 s, layer <= 5 s, 80 layers <= 8 min on one H100.
set -euo pipefail
out="${1:?usage: bash bench/gpu_speed_check.sh OUTDIR}"
mkdir -p "$out"
export PYTHONPATH="${PYTHONPATH:-.}"
python bench/gptq_gpu_check.py --fused --out "$out/gptq_fused_gpu.json"
python bench/gpu_layer_70b.py --device cuda --activations gpu,gpu --column-loop compiled \
  --label "shipped quantize_layer, compiled column loop" --out "$out/gpu_layer_70b_compiled.json"
python bench/gpu_layer_70b.py --device cuda --activations gpu,gpu --column-loop eager \
  --label "shipped quantize_layer, eager column loop" --out "$out/gpu_layer_70b_eager.json"
