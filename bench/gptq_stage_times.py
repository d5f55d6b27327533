"""CPU seconds of one SmolLM2 decoder layer's GPTQ stages (Hessian passes, the forward that feeds
the next layer, the solves under several configurations), to see where GPTQ's time goes.

Usage: CALIB=DIR PYTHONPATH=. python bench/gptq_stage_times.py NSAMPLES SEQLEN 'CONFIG;CONFIG...' [LAYER]
CALIB is a calibration artifact (`solar-quant calibrate`) with at least NSAMPLES x SEQLEN ids; each
CONFIG is the JSON of GptqOptions fields. Prints one JSON line. CPU time (process_time, all
threads) rather than wall time, so a shared machine inflates it less; the solves run on one
thread as in the pipeline.
"""
import json, sys, time
import torch
from solar_quant.calibration.artifact import load_calibration
from solar_quant.checkpoint.reader import CheckpointReader
from solar_quant.models.demo import demo_model_path
from solar_quant.options import GptqOptions
from solar_quant.pipeline import gptq as P
from solar_quant.pipeline.layers import LayerRunner, embed_tokens, llama_config, load_decoder_layer
from solar_quant.architecture import SEQUENTIAL_GROUPS
from solar_quant.methods.grid import QuantSpec

nsamples, seqlen = int(sys.argv[1]), int(sys.argv[2])
configs = sys.argv[3].split(";")
reader = CheckpointReader(demo_model_path())
config = llama_config(reader.config)
import os; calib = load_calibration(os.environ["CALIB"])
ids = calib.input_ids[:nsamples, :seqlen]
hidden = embed_tokens(reader, ids)
dev = torch.device("cpu")
runner = LayerRunner(config, dev, torch.float32, chunk=max(1, 4096 // seqlen))
cpu = time.process_time
res = {"nsamples": nsamples, "seqlen": seqlen, "threads": torch.get_num_threads()}
layer_index = int(sys.argv[4]) if len(sys.argv) > 4 else 0
t = cpu(); layer = load_decoder_layer(reader, config, layer_index, dev, torch.float32); res["load_cpu_s"] = cpu() - t
mods = P.linear_modules(layer)
t = cpu()
H = {}
for g in SEQUENTIAL_GROUPS:
    H.update(P.collect_hessians(layer, runner, hidden, [P._full(g[0])]))
res["hessians_cpu_s"] = cpu() - t
t = cpu(); runner.forward(layer, hidden, out=torch.empty_like(hidden)); res["forward_cpu_s"] = cpu() - t
for cfg in configs:
    kw = json.loads(cfg)
    g = GptqOptions(method="gptq", **kw)
    spec = QuantSpec(g.bits, g.group_size, g.sym, g.mse)
    t = cpu()
    for group in SEQUENTIAL_GROUPS:
        names = [P._full(n) for n in group]
        P._quantize_group("x", [mods[n].weight for n in names], H[names[0]], spec, g, lambda m: None)
    res[cfg] = round(cpu() - t, 2)
print(json.dumps(res))
