"""The `solar-quant` command line: one small module per verb under `commands/`."""
