"""Models that ship with solar-quant: the embedded SmolLM2-135M-Instruct default."""
