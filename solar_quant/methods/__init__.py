"""Quantization methods as pure functions of tensors: rtn, gptq, bnb."""
