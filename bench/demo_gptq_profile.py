"""Where `make demo`'s GPTQ step spends its time: cProfile of the shipped `quantize_layer` on the
demo model's first decoder layers with the demo's GPTQ options (4-bit g64 act-order sym, damp 0.01,
clipping mse 2.4), NSAMPLES x SEQLEN calibration tokens.

    CALIB=DIR PYTHONPATH=. python bench/demo_gptq_profile.py [NSAMPLES SEQLEN LAYERS] > profile.txt

CALIB is a calibration artifact (`solar-quant calibrate`) with at least NSAMPLES x SEQLEN ids (the
first SEQLEN tokens of each sample are used). Prints the phase seconds (quantize_layer's own clock,
wall) and the top functions by own time and by cumulative time.
"""
import contextlib
import cProfile
import io
import os
import pstats
import sys
import time
from collections import defaultdict

import torch

from solar_quant.calibration.artifact import load_calibration
from solar_quant.checkpoint.reader import CheckpointReader
from solar_quant.models.demo import demo_model_path
from solar_quant.pipeline.layer_quant import LayerQuantConfig, quantize_layer
from solar_quant.pipeline.layers import LayerRunner, embed_tokens, llama_config, load_decoder_layer

nsamples, seqlen, layers = (int(a) for a in (sys.argv[1:4] if len(sys.argv) > 3 else (32, 256, 2)))
reader = CheckpointReader(demo_model_path())
config = llama_config(reader.config)
ids = load_calibration(os.environ["CALIB"]).input_ids[:nsamples, :seqlen]
hidden = embed_tokens(reader, ids)
runner = LayerRunner(config, torch.device("cpu"), torch.float32, chunk=max(1, 4096 // seqlen))
cfg = LayerQuantConfig(bits=4, group_size=64, sym=True, act_order=True, damp=0.01, mse=2.4)
phases = defaultdict(float)


@contextlib.contextmanager
def clock(phase):
    t = time.perf_counter()
    yield
    phases[phase] += time.perf_counter() - t


class NoBar:
    def step(self, detail=""):
        pass


prof = cProfile.Profile()
wall = time.perf_counter()
for i in range(layers):
    layer = load_decoder_layer(reader, config, i, torch.device("cpu"))
    out = torch.empty_like(hidden)
    prof.enable()
    quantize_layer(i, layer, runner, hidden, cfg, NoBar(), lambda m: None, clock=clock, out=out)
    prof.disable()
    hidden = out
wall = time.perf_counter() - wall
print(f"{layers} layers, {nsamples} x {seqlen} tokens, torch threads {torch.get_num_threads()}, "
      f"wall {wall:.1f} s, load {os.getloadavg()}")
print("phases (s, all layers):", {k: round(v, 2) for k, v in sorted(phases.items(), key=lambda kv: -kv[1])})
for key in ("tottime", "cumulative"):
    s = io.StringIO()
    pstats.Stats(prof, stream=s).sort_stats(key).print_stats(25)
    print(s.getvalue())
