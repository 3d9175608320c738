"""Benchmarks of a source checkout (not part of the installed package): `reaudio bench NAME` imports
``benchmarks.NAME`` and calls its ``main(argv)``; `python benchmarks/NAME.py` runs the same."""
