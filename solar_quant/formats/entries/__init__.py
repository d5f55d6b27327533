"""The registry entries of the on-disk formats (`solar_quant.registry.FormatEntry`), one file each."""
