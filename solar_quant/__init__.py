"""solar-quant: stream a 16-bit Llama-2-family checkpoint into bitsandbytes and GPTQ variants."""

__version__ = "0.1.0"
TOOL_NAME = "solar-quant"
