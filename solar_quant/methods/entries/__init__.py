"""The registry entries of the quantization methods (`solar_quant.registry.MethodEntry`), one file per method family."""
