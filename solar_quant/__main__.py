"""`python -m solar_quant` runs the CLI."""

from solar_quant.cli.app import main

main()
